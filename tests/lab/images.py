"""Docker plumbing for the tests that run the containerboot image as users run it, with `docker run`.

A `Lab` is one user-defined Docker network in 198.18.0.0/15 holding headscale (its second address) and a
web backend (tests/lab/echo_server.py, answering "backend <client address>"; its third address), plus the
containers a test starts beside them, all named `<prefix>-<name>` so that several test modules (each with
its own prefix and subnet) can run on one engine at once. `close()` removes every container, volume and
network the lab made. The image under test may be of another platform (`platform`, given to `docker run
--platform`); headscale runs from an image of this machine's platform (`headscale_image`).

Also here: `docker()`, building images with build_docker.sh (`build_image`), the offline base images of
scripts/base-image.sh (`base_image`), and running a host program in a container's network namespace
(`in_netns`, through nsenter), which shows what the kernel holds independently of the image's own tools.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, need
from tests.lab.tailnet import binaries, have_binaries, write_control_files
from tests.lab.wait import wait_for

ECHO_SERVER = ROOT / "tests/lab/echo_server.py"

# Run with the image's python3: fetch a URL, print the body (echo_server.py's "<name> <client address>").
FETCH = ("import sys, urllib.request; "
         "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())")

# Run with the image's python3 beside a node serving SOCKS5 on 127.0.0.1:1055: GET / from HOST PORT.
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

# A container that only holds its namespaces: the images have no `sleep`, and PID 1 ignores SIGTERM, so
# `docker rm -f` ends it with SIGKILL at once.
IDLE = ("python3", "-c", "import signal; signal.pause()")


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def need_docker() -> None:
    """Skip (fail on CI) unless a Docker engine answers and headscale has been built."""
    need(shutil.which("docker") is not None and docker("info", check=False, timeout=60).returncode == 0,
         "needs a Docker engine (scripts/docker-engine.sh)")
    need(have_binaries(), "needs headscale: run scripts/build-go.sh")


def image_exists(ref: str) -> bool:
    return docker("image", "inspect", ref, check=False).returncode == 0


def inspect_image(ref: str) -> dict[str, Any]:
    return dict(json.loads(docker("image", "inspect", ref).stdout)[0])


# Prints "<path> <sha256>" for each module of the packages under the directory given, as the image lays them out.
_HASH_SOURCES = """
import hashlib, pathlib, sys
top = pathlib.Path(sys.argv[1])
for pkg in sys.argv[2:]:
    for f in sorted((top / pkg).glob("*.py")):
        print(f.relative_to(top), hashlib.sha256(f.read_bytes()).hexdigest())
