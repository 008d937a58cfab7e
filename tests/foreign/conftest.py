"""Fixtures of the foreign-rules layer: where the driver runs (`target`) in a fresh network namespace, and an
xtables lock file of the test's own (a namespace shares /run with the machine, so /run/xtables.lock would be the
host's).

`target` is this checkout's containerboot unless a test asks for another by parametrising it (indirect) with
tests/lab/foreign.py's TARGETS: ON_386 is the linux/386 image's own containerboot in a container, a docker test."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need, need_root
from tests.lab.foreign import LOCAL, ContainerTarget, LocalTarget, Target, container_target
from tests.lab.images import base_image, build_image, docker, image_exists, stale_sources
from tests.lab.netns import Lab
from tests.lab.platforms import I386

collect_ignore = ["build_data.py"]  # the data's recipe, run by hand (data/SOURCES.md); not a test

# The linux/386 image, built by build_docker.sh from the work tree with the offline 386 base of
# scripts/base-image.sh, under a tag of this layer's own (tests/i386 has its own), and rebuilt when its
# containerboot and firewall modules are not the tree's (a Docker-cached build takes seconds).
REPO_386, TAG_386 = "containerboot-test", "foreign-386"
IMAGE_386 = f"{REPO_386}:{TAG_386}"
BASE = "containerboot-base:bookworm-{arch}"

_names = itertools.count()


@pytest.fixture
def lab() -> Iterator[Lab]:
    need_root()
    for tool in ("iptables-legacy-restore", "ip6tables-legacy-restore", "ip6tables-legacy-save"):
        need(shutil.which(tool) is not None, f"needs {tool}")
    lab = Lab("fr")
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def image_386() -> str:
    """The linux/386 image's reference: built unless one exists whose containerboot and firewall modules are
    the work tree's."""
    need(shutil.which("docker") is not None and docker("info", check=False, timeout=60).returncode == 0,
         "needs a Docker engine (scripts/docker-engine.sh)")
    stale = stale_sources(IMAGE_386, I386.name) if image_exists(IMAGE_386) else ["(no image)"]
    if stale:
        print(f"\nbuilding {IMAGE_386}: {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''} not as in the tree")
        base_image(I386.name)
        build = build_image(REPO_386, TAG_386, platform=I386.name, base=BASE)
        assert build.refs == [IMAGE_386], build.refs
        print(f"{IMAGE_386}: built in {build.seconds:.0f} s")
    return IMAGE_386


@pytest.fixture
def target(request: pytest.FixtureRequest, lab: Lab, tmp_path: Path) -> Iterator[Target]:
    """Where the driver runs: this checkout's containerboot CLI in a fresh namespace of `lab`, or (parameter
    "386") the linux/386 image's in a container of its own, checked to be 32-bit Python with the i386 layout."""
    kind = getattr(request, "param", LOCAL)
    if kind == LOCAL:
        yield LocalTarget(lab, lab.ns("f"), tmp_path / "files")
        return
    assert kind == "386", kind
    image = request.getfixturevalue("image_386")
    with container_target(image, I386.name, f"cbf{os.getpid()}-{next(_names)}", tmp_path / "files") as c:
        check_386(c)
        yield c


def check_386(c: ContainerTarget) -> None:
    """The image's containerboot runs 32-bit Python, and its xtables writer takes the i386 layout (ip6t_entry
    without the padding x86_64 puts before the counters)."""
    probe = "import ctypes, firewall.xtables as x; print(ctypes.sizeof(ctypes.c_void_p), x.VOUCHED.get(x.ABI), " \
            "x.LAYOUT[4].size, x.LAYOUT[6].size)"
    assert c.python(probe).split() == [str(I386.pointer_bytes), "i386", "112", "164"]


@pytest.fixture
def lockfile(target: Target) -> str:
    """The xtables lock file, where both the driver and this machine's tools reach it (for a container: in its
    mounted config directory)."""
    return target.write("xtables.lock", "")
