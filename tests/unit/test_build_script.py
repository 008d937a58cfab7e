"""build_docker.sh parameters that need no Docker engine."""

import os
import subprocess

from tests.conftest import ROOT
from tests.lab.platforms import ALL


def test_unknown_target_is_refused_before_building() -> None:
    proc = subprocess.run([str(ROOT / "build_docker.sh")], capture_output=True, text=True,
                          env={**os.environ, "TARGET": "k8s-operator"})
    assert (proc.returncode, proc.stdout) == (1, "unknown target: k8s-operator\n")


def test_unknown_platform_is_refused_naming_the_four() -> None:
    proc = subprocess.run([str(ROOT / "build_docker.sh")], capture_output=True, text=True,
                          env={**os.environ, "PLATFORM": "linux/amd64,linux/s390x"})
    assert proc.returncode == 1 and proc.stdout == "", proc
    names = ", ".join(p.name for p in ALL)
    assert proc.stderr == f"unsupported platform: linux/s390x ({names})\n"


def test_the_wheel_lists_every_package() -> None:
    """The image's wheel holds only the packages pyproject.toml names: a package folder missing from that
    list would be missing from the image, and the boot would fail there alone."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("containerboot", "firewall")
             for p in (ROOT / top).rglob("__init__.py")}
    assert listed == found
