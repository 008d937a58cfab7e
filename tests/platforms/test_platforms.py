"""The linux/arm64 image, run on this amd64 machine under qemu-user, and the two-platform manifest list.

One build_docker.sh run makes both platforms (PLATFORM=linux/amd64,linux/arm64) from the offline bases of
scripts/base-image.sh and, with PUSH=true, pushes them and their manifest list to a registry on 127.0.0.1
(Debian's docker-registry); pulls by platform must give each architecture's image. The arm64 image is
then run under emulation (binfmt_misc with qemu-aarch64, scripts/qemu-binfmt.sh): the plan, detection,
a userspace boot that joins headscale and serves SOCKS5, and the operator's sysctl init container.

qemu-user refuses netfilter's netlink socket and legacy iptables' socket options, so no rule is ever
installed here: kernel mode on arm64 is left to real arm64 machines. headscale, the web backend and the
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
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, need
from tests.docker.test_image import SOCKS5_FETCH, docker, kernel_args
from tests.lab.fakes import wait_for
from tests.lab.tailnet import binaries, have_binaries, write_control_files

pytestmark = pytest.mark.docker

ARM64 = "linux/arm64"
NET_PREFIX = "198.18.201"
CONTROL_IP = f"{NET_PREFIX}.2"
BACKEND_IP = f"{NET_PREFIX}.3"
NAME = f"cba{os.getpid()}"
HEADSCALE_IMAGE = "containerboot-test-headscale:arm64-lab"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


class Lab:
    """headscale and a web backend on a Docker network, the images of both platforms, the registry."""

    def __init__(self, lab_dir: Path, registry: Registry, build: subprocess.CompletedProcess[str]) -> None:
        self.dir = lab_dir
        self.registry = registry
        self.build = build
        self.repo = f"{registry.host}/containerboot-test"
        self.amd64, self.arm64 = f"{self.repo}:test-amd64", f"{self.repo}:test-arm64"
        self.network = f"{NAME}-net"
        self.containers: list[str] = []
        self.images: list[str] = [self.amd64, self.arm64]

    def run(self, name: str, *args: str, image: str, env: dict[str, str] | None = None,
            command: tuple[str, ...] = (), mount: str = "ro") -> str:
        full = f"{NAME}-{name}"
        env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        docker("run", "-d", "--name", full, "--network", self.network, "-v", f"{self.dir}:/lab:{mount}", *env_args,
               *args, image, *command)
        self.containers.append(full)
        return full

    def hs(self, *args: str) -> str:
        return docker("exec", f"{NAME}-hs", "headscale", "-c", "/lab/headscale.yaml", *args).stdout

    def node_env(self, **extra: str) -> dict[str, str]:
        out = self.hs("preauthkeys", "create", "--user", "1", "--expiration", "1h", "--reusable", "-o", "json")
        return {"TS_AUTHKEY": str(json.loads(out)["key"]), "TS_EXTRA_ARGS": f"--login-server=https://{CONTROL_IP}",
                "SSL_CERT_FILE": "/lab/control.crt", "TS_NO_LOGS_NO_SUPPORT": "true", **extra}

    def tailnet_ip(self, container: str, timeout: float) -> str:
        def ip() -> str | None:
            proc = docker("exec", container, "tailscale", "status", "--json", check=False)
            st = json.loads(proc.stdout) if proc.returncode == 0 else {}
            if st.get("BackendState") != "Running":
                return None
            return next((a for a in st.get("Self", {}).get("TailscaleIPs") or [] if "." in a), None)
        found = wait_for(ip, timeout, 1)
        assert found, f"{container} did not join:\n{self.logs(container)}"
        return str(found)

    def logs(self, container: str) -> str:
        proc = docker("logs", container, check=False)
        return proc.stdout + proc.stderr

    def close(self) -> None:
        for c in self.containers:
            docker("rm", "-f", c, check=False)
        docker("network", "rm", self.network, check=False)
        for image in self.images:
            docker("rmi", image, check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    need(shutil.which("docker") is not None and docker("info", check=False).returncode == 0,
         "needs a Docker engine (scripts/docker-engine.sh)")
    need(have_binaries(), "needs headscale: run scripts/build-go.sh")
    need(os.geteuid() == 0, "needs root to register qemu with binfmt_misc")
    need(Path("/usr/lib/binfmt.d/qemu-aarch64.conf").exists() and shutil.which("docker-registry") is not None,
         "needs qemu-user-static and docker-registry (scripts/install-deps.sh)")
    subprocess.run([str(ROOT / "scripts/qemu-binfmt.sh"), "arm64"], check=True)
    base = subprocess.run([str(ROOT / "scripts/base-image.sh")], capture_output=True, text=True, check=True)
    start = time.monotonic()
    subprocess.run([str(ROOT / "scripts/base-image.sh"), ARM64], capture_output=True, text=True, check=True)
    print(f"\narm64 base image: {time.monotonic() - start:.0f} s")

    registry = Registry()
    lab_dir = Path(tempfile.mkdtemp(prefix="cbarm"))
    try:
        start = time.monotonic()
        build = subprocess.run([str(ROOT / "build_docker.sh")], capture_output=True, text=True,
                               env={**os.environ, "PLATFORM": "linux/amd64,linux/arm64",
                                    "BASE": "containerboot-base:bookworm-{arch}",
                                    "REPOS": f"{registry.host}/containerboot-test", "TAGS": "test", "PUSH": "true"})
        assert build.returncode == 0, build.stdout + build.stderr
        print(f"two-platform build and push: {time.monotonic() - start:.0f} s")
        print("\n".join(line for line in build.stderr.splitlines() if line.startswith(("image size", "layers", "  "))))
        result = Lab(lab_dir, registry, build)

        ctx = Path(tempfile.mkdtemp(prefix="cbhs"))
        shutil.copy(binaries()["headscale"], ctx / "headscale")
        (ctx / "Dockerfile").write_text(f"FROM {base.stdout.strip()}\nCOPY headscale /usr/local/bin/headscale\n"
                                        'ENTRYPOINT ["/usr/local/bin/headscale"]\n')
        docker("build", "-q", "-t", HEADSCALE_IMAGE, str(ctx))
        shutil.rmtree(ctx)

        lab_dir.chmod(0o755)
        write_control_files(lab_dir, CONTROL_IP, paths_in="/lab")
        shutil.copy(ROOT / "tests/lab/echo_server.py", lab_dir / "echo_server.py")
        for f in lab_dir.iterdir():
            f.chmod(0o644)
        docker("network", "create", "--subnet", f"{NET_PREFIX}.0/24", result.network)
        result.run("hs", "--ip", CONTROL_IP, image=HEADSCALE_IMAGE, command=("serve", "-c", "/lab/headscale.yaml"),
                   mount="rw")
        assert wait_for(lambda: docker("exec", f"{NAME}-hs", "headscale", "-c", "/lab/headscale.yaml", "users",
                                       "list", check=False).returncode == 0, 30), result.logs(f"{NAME}-hs")
        result.hs("users", "create", "lab")
        result.run("backend", "--ip", BACKEND_IP, "--entrypoint", "python3", image=result.amd64,
                   command=("/lab/echo_server.py", "backend", "0.0.0.0", "8080"))
        yield result
        result.close()
    finally:
        registry.close()
        shutil.rmtree(lab_dir, ignore_errors=True)


def run_arm64(lab: Lab, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    """`docker run` of the arm64 image without a network; args: docker options, "--", the command's arguments."""
    split = args.index("--") if "--" in args else len(args)
    extra = ["--entrypoint", entrypoint] if entrypoint else []
    return docker("run", "--rm", "--platform", ARM64, "--network", "none", *extra, *args[:split], lab.arm64,
                  *args[split + 1:], check=False)


