"""The Python dependencies are pinned: requirements.txt (the image) and requirements-test.txt (CI) name exact
versions that pyproject.toml's ranges admit, and this environment runs exactly those (install-deps.sh
installs from them). `make lock` (scripts/lock-deps.sh) is the one way they change."""

from __future__ import annotations

import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT


def pins(name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            out.update(pins(line[3:]))
            continue
        package, sep, version = line.partition("==")
        assert sep and version and " " not in line, f"{name}: not an exact pin: {line!r}"
        out[canonicalize_name(package)] = version
    return out


def test_every_dependency_is_pinned_inside_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for lock, wanted in (("requirements.txt", project["dependencies"]),
                         ("requirements-test.txt", project["optional-dependencies"]["test"])):
        pinned = pins(lock)
        for text in wanted:
            req = Requirement(text)
            version = pinned.get(canonicalize_name(req.name))
            assert version is not None, f"{req.name} is not pinned in {lock}"
            assert req.specifier.contains(version, prereleases=True), f"{lock}: {req.name}=={version} not in {req}"


def test_this_environment_runs_the_pinned_versions() -> None:
    for name, version in pins("requirements-test.txt").items():
        assert metadata.version(name) == version, name
