"""The image that build_docker.sh makes, run with `docker run` as users run it.

headscale runs as a container (an image made from the pinned Go binary the same way), a web server as
another, on a Docker network in 198.18.0.0/15. The base image is the offline one scripts/base-image.sh
makes from Debian's packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, need
from tests.lab.fakes import wait_for
from tests.lab.tailnet import binaries, have_binaries, write_control_files

pytestmark = pytest.mark.docker

IMAGE = "containerboot-test:test"
HEADSCALE_IMAGE = "containerboot-test-headscale:test"
NET_PREFIX = "198.18.200"
CONTROL_IP = f"{NET_PREFIX}.2"
BACKEND_IP = f"{NET_PREFIX}.3"
NAME = f"cbt{os.getpid()}"

SOCKS5_FETCH = r"""
import socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", 1055), timeout=10)
s.sendall(b"\x05\x01\x00"); assert s.recv(2) == b"\x05\x00"
s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
reply = s.recv(10); assert reply[1] == 0, reply
s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.split(b"\r\n\r\n", 1)[1].decode().strip())
"""

FETCH = ("import sys, urllib.request; "
         "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())")


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


class Lab:
    def __init__(self, lab_dir: Path, size_line: str) -> None:
        self.dir = lab_dir
        self.size_line = size_line
        self.build_log = ""
        self.network = f"{NAME}-net"
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def run(self, name: str, *args: str, image: str = IMAGE, env: dict[str, str] | None = None,
            command: tuple[str, ...] = (), mount: str = "ro") -> str:
        full = f"{NAME}-{name}"
        env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        docker("run", "-d", "--name", full, "--network", self.network, "-v", f"{self.dir}:/lab:{mount}", *env_args,
               *args, image, *command)
        self.containers.append(full)
        return full

    def hs(self, *args: str) -> str:
        return docker("exec", f"{NAME}-hs", "headscale", "-c", "/lab/headscale.yaml", *args).stdout

    def authkey(self, reusable: bool = True) -> str:
        out = self.hs("preauthkeys", "create", "--user", "1", "--expiration", "1h",
                      *(["--reusable"] if reusable else []), "-o", "json")
        return str(json.loads(out)["key"])

    def node_env(self, **extra: str) -> dict[str, str]:
        return {"TS_AUTHKEY": self.authkey(), "TS_EXTRA_ARGS": f"--login-server=https://{CONTROL_IP}",
                "SSL_CERT_FILE": "/lab/control.crt", "TS_NO_LOGS_NO_SUPPORT": "true", **extra}

    def status(self, container: str) -> dict[str, Any]:
        proc = docker("exec", container, "tailscale", "status", "--json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else {}

    def tailnet_ip(self, container: str, timeout: float = 60) -> str:
        def ip() -> str | None:
            st = self.status(container)
            if st.get("BackendState") != "Running":
                return None
            return next((a for a in st.get("Self", {}).get("TailscaleIPs") or [] if "." in a), None)
        found = wait_for(ip, timeout, 0.5)
        assert found, f"{container} did not join:\n{self.logs(container)}"
        return str(found)

    def logs(self, container: str) -> str:
        proc = docker("logs", container, check=False)
        return proc.stdout + proc.stderr

    def inspect(self, container: str) -> dict[str, Any]:
        return dict(json.loads(docker("inspect", container).stdout)[0])

    def close(self) -> None:
        for c in self.containers:
            docker("rm", "-f", c, check=False)
        for v in self.volumes:
            docker("volume", "rm", "-f", v, check=False)
        docker("network", "rm", self.network, check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    need(shutil.which("docker") is not None and docker("info", check=False).returncode == 0,
         "needs a Docker engine (scripts/docker-engine.sh)")
    need(have_binaries(), "needs headscale: run scripts/build-go.sh")
    base = subprocess.run([str(ROOT / "scripts/base-image.sh")], capture_output=True, text=True, check=True)
    build = subprocess.run([str(ROOT / "build_docker.sh")], capture_output=True, text=True,
                           env={**os.environ, "BASE": base.stdout.strip(), "REPOS": "containerboot-test",
                                "TAGS": "test", "PUSH": "false"})
    assert build.returncode == 0, build.stdout + build.stderr
    assert build.stdout.split() == [IMAGE]
    size_line = next(line for line in build.stderr.splitlines() if line.startswith("image size: "))
    print(f"\n{IMAGE}: {size_line}")

    ctx = Path(tempfile.mkdtemp(prefix="cbhs"))
    shutil.copy(binaries()["headscale"], ctx / "headscale")
    (ctx / "Dockerfile").write_text(f"FROM {base.stdout.strip()}\nCOPY headscale /usr/local/bin/headscale\n"
                                    'ENTRYPOINT ["/usr/local/bin/headscale"]\n')
    docker("build", "-q", "-t", HEADSCALE_IMAGE, str(ctx))
    shutil.rmtree(ctx)

    lab_dir = Path(tempfile.mkdtemp(prefix="cbdock"))
    lab_dir.chmod(0o755)
    write_control_files(lab_dir, CONTROL_IP, paths_in="/lab")
    shutil.copy(ROOT / "tests/lab/echo_server.py", lab_dir / "echo_server.py")
    for f in lab_dir.iterdir():
        f.chmod(0o644)
    result = Lab(lab_dir, size_line)
    result.build_log = build.stderr
    try:
        docker("network", "create", "--subnet", f"{NET_PREFIX}.0/24", result.network)
        result.run("hs", "--ip", CONTROL_IP, image=HEADSCALE_IMAGE, command=("serve", "-c", "/lab/headscale.yaml"),
                   mount="rw")
        assert wait_for(lambda: docker("exec", f"{NAME}-hs", "headscale", "-c", "/lab/headscale.yaml", "users",
                                       "list", check=False).returncode == 0, 30), result.logs(f"{NAME}-hs")
        result.hs("users", "create", "lab")
        result.run("backend", "--ip", BACKEND_IP, "--entrypoint", "python3",
                   command=("/lab/echo_server.py", "backend", "0.0.0.0", "8080"))
        yield result
    finally:
        result.close()
        shutil.rmtree(lab_dir, ignore_errors=True)


def kernel_args() -> list[str]:
    return ["--cap-add", "NET_ADMIN", "--device", "/dev/net/tun", "--sysctl", "net.ipv4.ip_forward=1",
            "--sysctl", "net.ipv6.conf.all.forwarding=1"]


def test_image_reports_its_size(lab: Lab) -> None:
    size_mb = int(lab.size_line.split()[2])
    assert size_mb > 0


def test_proxy_in_front_of_a_service(lab: Lab) -> None:
    proxy = lab.run("proxy", *kernel_args(), env=lab.node_env(TS_USERSPACE="false", TS_DEST_IP=BACKEND_IP))
    client = lab.run("client", *kernel_args(), env=lab.node_env(TS_USERSPACE="false"))
    proxy_ip = lab.tailnet_ip(proxy)
    lab.tailnet_ip(client)
    got = wait_for(lambda: docker("exec", client, "python3", "-c", FETCH, f"http://{proxy_ip}:8080/",
                                  check=False).stdout.strip(), 30, 0.5)
    assert got.startswith("backend "), f"{got!r}\n{lab.logs(proxy)}"
    logs = lab.logs(proxy)
    assert "Startup complete, waiting for shutdown signal" in logs
    assert "tskey-" not in logs


def test_userspace_socks5_without_capabilities(lab: Lab) -> None:
    target = lab.run("proxy2", *kernel_args(), env=lab.node_env(TS_USERSPACE="false", TS_DEST_IP=BACKEND_IP))
    us = lab.run("socks", env=lab.node_env(TS_SOCKS5_SERVER="localhost:1055"))
    target_ip = lab.tailnet_ip(target)
    lab.tailnet_ip(us)
    caps = lab.inspect(us)["HostConfig"]
    assert not caps.get("CapAdd") and not caps.get("Devices") and not caps.get("Privileged")
    got = wait_for(lambda: docker("exec", us, "python3", "-c", SOCKS5_FETCH, target_ip, "8080",
                                  check=False).stdout.strip(), 30, 0.5)
    assert got.startswith("backend "), f"{got!r}\n{lab.logs(us)}"


def test_stop_restart_with_state_volume_and_health(lab: Lab) -> None:
    volume = f"{NAME}-state"
    docker("volume", "create", volume)
    lab.volumes.append(volume)
    state = ["-v", f"{volume}:/var/lib/tailscale"]
    env = lab.node_env(TS_STATE_DIR="/var/lib/tailscale", TS_AUTHKEY=lab.authkey(reusable=False))
    first = lab.run("keep1", *state, env=env)
    ip = lab.tailnet_ip(first)
    assert wait_for(lambda: lab.inspect(first)["State"]["Health"]["Status"] == "healthy", 30, 0.5), \
        lab.inspect(first)["State"]["Health"]
    nodes = len(json.loads(lab.hs("nodes", "list", "-o", "json")))
    start = time.monotonic()
    docker("stop", first)
    stopped = time.monotonic() - start
    assert lab.inspect(first)["State"]["ExitCode"] == 0 and stopped < 10, (stopped, lab.logs(first))

    env.pop("TS_AUTHKEY")
    second = lab.run("keep2", *state, env=env)
    assert lab.tailnet_ip(second) == ip
    assert len(json.loads(lab.hs("nodes", "list", "-o", "json"))) == nodes
    assert "--authkey" not in lab.logs(second)


def test_operator_init_container_runs_sysctl(lab: Lab) -> None:
    # The operator's `sysctler` init container runs `sysctl -w net.ipv4.ip_forward=1` with the proxy image,
    # privileged. --privileged fails on this machine, so the writable /proc/sys comes from systempaths.
    proc = docker("run", "--rm", "--cap-add", "NET_ADMIN", "--security-opt", "systempaths=unconfined",
                  "--network", lab.network, "--entrypoint", "/bin/sh", IMAGE, "-c",
                  "sysctl -w net.ipv4.ip_forward=1 && cat /proc/sys/net/ipv4/ip_forward", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split("\n")[:2] == ["net.ipv4.ip_forward = 1", "1"], proc.stdout


def test_old_manifests_entrypoint_run_sh(lab: Lab) -> None:
    # Manifests written for older images start /tailscale/run.sh; it must be the same program.
    link = docker("run", "--rm", "--entrypoint", "readlink", IMAGE, "-f", "/tailscale/run.sh").stdout.strip()
    assert link == "/usr/local/bin/containerboot"
    proc = docker("run", "--rm", "-e", "TS_BOOT_TIMEOUT=bogus", "--entrypoint", "/tailscale/run.sh", IMAGE,
                  check=False)
    assert proc.returncode == 1
    assert "TS_BOOT_TIMEOUT" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_image_is_under_100_mb_and_prints_its_layers(lab: Lab) -> None:
    # build_docker.sh prints each layer's size, then the total; the image carries only what runs.
    assert int(lab.size_line.split()[2]) < 100, lab.size_line
    layers = lab.build_log.split(f"layers of {IMAGE} (linux/", 1)[1].split("image size:", 1)[0]
    names = [line.split()[-1] for line in layers.strip().splitlines()[1:]]
    assert names == ["system", "tailscaled", "containerboot"], lab.build_log


def test_image_carries_both_netfilter_variants_and_no_package_manager(lab: Lab) -> None:
    script = ("iptables-legacy -V && iptables-nft -V && ip6tables-legacy -V && ip6tables-nft -V && iptables -V && "
              "nft -V | head -n 1 && ip -V && python3 -c 'import nftables, ssl; print(ssl.OPENSSL_VERSION)' && "
              "if command -v apt-get || command -v dpkg; then exit 1; fi")
    proc = docker("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", IMAGE, "-c", script, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert out[:5] == ["iptables v1.8.9 (legacy)", "iptables v1.8.9 (nf_tables)", "ip6tables v1.8.9 (legacy)",
                       "ip6tables v1.8.9 (nf_tables)", "iptables v1.8.9 (nf_tables)"], out
    assert out[5].startswith("nftables v") and out[6].startswith("ip utility") and out[7].startswith("OpenSSL"), out


def test_boot_writes_no_bytecode(lab: Lab) -> None:
    # The image has the bytecode of every module a boot imports (kernel mode: detection, both drivers'
    # modules, the health endpoint): a module without it would be compiled and written at run time.
    node = lab.run("pyc", *kernel_args(), env=lab.node_env(TS_USERSPACE="false", TS_DEST_IP=BACKEND_IP,
                                                           TS_ENABLE_HEALTH_CHECK="true"))
    lab.tailnet_ip(node)
    assert wait_for(lambda: "Startup complete" in lab.logs(node), 30, 0.5), lab.logs(node)
    docker("exec", node, "python3", "-c", FETCH, "http://127.0.0.1:9002/healthz")
    # The HEALTHCHECK command with the endpoint on [::]: it asks 127.0.0.1 (a container often has no IPv6).
    assert "answered 200" in docker("exec", node, "containerboot", "healthcheck").stdout
    docker("exec", node, "containerboot", "status")
    written = [line for line in docker("diff", node).stdout.splitlines() if line.endswith((".pyc", "__pycache__"))]
    assert not written, written
