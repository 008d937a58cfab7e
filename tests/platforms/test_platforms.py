"""The images of upstream's four platforms from one build, their manifest list, and the arm images under qemu.

One build_docker.sh run makes linux/amd64, linux/arm64, linux/arm/v7 and linux/386 (PLATFORM lists all four)
from the offline bases of scripts/base-image.sh and, with PUSH=true, pushes them and their manifest list to
a registry on 127.0.0.1 (Debian's docker-registry); a pull by platform must give each architecture's very
image. The arm images (arm64 and arm/v7) are then run on this amd64 machine under emulation (binfmt_misc with
qemu-aarch64 and qemu-arm, scripts/qemu-binfmt.sh): the plan, detection, a userspace boot that joins
headscale and serves SOCKS5, and the operator's sysctl init container. The 386 image runs natively; its
kernel-mode tests are tests/i386's.

qemu-user refuses netfilter's netlink socket and legacy iptables' socket options, so no rule is ever
installed here: kernel mode on arm is left to real arm machines. headscale, the web backend and the
tailnet peer in front of it are the amd64 image and binaries, natively. --privileged fails on this
machine, so the sysctl test gets a writable /proc/sys from systempaths=unconfined, as tests/docker does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, need
from tests.lab.images import (
    SOCKS5_FETCH,
    Build,
    Lab,
    base_image,
    build_image,
    docker,
    headscale_image,
    inspect_image,
    kernel_args,
    need_docker,
)
from tests.lab.platforms import ALL, AMD64, EMULATED, Platform, image_sizes
from tests.lab.ports import free_port
from tests.lab.wait import wait_for

pytestmark = pytest.mark.docker

NAME = f"cba{os.getpid()}"
SUBNET = "198.18.201.0/24"
BASE = "containerboot-base:bookworm-{arch}"
HEADSCALE_IMAGE = "containerboot-test-headscale:arm64-lab"
TAG = "test"

emulated = pytest.mark.parametrize("platform", EMULATED, ids=lambda p: p.token)
every = pytest.mark.parametrize("platform", ALL, ids=lambda p: p.token)


class Registry:
    """Debian's docker-registry on 127.0.0.1, storage in a temporary directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cbreg"))
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = self.dir / "config.yml"
        config.write_text(f"version: 0.1\nlog: {{level: error}}\n"
                          f"storage:\n  filesystem: {{rootdirectory: {self.dir}/data}}\n"
                          f"http: {{addr: '{self.host}'}}\n")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False
        assert wait_for(up, 20, 0.2), "docker-registry did not start"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Images:
    """The one four-platform build: its log and each platform's image, pushed with the list to `registry`."""

    registry: Registry
    build: Build
    repo: str
    lab: Lab

    def ref(self, platform: Platform) -> str:
        return f"{self.repo}:{TAG}-{platform.token}"

    @property
    def manifest_list(self) -> str:
        return f"{self.repo}:{TAG}"

    def run(self, platform: Platform, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
        """`docker run --rm` of that platform's image without a network; args: docker options, "--", the
        command's arguments."""
        split = args.index("--") if "--" in args else len(args)
        extra = ["--entrypoint", entrypoint] if entrypoint else []
        return docker("run", "--rm", "--platform", platform.name, "--network", "none", *extra, *args[:split],
                      self.ref(platform), *args[split + 1:], check=False)


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    need_docker()
    need(os.geteuid() == 0, "needs root to register qemu with binfmt_misc")
    need(all(Path(f"/usr/lib/binfmt.d/{q}.conf").exists() for q in ("qemu-aarch64", "qemu-arm"))
         and shutil.which("docker-registry") is not None,
         "needs qemu-user-static and docker-registry (scripts/install-deps.sh)")
    subprocess.run([str(ROOT / "scripts/qemu-binfmt.sh"), *(p.token for p in EMULATED)], check=True)
    # Each base is debootstrapped once and cached under /var/cache/containerboot/base (about 1 minute natively,
    # 2 to 6 under qemu); after that this only loads or finds the image.
    for platform in ALL:
        start = time.monotonic()
        base_image(platform.name)
        print(f"\n{platform.name} base image: {time.monotonic() - start:.0f} s", end="")
    amd64_base = base_image()

    registry = Registry()
    lab: Lab | None = None
    repo = f"{registry.host}/containerboot-test"
    built: list[str] = []
    try:
        build = build_image(repo, TAG, platform=",".join(p.name for p in ALL), base=BASE, push=True)
        built = build.refs
        print(f"\nfour-platform build and push: {build.seconds:.0f} s")
        print("\n".join(line for line in build.log.splitlines()
                        if line.startswith(("image size", "build time", "layers", "  "))))
        lab = Lab(NAME, SUBNET, image=f"{repo}:{TAG}-{AMD64.token}",
                  headscale_image=headscale_image(amd64_base, HEADSCALE_IMAGE))
        lab.start()
        yield Images(registry, build, repo, lab)
    finally:
        if lab is not None:
            lab.close()
        for ref in [*built, f"{repo}:{TAG}"]:
            docker("rmi", ref, check=False)
        registry.close()


@pytest.fixture(scope="module")
def peer(images: Images) -> str:
    """A tailnet peer: the amd64 image as a kernel-mode proxy in front of the backend, natively; its address."""
    lab = images.lab
    container = lab.run("peer", *kernel_args(), env=lab.node_env(TS_USERSPACE="false", TS_DEST_IP=lab.backend_ip))
    return lab.tailnet_ip(container, 60)


def test_four_images_built_small_in_one_run(images: Images) -> None:
    sizes = image_sizes(images.build.log)
    assert list(sizes) == [p.name for p in ALL], sizes
    assert all(b < 100_000_000 for b in sizes.values()), sizes
    assert images.build.refs == [images.ref(p) for p in ALL]


@every
def test_image_is_of_its_platform(images: Images, platform: Platform) -> None:
    config = inspect_image(images.ref(platform))
    assert (config["Os"], config["Architecture"], config.get("Variant", "")) == \
        ("linux", platform.architecture, platform.variant), config
    uname = images.run(platform, "--", "-m", entrypoint="uname")
    assert uname.stdout.strip() == platform.machine, uname
    pointer = images.run(platform, "--", "-c", "import ctypes; print(ctypes.sizeof(ctypes.c_void_p))",
                         entrypoint="python3")
    assert pointer.stdout.strip() == str(platform.pointer_bytes), pointer


# The legacy iptables writer's struct layout as each image's own Python derives it, against the kernel's UAPI
# sizes for that ABI (x86_64 and arm64: 64-bit; i386: 64-bit values 4-aligned; 32-bit ARM EABI: 4-byte
# pointers, 64-bit values 8-aligned): ipt_entry, ip6t_entry and where its counters are, ipt_replace,
# ipt_get_entries, xt_counters_info, then the standard target, the tcp match and DNAT revision 2 as written.
UAPI = {8: ([112, 168, 152, 96, 40, 40, 40, 48, 80], "64-bit"),
        4: ([112, 164, 148, 92, 36, 36, 36, 44, 76], "i386"),
        (4, "arm"): ([112, 168, 152, 96, 40, 40, 40, 48, 80], "32-bit ARM")}
LAYOUT = """
import json, sys
sys.path.insert(0, "/opt/containerboot/lib")
from firewall import iptables, xtables
v4, v6 = xtables.LAYOUT[4], xtables.LAYOUT[6]
dnat = iptables.encode(4, iptables.Spec(iptables.PRE, "DNAT", "198.18.0.1", dst="100.64.0.1"))
print(json.dumps([[v4.size, v6.size, v6.counters_at, xtables.REPLACE.size, xtables.GET_ENTRIES.size,
                   xtables.COUNTERS_INFO.size, len(v4.standard(0)) - v4.size, len(iptables.port_match("tcp", 1)),
                   len(dnat) - v4.size], xtables.VOUCHED.get(xtables.ABI)]))
"""


@every
def test_legacy_writer_layout_is_the_kernels_for_the_platform(images: Images, platform: Platform) -> None:
    proc = images.run(platform, "--", "-c", LAYOUT, entrypoint="python3")
    assert proc.returncode == 0, proc.stderr
    sizes, vouched = json.loads(proc.stdout)
    key = (4, "arm") if platform.architecture == "arm" else platform.pointer_bytes
    assert [sizes, vouched] == list(UAPI[key]), (platform.name, sizes, vouched)


def test_manifest_list_pulls_each_platform(images: Images) -> None:
    ref = images.manifest_list
    listing = json.loads(docker("manifest", "inspect", "--insecure", ref).stdout)
    listed = sorted((m["platform"]["os"], m["platform"]["architecture"], m["platform"].get("variant", ""))
                    for m in listing["manifests"])
    assert listed == sorted(("linux", p.architecture, p.variant) for p in ALL), listing
    for platform in ALL:
        docker("pull", "-q", "--platform", platform.name, ref)
        pulled = inspect_image(ref)
        assert (pulled["Architecture"], pulled.get("Variant", "")) == (platform.architecture, platform.variant)
        # the very image that was built, layers and config
        assert pulled["Id"] == inspect_image(images.ref(platform))["Id"], platform.name


@emulated
def test_plan_under_qemu(images: Images, platform: Platform) -> None:
    proc = images.run(platform, "-e", "TS_TEST_FAKE_NETFILTER=true", "-e", "TS_USERSPACE=false", "-e",
                      "TS_DEST_IP=10.0.0.5", "--", "plan", "--tailnet-ip", "100.64.0.1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dnat 100.64.0.1 -> 10.0.0.5" in proc.stdout.splitlines(), proc.stdout


@emulated
def test_detect_fails_in_one_line_under_qemu(images: Images, platform: Platform) -> None:
    proc = images.run(platform, "--cap-add", "NET_ADMIN", "--", "detect")
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, (proc.returncode, lines)
    # libnftables calls exit(3) when the netlink socket cannot be opened; the binding path asks the kernel
    # for that socket first, so containerboot says why itself.
    assert proc.returncode == 1 and lines[0].startswith("boot: ") and "no usable netfilter backend" in lines[0], lines


@emulated
def test_detect_with_nft_cli_fails_in_one_line_under_qemu(images: Images, platform: Platform) -> None:
    proc = images.run(platform, "--cap-add", "NET_ADMIN", "-e", "CONTAINERBOOT_NFT=cli", "--", "detect")
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, lines)
    assert "no usable netfilter backend" in lines[0], lines


@emulated
def test_sysctl_under_qemu(images: Images, platform: Platform) -> None:
    proc = images.run(platform, "--cap-add", "NET_ADMIN", "--security-opt", "systempaths=unconfined", "--", "-c",
                      "sysctl -w net.ipv4.ip_forward=1 && cat /proc/sys/net/ipv4/ip_forward", entrypoint="/bin/sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split("\n")[:2] == ["net.ipv4.ip_forward = 1", "1"], proc.stdout


@emulated
def test_userspace_boot_under_qemu_joins_and_serves_socks5(images: Images, peer: str, platform: Platform) -> None:
    lab = images.lab
    start = time.monotonic()
    node = lab.run(f"socks-{platform.token}", image=images.ref(platform), platform=platform.name,
                   env=lab.node_env(TS_SOCKS5_SERVER="localhost:1055"))
    lab.tailnet_ip(node, 120)
    joined = time.monotonic() - start
    assert docker("exec", node, "uname", "-m").stdout.strip() == platform.machine
    got = wait_for(lambda: docker("exec", node, "python3", "-c", SOCKS5_FETCH, peer, "8080",
                                  check=False).stdout.strip(), 60, 1)
    assert got.startswith("backend "), f"{got!r}\n{lab.logs(node)}"
    logs = lab.logs(node)
    assert "Startup complete, waiting for shutdown signal" in logs and "tskey-" not in logs, logs
    print(f"\n{platform.name} under qemu: container start to Running with an address {joined:.1f} s")
