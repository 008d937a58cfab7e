"""The image's platforms, as build_docker.sh names them, and what a container of each shows on this machine.

scripts/platforms.sh keeps one table of names per platform, which the build scripts source; this is the
tests' side of it, plus what can be checked from outside (the image config's architecture and variant) and
from inside (uname -m, the size of a pointer). This machine is amd64 with IA32 emulation: linux/386 runs
natively, the arm platforms under qemu-user (binfmt_misc, scripts/qemu-binfmt.sh), where no netfilter call
works.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Platform:
    name: str  # Docker's os/architecture[/variant]: PLATFORM of build_docker.sh, `docker run --platform`
    token: str  # build_docker.sh's one word for it: BASE's "{arch}", the -<token> suffix of a per-platform tag
    architecture: str  # the image config's Architecture
    variant: str  # and its Variant ("" for none)
    machine: str  # `uname -m` in a container of it here
    pointer_bytes: int  # ctypes.sizeof(c_void_p) in the image's python3
    emulated: bool  # runs under qemu-user here


# In the order of upstream's list and of build_docker.sh's table. arm64 has no variant: Docker normalizes
# arm64/v8 to plain arm64 (the base image's v8, from docker-archive.py, is not carried over), while arm
# keeps its v7. linux/386's machine is x86_64, not i686: Docker (20.10 here, and newer; moby/moby#42732)
# starts a 386 container without the PER_LINUX32 personality, so the kernel reports its own machine; with
# that personality (linux32) it says i686.
AMD64 = Platform("linux/amd64", "amd64", "amd64", "", "x86_64", 8, False)
ARM64 = Platform("linux/arm64", "arm64", "arm64", "", "aarch64", 8, True)
ARMV7 = Platform("linux/arm/v7", "armv7", "arm", "v7", "armv7l", 4, True)
I386 = Platform("linux/386", "386", "386", "", "x86_64", 4, False)
ALL = (AMD64, ARM64, ARMV7, I386)
EMULATED = tuple(p for p in ALL if p.emulated)


def by_name(name: str) -> Platform:
    return next(p for p in ALL if p.name == name)


def image_sizes(build_log: str) -> dict[str, int]:
    """build_docker.sh's "image size: N MB (B bytes), <platform>" lines: platform -> bytes."""
    sizes = {}
    for line in build_log.splitlines():
        if line.startswith("image size: "):
            head, platform = line.rsplit(", ", 1)
            sizes[platform] = int(head.split("(", 1)[1].split()[0])
    return sizes
