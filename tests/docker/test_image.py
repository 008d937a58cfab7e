"""The image that build_docker.sh makes, run with `docker run` as users run it.

headscale runs as a container (an image made from the pinned Go binary the same way), a web server as
another, on a Docker network in 198.18.0.0/15 (the lab of tests/lab/images.py). The base image is the
offline one scripts/base-image.sh makes from Debian's packages.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from tests.lab.images import (
    FETCH,
    SOCKS5_FETCH,
    Build,
    Lab,
    base_image,
    build_image,
    docker,
    headscale_image,
    kernel_args,
    need_docker,
)
from tests.lab.wait import wait_for

pytestmark = pytest.mark.docker

REPO, TAG = "containerboot-test", "test"
IMAGE = f"{REPO}:{TAG}"
HEADSCALE_IMAGE = "containerboot-test-headscale:test"
SUBNET = "198.18.200.0/24"  # headscale .2, the backend .3 (tests/lab/images.py)
NAME = f"cbt{os.getpid()}"


@pytest.fixture(scope="module")
def build() -> Build:
    """The image, built with build_docker.sh from the offline base of this machine's platform."""
    need_docker()
    build = build_image(REPO, TAG, base=base_image())
    assert build.refs == [IMAGE], build.refs
    assert len(build.size_lines) == 1, build.log
    print(f"\n{IMAGE}: {build.size_lines[0]}")
    return build


@pytest.fixture(scope="module")
def lab(build: Build) -> Iterator[Lab]:
    """headscale and the web backend on the module's Docker network, removed afterwards with every
    container and volume the tests added."""
    with Lab(NAME, SUBNET, IMAGE, headscale_image(base_image(), HEADSCALE_IMAGE)) as result:
        yield result


def test_image_reports_its_size(build: Build) -> None:
    size_mb = int(build.size_lines[0].split()[2])
    assert size_mb > 0


def test_proxy_in_front_of_a_service(lab: Lab) -> None:
    proxy = lab.run("proxy", *kernel_args(), env=lab.node_env(TS_USERSPACE="false", TS_DEST_IP=lab.backend_ip))
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
    target = lab.run("proxy2", *kernel_args(), env=lab.node_env(TS_USERSPACE="false", TS_DEST_IP=lab.backend_ip))
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


def test_image_is_under_100_mb_and_prints_its_layers(build: Build) -> None:
    # build_docker.sh prints each layer's size, then the total; the image carries only what runs.
    size_line = build.size_lines[0]
    assert int(size_line.split()[2]) < 100, size_line
    layers = build.log.split(f"layers of {IMAGE} (linux/", 1)[1].split("image size:", 1)[0]
    names = [line.split()[-1] for line in layers.strip().splitlines()[1:]]
    assert names == ["system", "tailscaled", "containerboot"], build.log


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
    node = lab.run("pyc", *kernel_args(), env=lab.node_env(TS_USERSPACE="false", TS_DEST_IP=lab.backend_ip,
                                                           TS_ENABLE_HEALTH_CHECK="true"))
    lab.tailnet_ip(node)
    assert wait_for(lambda: "Startup complete" in lab.logs(node), 30, 0.5), lab.logs(node)
    docker("exec", node, "python3", "-c", FETCH, "http://127.0.0.1:9002/healthz")
    # The HEALTHCHECK command with the endpoint on [::]: it asks 127.0.0.1 (a container often has no IPv6).
    assert "answered 200" in docker("exec", node, "containerboot", "healthcheck").stdout
    docker("exec", node, "containerboot", "status")
    written = [line for line in docker("diff", node).stdout.splitlines() if line.endswith((".pyc", "__pycache__"))]
    assert not written, written