def inspect_image(ref: str) -> dict[str, Any]:
    return dict(json.loads(docker("image", "inspect", ref).stdout)[0])


def test_both_images_built_small_and_for_their_platform(lab: Lab) -> None:
    sizes = {line.rsplit(" ", 1)[1]: int(line.split()[2]) for line in lab.build.stderr.splitlines()
             if line.startswith("image size: ")}
    assert sizes.keys() == {"linux/amd64", "linux/arm64"} and all(s < 100 for s in sizes.values()), sizes
    assert lab.build.stdout.split() == [lab.amd64, lab.arm64]
    assert inspect_image(lab.arm64)["Architecture"] == "arm64"
    assert inspect_image(lab.amd64)["Architecture"] == "amd64"
    assert run_arm64(lab, "--", "-m", entrypoint="uname").stdout.strip() == "aarch64"


def test_manifest_list_pulls_each_platform(lab: Lab) -> None:
    ref = f"{lab.repo}:test"
    listing = json.loads(docker("manifest", "inspect", "--insecure", ref).stdout)
    platforms = sorted(f"{m['platform']['os']}/{m['platform']['architecture']}" for m in listing["manifests"])
    assert platforms == ["linux/amd64", "linux/arm64"], listing
    lab.images.append(ref)
    for platform, local in (("linux/arm64", lab.arm64), ("linux/amd64", lab.amd64)):
        docker("pull", "-q", "--platform", platform, ref)
        pulled = inspect_image(ref)
        assert pulled["Architecture"] == platform.split("/")[1]
        assert pulled["Id"] == inspect_image(local)["Id"]  # the very image that was built, layers and config