"""
PACKAGES = ("containerboot", "firewall")
IMAGE_LIB = "/opt/containerboot/lib"  # where docker/Dockerfile puts them


def stale_sources(ref: str, platform: str | None = None) -> list[str]:
    """The project's modules whose copy in image `ref` differs from the work tree's (or is on one side only):
    an image built before a change to them tests the old code."""
    platform_args = ["--platform", platform] if platform else []
    proc = docker("run", "--rm", "--network", "none", *platform_args, "--entrypoint", "python3", ref, "-c",
                  _HASH_SOURCES, IMAGE_LIB, *PACKAGES)
    tree = subprocess.run([sys.executable, "-c", _HASH_SOURCES, str(ROOT), *PACKAGES], capture_output=True,
                          text=True, check=True)
    image, here = set(proc.stdout.splitlines()), set(tree.stdout.splitlines())
    return sorted({line.split()[0] for line in image ^ here})


def base_image(platform: str | None = None) -> str:
    """scripts/base-image.sh's offline Debian base for `platform` (default: this machine's); its reference."""
    argv = [str(ROOT / "scripts/base-image.sh"), *([platform] if platform else [])]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


@dataclass(frozen=True)
class Build:
    """One build_docker.sh run: the references it printed, its stderr (layers, sizes), how long it took."""

    refs: list[str]
    log: str
    seconds: float

    @property
    def size_lines(self) -> list[str]:
        """Its "image size: N MB (B bytes), <platform>" lines, one per image."""
        return [line for line in self.log.splitlines() if line.startswith("image size: ")]


def build_image(repos: str, tags: str, platform: str | None = None, base: str | None = None,
                push: bool = False) -> Build:
    """Run build_docker.sh with these parameters (see its header); a failed build fails the caller."""
    env = {**os.environ, "REPOS": repos, "TAGS": tags, "PUSH": "true" if push else "false"}
    if platform:
        env["PLATFORM"] = platform
    if base:
        env["BASE"] = base
    start = time.monotonic()
    proc = subprocess.run([str(ROOT / "build_docker.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"build_docker.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return Build(proc.stdout.split(), proc.stderr, time.monotonic() - start)


def headscale_image(base: str, ref: str) -> str:
    """An image of `base` with the pinned headscale binary (scripts/build-go.sh) as its entrypoint."""
    ctx = Path(tempfile.mkdtemp(prefix="cbhs"))
    try:
        shutil.copy(binaries()["headscale"], ctx / "headscale")
        (ctx / "Dockerfile").write_text(f"FROM {base}\nCOPY headscale /usr/local/bin/headscale\n"
                                        'ENTRYPOINT ["/usr/local/bin/headscale"]\n')
        docker("build", "-q", "-t", ref, str(ctx))
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    return ref


def kernel_args() -> list[str]:
    """`docker run` options of a kernel-mode proxy: NET_ADMIN, the TUN device, forwarding on."""
    return ["--cap-add", "NET_ADMIN", "--device", "/dev/net/tun", "--sysctl", "net.ipv4.ip_forward=1",
            "--sysctl", "net.ipv6.conf.all.forwarding=1"]


def container_pid(container: str) -> int:
    pid = int(docker("inspect", "--format", "{{.State.Pid}}", container).stdout.strip())
    assert pid > 0, f"{container} is not running"
    return pid


def in_netns(container: str, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a program of this machine (not the image's) in `container`'s network namespace."""
    proc = subprocess.run(["nsenter", "-n", "-t", str(container_pid(container)), *argv], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {container}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Lab:
    """headscale and a web backend on a Docker network; every container a test runs beside them.

    `subnet` is the network's (inside 198.18.0.0/15); `ip_range`, if given, is where Docker picks the
    addresses of containers started without --ip, so that fixed addresses outside it never collide;
    `subnet6`, if given, makes the network dual-stack (a ULA prefix, fd18::/16 by the labs' convention).
    `image` is the image under test (of `platform`, if given); the backend runs it too (its python3).
    """

    prefix: str
    subnet: str
    image: str
    headscale_image: str
    platform: str | None = None
    ip_range: str | None = None
    subnet6: str | None = None
    dir: Path = field(init=False)
    network: str = field(init=False)
    control_ip: str = field(init=False)
    backend_ip: str = field(init=False)
    containers: list[str] = field(init=False, default_factory=list)
    volumes: list[str] = field(init=False, default_factory=list)
    networks: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        self.control_ip, self.backend_ip = str(net[2]), str(net[3])
        self.network = f"{self.prefix}-net"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))

    # ---- life --------------------------------------------------------------------------------------------

    def start(self) -> Lab:
        """The network, headscale with one user ("lab"), and the backend on port 8080."""
        self.dir.chmod(0o755)
        write_control_files(self.dir, self.control_ip, paths_in="/lab")
        shutil.copy(ECHO_SERVER, self.dir / "echo_server.py")
        for f in self.dir.iterdir():
            f.chmod(0o644)
        self.create_network(self.network, self.subnet, self.ip_range, subnet6=self.subnet6)
        hs = self.run("hs", "--ip", self.control_ip, image=self.headscale_image,
                      command=("serve", "-c", "/lab/headscale.yaml"), mount="rw")
        assert wait_for(lambda: docker("exec", hs, "headscale", "-c", "/lab/headscale.yaml", "users", "list",
                                       check=False).returncode == 0, 30, 0.2), self.logs(hs)
        self.hs("users", "create", "lab")
        self.run("backend", "--ip", self.backend_ip, "--entrypoint", "python3",
                 command=("/lab/echo_server.py", "backend", "0.0.0.0", "8080"))
        return self

    def close(self) -> None:
        for c in self.containers:
            docker("rm", "-f", "-v", c, check=False)
        for v in self.volumes:
            docker("volume", "rm", "-f", v, check=False)
        for n in reversed(self.networks):
            docker("network", "rm", n, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- containers and networks -------------------------------------------------------------------------

    def name(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def create_network(self, name: str, subnet: str, ip_range: str | None = None, masquerade: bool = True,
                       subnet6: str | None = None) -> str:
        """A bridge network removed by close(), its gateway (the host) on the subnet's first address;
        `subnet6` makes it dual-stack. `masquerade=False`: the host does not rewrite the source of what
        leaves it for another network; with br_netfilter that includes packets a container forwards from it
        onto another bridge, which a container routing between two networks needs (the other end would
        answer the host instead)."""
        docker("network", "create", "--subnet", subnet, "--gateway", str(ipaddress.ip_network(subnet)[1]),
               *(["--ip-range", ip_range] if ip_range else []),
               *(["--ipv6", "--subnet", subnet6] if subnet6 else []),
               *([] if masquerade else ["-o", "com.docker.network.bridge.enable_ip_masquerade=false"]), name)
        self.networks.append(name)
        return name

    def run(self, name: str, *args: str, image: str | None = None, platform: str | None = None,
            env: dict[str, str] | None = None, command: tuple[str, ...] = (), mount: str = "ro",
            network: str | None = None) -> str:
        """`docker run -d` on the lab network with the lab directory at /lab; args are docker options.
        Without `image` it runs the image under test, on its platform."""
        full = self.name(name)
        if image is None:
            image, platform = self.image, platform or self.platform
        env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        platform_args = ["--platform", platform] if platform else []
        # Listed before the run, so that close() removes a container whose start failed too.
        self.containers.append(full)
        docker("run", "-d", "--name", full, "--network", network or self.network, "-v", f"{self.dir}:/lab:{mount}",
               *platform_args, *env_args, *args, image, *command)
        return full

    def exec(self, container: str, *argv: str, env: dict[str, str] | None = None, check: bool = False,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        return docker("exec", *env_args, container, *argv, check=check, timeout=timeout)

    def fetch(self, container: str, url: str) -> str:
        """GET `url` from inside `container` (its python3); the body, or "" when the request failed."""
        return self.exec(container, "python3", "-c", FETCH, url, timeout=30).stdout.strip()

    def logs(self, container: str) -> str:
        proc = docker("logs", container, check=False)
        return proc.stdout + proc.stderr

    def inspect(self, container: str) -> dict[str, Any]:
        return dict(json.loads(docker("inspect", container).stdout)[0])

    def health(self, container: str) -> str:
        """The HEALTHCHECK's State.Health.Status: starting, healthy or unhealthy ("" without one)."""
        return str((self.inspect(container)["State"].get("Health") or {}).get("Status", ""))

    # ---- the tailnet -------------------------------------------------------------------------------------

    def hs(self, *args: str) -> str:
        return docker("exec", self.name("hs"), "headscale", "-c", "/lab/headscale.yaml", *args).stdout

    def authkey(self, reusable: bool = True) -> str:
        out = self.hs("preauthkeys", "create", "--user", "1", "--expiration", "1h",
                      *(["--reusable"] if reusable else []), "-o", "json")
        return str(json.loads(out)["key"])

    def node_env(self, **extra: str) -> dict[str, str]:
        """A node's environment: a fresh auth key, headscale as the login server, its certificate trusted."""
        return {"TS_AUTHKEY": self.authkey(), "TS_EXTRA_ARGS": f"--login-server=https://{self.control_ip}",
                "SSL_CERT_FILE": "/lab/control.crt", "TS_NO_LOGS_NO_SUPPORT": "true", **extra}

    def status(self, container: str) -> dict[str, Any]:
        proc = docker("exec", container, "tailscale", "status", "--json", check=False)
        try:
            return dict(json.loads(proc.stdout)) if proc.returncode == 0 else {}
        except ValueError:
            return {}

    def tailnet_ip(self, container: str, timeout: float = 60) -> str:
        """The node's IPv4 tailnet address once it is Running; fails the test with its logs if it is not by
        `timeout`, or at once when the container has exited."""
        def ip() -> str | None:
            st = self.status(container)
            if st.get("BackendState") == "Running":
                return next((a for a in st.get("Self", {}).get("TailscaleIPs") or [] if "." in a), None)
            if not self.inspect(container)["State"]["Running"]:
                return "exited"
            return None
        found = wait_for(ip, timeout, 0.5)
        assert found and found != "exited", f"{container} did not join ({found or 'timeout'}):\n{self.logs(container)}"
        return str(found)
