"""containerboot against real tailscaled and headscale, in lab namespaces (tests/lab/tailnet.py).

One control server and one client node serve the whole module; each test adds its own node(s).
Every containerboot run is checked at the end for the auth key in its output (tailscaled's
output included: containerboot passes it through).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.fakes import child_pid
from tests.lab.tailnet import Node, Tailnet, tailscale_ip
from tests.lab.tailnet_boot import READY, Booted, site
from tests.lab.wait import wait_for

pytestmark = pytest.mark.e2e


def rulesets(net: Tailnet, ns: str) -> tuple[str, str]:
    nft = net.lab.run(ns, "nft", "list", "ruleset").stdout
    legacy = net.lab.run(ns, "iptables-legacy-save").stdout + net.lab.run(ns, "ip6tables-legacy-save").stdout
    return nft, legacy


# ---- the seed's failing case: a proxy whose DNAT must land in the host's backend ---------------------


@pytest.mark.parametrize("mode", ["iptables", "nftables", "auto-with-legacy-rules"])
def test_proxy_in_each_backend(net: Tailnet, client: Node, boot: Callable[..., Booted], mode: str) -> None:
    ns, _, n = site(net, "proxy")
    env = {"TS_USERSPACE": "false", "TS_DEST_IP": f"198.18.{n}.2"}
    if mode == "auto-with-legacy-rules":
        # What Docker or kube-proxy on a legacy host leaves in the namespace; iptables -V here says nf_tables.
        net.lab.run(ns, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", "198.18.99.0/24", "-j", "MASQUERADE")
    else:
        env["TS_DEBUG_FIREWALL_MODE"] = mode
    proxy = boot(ns, f"proxy{n}", **env)
    want = "iptables" if mode != "nftables" else "nftables"
    proxy.run.wait_contains(f"firewall {want} ")
    if mode.startswith("auto"):
        proxy.run.wait_contains("only legacy holds rules here")
    got = net.wait_fetch(client.ns, f"http://{proxy.ip()}:8080/", f"backend 198.18.{n}.1")
    assert got == f"backend 198.18.{n}.1"  # tailscaled masquerades what it forwards from the tailnet
    nft, legacy = rulesets(net, ns)
    ours, theirs = ("CONTAINERBOOT-PREROUTING", "ts-forward") if want == "iptables" else ("table ip containerboot",
                                                                                            "chain ts-forward")
    both = legacy if want == "iptables" else nft
    other = nft if want == "iptables" else legacy
    assert ours in both and theirs in both, "our rules and tailscaled's must share the backend"
    assert "ts-forward" not in other and "containerboot" not in other.lower()


# ---- other modes --------------------------------------------------------------------------------------


def test_sidecar_in_the_apps_namespace(net: Tailnet, client: Node, boot: Callable[..., Booted]) -> None:
    ns, _, n = site(net, "app")
    net.lab.serve(ns, "app", "::")
    app = boot(ns, f"app{n}", TS_USERSPACE="false")
    c = tailscale_ip(net.status(client))
    assert net.wait_fetch(client.ns, f"http://{app.ip()}:8080/", f"app {c}") == f"app {c}"
    c6 = tailscale_ip(net.status(client), 6)
    assert net.wait_fetch(client.ns, f"http://[{app.ip(6)}]:8080/", f"app {c6}") == f"app {c6}"


def test_userspace_socks5_and_http_proxy(net: Tailnet, client: Node, boot: Callable[..., Booted]) -> None:
    ns, _, n = site(net, "us")
    node = boot(ns, f"us{n}", TS_SOCKS5_SERVER="127.0.0.1:1055", TS_OUTBOUND_HTTP_PROXY_LISTEN="127.0.0.1:1056")
    target = f"http://{tailscale_ip(net.status(client))}:8080/"
    me = node.ip()
    via_socks = wait_for(lambda: net.lab.run(ns, "curl", "-sS", "--max-time", "3", "--socks5-hostname",
                                             "127.0.0.1:1055", target, check=False).stdout.strip(), 20)
    assert via_socks == f"client {me}"
    via_http = net.lab.run(ns, "curl", "-sS", "--max-time", "5", "-x", "http://127.0.0.1:1056", target).stdout.strip()
    assert via_http == f"client {me}"
    assert "tailscale0" not in net.lab.run(ns, "ip", "link").stdout  # no kernel interface in userspace mode


def test_subnet_router(net: Tailnet, client: Node, boot: Callable[..., Booted]) -> None:
    ns, _, n = site(net, "router")
    boot(ns, f"router{n}", TS_USERSPACE="false", TS_ROUTES=f"198.18.{n}.0/24")
    net.approve_routes(f"router{n}", f"198.18.{n}.0/24")
    net.cli(client, "set", "--accept-routes")
    try:
        got = net.wait_fetch(client.ns, f"http://198.18.{n}.2:8080/", f"backend 198.18.{n}.1")
        assert got == f"backend 198.18.{n}.1"
        assert net.lab.run(ns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    finally:
        net.cli(client, "set", "--accept-routes=false")


@pytest.mark.parametrize("by", ["ip", "name"])
def test_egress_to_a_tailnet_node(net: Tailnet, client: Node, boot: Callable[..., Booted], by: str) -> None:
    ns, pod, n = site(net, "egress")
    target = {"TS_TAILNET_TARGET_IP": tailscale_ip(net.status(client))} if by == "ip" else \
        {"TS_TAILNET_TARGET_FQDN": "client.lab.test"}
    egress = boot(ns, f"egress{n}", TS_USERSPACE="false", **target)
    # The pod beside the proxy talks to the proxy's pod-side address and lands on the tailnet node.
    got = net.wait_fetch(pod, f"http://198.18.{n}.1:8080/", f"client {egress.ip()}")
    assert got == f"client {egress.ip()}"


def test_l7_ingress_by_serve_config(net: Tailnet, client: Node, boot: Callable[..., Booted], tmp_path: Path) -> None:
    ns, _, n = site(net, "serve")
    net.lab.serve(ns, "app", "127.0.0.1")
    host = f"serve{n}.lab.test"
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"TCP": {"80": {"HTTP": True}},
                               "Web": {f"{host}:80": {"Handlers": {"/": {"Proxy": "http://127.0.0.1:8080"}}}}}))
    node = boot(ns, f"serve{n}", TS_SERVE_CONFIG=str(cfg))
    node.run.wait_log("serve proxy: applying serve config")
    ip = node.ip()
    got = wait_for(lambda: net.lab.run(client.ns, "curl", "-sS", "--max-time", "3", "--resolve", f"{host}:80:{ip}",
                                       f"http://{host}/", check=False).stdout.strip(), 20)
    assert got == "app 127.0.0.1"


# ---- faults -------------------------------------------------------------------------------------------


def test_address_change_moves_the_rules(net: Tailnet, client: Node, boot: Callable[..., Booted]) -> None:
    ns, _, n = site(net, "move")
    proxy = boot(ns, f"move{n}", TS_USERSPACE="false", TS_DEST_IP=f"198.18.{n}.2")
    old = proxy.ip()
    assert net.wait_fetch(client.ns, f"http://{old}:8080/", f"backend 198.18.{n}.1")
    new = f"100.64.0.{200 + n % 50}"
    # Re-address the node in control's database while control is down; the node learns it on reconnect.
    net.stop_control()
    with sqlite3.connect(net.dir / "db.sqlite") as db:
        db.execute("UPDATE nodes SET ipv4 = ? WHERE given_name = ?", (new, f"move{n}"))
    net.start_control()
    proxy.run.wait_contains(f"rules live in nftables for {new}", timeout=60)
    assert net.wait_fetch(client.ns, f"http://{new}:8080/", f"backend 198.18.{n}.1") == f"backend 198.18.{n}.1"
    assert net.fetch(client.ns, f"http://{old}:8080/", timeout=2) is None
    nft, _ = rulesets(net, ns)
    assert old not in nft.split("table ip containerboot")[1].split("table")[0]


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_flushed_rules_come_back(net: Tailnet, client: Node, boot: Callable[..., Booted], backend: str) -> None:
    ns, _, n = site(net, "flush")
    proxy = boot(ns, f"flush{n}", TS_USERSPACE="false", TS_DEST_IP=f"198.18.{n}.2", TS_DEBUG_FIREWALL_MODE=backend)
    url = f"http://{proxy.ip()}:8080/"
    assert net.wait_fetch(client.ns, url, f"backend 198.18.{n}.1")
    proxy.run.wait_contains("watching tailscaled's netfilter chains: ", timeout=10)
    net.lab.run(ns, *(["nft", "flush", "ruleset"] if backend == "nftables" else ["iptables-legacy", "-t", "nat", "-F"]))
    flushed = time.monotonic()
    back = wait_for(lambda: (net.fetch(client.ns, url, timeout=1) or "").startswith("backend "), 8)
    assert back and time.monotonic() - flushed < 5.0
    proxy.run.wait_contains("firewall: rules changed outside containerboot")
    # tailscaled's own chains went too (its ts-postrouting is in the nat table); with its state in memory a
    # restart would make a new device, so containerboot keeps the node and says so (tests/e2e/test_tailscaled_rules
    # has the restart, with a state directory).
    proxy.run.wait_contains("not restarting tailscaled to put them back: its state is in memory", timeout=10)
    assert proxy.run.output.count("Starting tailscaled") == 1


def test_control_down_at_boot(net: Tailnet, client: Node, boot: Callable[..., Booted]) -> None:
    ns, _, n = site(net, "late")
    key = net.authkey()
    net.stop_control()
    try:
        proxy = boot(ns, f"late{n}", wait=False, TS_USERSPACE="false", TS_DEST_IP=f"198.18.{n}.2", TS_AUTHKEY=key)
        time.sleep(5)
        assert proxy.run.proc.poll() is None and not any(READY in ln for ln in proxy.run.lines)
    finally:
        net.start_control()
    proxy.run.wait_log(READY, timeout=50)
    assert net.wait_fetch(client.ns, f"http://{proxy.ip()}:8080/", f"backend 198.18.{n}.1")


def test_sigterm_exits_0_quickly(net: Tailnet, boot: Callable[..., Booted]) -> None:
    ns, _, n = site(net, "term")
    proxy = boot(ns, f"term{n}", TS_USERSPACE="false", TS_DEST_IP=f"198.18.{n}.2")
    start = time.monotonic()
    proxy.run.proc.send_signal(signal.SIGTERM)
    assert proxy.run.wait_exit(10) == 0 and time.monotonic() - start < 10
    assert "containerboot" not in net.lab.run(ns, "nft", "list", "tables").stdout


def test_tailscaled_sigkill_exits_nonzero(net: Tailnet, boot: Callable[..., Booted]) -> None:
    ns, _, n = site(net, "kill")
    proxy = boot(ns, f"kill{n}", TS_USERSPACE="false")
    os.kill(child_pid(proxy.run.proc.pid, "tailscaled"), signal.SIGKILL)
    assert proxy.run.wait_exit(10) == 128 + signal.SIGKILL
    proxy.run.wait_contains("tailscaled exited unexpectedly (killed by SIGKILL)")


def test_restart_with_state_dir_keeps_the_node(net: Tailnet, boot: Callable[..., Booted], tmp_path: Path) -> None:
    ns, _, n = site(net, "keep")
    state = tmp_path / "state"
    state.mkdir()
    before = len(net.nodes_json())
    first = boot(ns, f"keep{n}", TS_STATE_DIR=str(state), TS_AUTHKEY=net.authkey(reusable=False))
    ip, node_id = first.ip(), first.status()["Self"]["ID"]  # type: ignore[index]
    first.run.proc.send_signal(signal.SIGTERM)
    assert first.run.wait_exit(10) == 0
    second = boot(ns, f"keep{n}", TS_STATE_DIR=str(state), TS_AUTHKEY="")
    assert second.ip() == ip and second.status()["Self"]["ID"] == node_id  # type: ignore[index]
    assert len(net.nodes_json()) == before + 1
    assert "--authkey" not in second.run.output