def test_plan_under_qemu(lab: Lab) -> None:
    proc = run_arm64(lab, "-e", "TS_TEST_FAKE_NETFILTER=true", "-e", "TS_USERSPACE=false", "-e",
                     "TS_DEST_IP=10.0.0.5", "--", "plan", "--tailnet-ip", "100.64.0.1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dnat 100.64.0.1 -> 10.0.0.5" in proc.stdout.splitlines(), proc.stdout


def test_detect_fails_in_one_line_under_qemu(lab: Lab) -> None:
    proc = run_arm64(lab, "--cap-add", "NET_ADMIN", "--", "detect")
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, (proc.returncode, lines)
    # libnftables calls exit(3) when the netlink socket cannot be opened; the binding path asks the kernel
    # for that socket first, so containerboot says why itself.
    assert proc.returncode == 1 and lines[0].startswith("boot: ") and "no usable netfilter backend" in lines[0], lines


def test_detect_with_nft_cli_fails_in_one_line_under_qemu(lab: Lab) -> None:
    proc = run_arm64(lab, "--cap-add", "NET_ADMIN", "-e", "CONTAINERBOOT_NFT=cli", "--", "detect")
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, lines)
    assert "no usable netfilter backend" in lines[0], lines


def test_sysctl_in_the_arm64_image(lab: Lab) -> None:
    proc = run_arm64(lab, "--cap-add", "NET_ADMIN", "--security-opt", "systempaths=unconfined", "--", "-c",
                     "sysctl -w net.ipv4.ip_forward=1 && cat /proc/sys/net/ipv4/ip_forward", entrypoint="/bin/sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split("\n")[:2] == ["net.ipv4.ip_forward = 1", "1"], proc.stdout


def test_userspace_boot_under_qemu_joins_and_serves_socks5(lab: Lab) -> None:
    # The peer: the amd64 image as a kernel-mode proxy in front of the backend, natively.
    peer = lab.run("peer", *kernel_args(), image=lab.amd64,
                   env=lab.node_env(TS_USERSPACE="false", TS_DEST_IP=BACKEND_IP))
    start = time.monotonic()
    node = lab.run("socks", "--platform", ARM64, image=lab.arm64, env=lab.node_env(TS_SOCKS5_SERVER="localhost:1055"))
    peer_ip = lab.tailnet_ip(peer, 60)
    lab.tailnet_ip(node, 120)
    joined = time.monotonic() - start
    assert "aarch64" in docker("exec", node, "uname", "-m").stdout
    got = wait_for(lambda: docker("exec", node, "python3", "-c", SOCKS5_FETCH, peer_ip, "8080",
                                  check=False).stdout.strip(), 60, 1)
    assert got.startswith("backend "), f"{got!r}\n{lab.logs(node)}"
    logs = lab.logs(node)
    assert "Startup complete, waiting for shutdown signal" in logs and "tskey-" not in logs, logs
    print(f"\narm64 under qemu: container start to Running with an address {joined:.1f} s")
