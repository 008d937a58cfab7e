"""Real rules, real packets: each driver's rules carry traffic between lab namespaces.

Topology (one set of namespaces per test):

  tnet  (tailnet peer 100.64.0.2 and egress target 100.64.0.7) --- tailscale0 [proxy] eth1 --- backend
  pod   (a container beside the proxy, 198.18.1.2)              --- eth0 [proxy]          (198.18.2.2)

Ingress: tnet fetches the proxy's tailnet address and reaches the backend only through the DNAT
that `containerboot apply` installed. Egress: the pod fetches the proxy's pod-side address and
reaches the tailnet target, arriving from the proxy's tailnet address (SNAT).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from tests.conftest import containerboot_exe, need_root, python_exe
from tests.lab.netns import Lab

BACKENDS = [("iptables", ""), ("nftables", "binding"), ("nftables", "cli")]
ADDR = {
    4: {"ts": "100.64.0.1", "ts_new": "100.64.0.3", "peer": "100.64.0.2", "target": "100.64.0.7",
        "pod_gw": "198.18.1.1", "pod": "198.18.1.2", "backend": "198.18.2.2"},
    6: {"ts": "fd7a:115c:a1e0::1", "ts_new": "fd7a:115c:a1e0::3", "peer": "fd7a:115c:a1e0::2",
        "target": "fd7a:115c:a1e0::7", "pod_gw": "fd18:1::1", "pod": "fd18:1::2", "backend": "fd18:2::2"},
}


class Topology:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.proxy, self.tnet, self.pod, self.backend = (lab.ns(n) for n in ("proxy", "tnet", "pod", "backend"))
        lab.link(self.proxy, "tailscale0", self.tnet, "eth0")
        lab.link(self.proxy, "eth0", self.pod, "eth0")
        lab.link(self.proxy, "eth1", self.backend, "eth0")
        lab.addr(self.proxy, "tailscale0", "100.64.0.1/10", "100.64.0.3/10",
                 "fd7a:115c:a1e0::1/48", "fd7a:115c:a1e0::3/48")
        lab.addr(self.tnet, "eth0", "100.64.0.2/10", "100.64.0.7/10", "fd7a:115c:a1e0::2/48", "fd7a:115c:a1e0::7/48")
        lab.addr(self.proxy, "eth0", "198.18.1.1/24", "fd18:1::1/64")
        lab.addr(self.pod, "eth0", "198.18.1.2/24", "fd18:1::2/64")
        lab.addr(self.proxy, "eth1", "198.18.2.1/24", "fd18:2::1/64")
        lab.addr(self.backend, "eth0", "198.18.2.2/24", "fd18:2::2/64")
        for ns, v4, v6 in ((self.pod, "198.18.1.1", "fd18:1::1"), (self.backend, "198.18.2.1", "fd18:2::1")):
            lab.route(ns, "default", v4)
            lab.route(ns, "default", v6)
        for fam in (4, 6):
            lab.serve(self.backend, "backend", ADDR[fam]["backend"])
            lab.serve(self.tnet, "target", ADDR[fam]["target"])

    def containerboot(self, *args: str, env: dict[str, str], check: bool = True) -> str:
        full = {"PATH": os.environ["PATH"], **env}
        proc = self.lab.run(self.proxy, containerboot_exe(), *args, env=full, check=check)
        return proc.stdout + proc.stderr

    def ruleset(self, backend: str) -> str:
        if backend == "nftables":
            return self.lab.run(self.proxy, "nft", "-s", "list", "ruleset").stdout
        return "".join(legacy_rules(self.lab.run(self.proxy, exe).stdout)
                       for exe in ("iptables-legacy-save", "ip6tables-legacy-save"))


def legacy_rules(save: str) -> str:
    """iptables-save output without comments, counters, or tables that hold nothing at all.

    (A legacy table, once instantiated in a namespace, cannot be removed from user space.)"""
    out = []
    for block in re.split(r"(?m)^(?=\*)", re.sub(r"(?m)^#.*\n", "", save)):
        block = re.sub(r"\[\d+:\d+\]", "", block)
        lines = [ln for ln in block.splitlines() if ln.strip()]
        empty = all(ln.startswith(("*", "COMMIT")) or re.fullmatch(r":[A-Z]+ ACCEPT ?", ln) for ln in lines)
        if not empty:
            out.append("\n".join(lines) + "\n")
    return "".join(out)


def mentions(text: str, addr: str) -> bool:
    return re.search(rf"(?<![\w.:]){re.escape(addr)}(?![\w.:])", text) is not None


def add_foreign_rule(topo: Topology, backend: str, fam: int) -> None:
    """A rule somebody else owns in nat PREROUTING, which flush must leave alone."""
    src = "198.18.9.9" if fam == 4 else "fd18:9::9"
    if backend == "iptables":
        exe = "iptables-legacy" if fam == 4 else "ip6tables-legacy"
        topo.lab.run(topo.proxy, exe, "-t", "nat", "-A", "PREROUTING", "-s", src, "-j", "ACCEPT")
    else:
        family = "ip" if fam == 4 else "ip6"
        script = (f"add table {family} nat\n"
                  f"add chain {family} nat PREROUTING {{ type nat hook prerouting priority dstnat; }}\n"
                  f"add rule {family} nat PREROUTING {family} saddr {src} counter accept\n")
        topo.lab.run(topo.proxy, "sh", "-c", f"printf '{script}' | nft -f -")


@pytest.fixture
def topo() -> Iterator[Topology]:
    need_root()
    lab = Lab("d")
    try:
        yield Topology(lab)
    finally:
        lab.close()


def _env(backend: str, path: str, **extra: str) -> dict[str, str]:
    env = {"TS_USERSPACE": "false", "TS_DEBUG_FIREWALL_MODE": backend, **extra}
    if path:
        env["CONTAINERBOOT_NFT"] = path
    return env


@pytest.mark.root
@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize(("backend", "path"), BACKENDS, ids=["iptables", "nft-binding", "nft-cli"])
def test_ingress_dnat_lifecycle(topo: Topology, backend: str, path: str, fam: int) -> None:
    a = ADDR[fam]
    env = _env(backend, path, TS_DEST_IP=a["backend"])
    add_foreign_rule(topo, backend, fam)
    before = topo.ruleset(backend)
    assert topo.lab.fetch(topo.tnet, a["ts"], source=a["peer"]) is None, "reachable before any rule was installed"

    topo.containerboot("apply", "--tailnet-ip", ADDR[4]["ts"], "--tailnet-ip", ADDR[6]["ts"], env=env)
    assert topo.lab.fetch(topo.tnet, a["ts"], source=a["peer"]) == f"backend {a['peer']}"
    once = topo.ruleset(backend)
    assert once != before

    topo.containerboot("apply", "--tailnet-ip", ADDR[4]["ts"], "--tailnet-ip", ADDR[6]["ts"], env=env)
    assert topo.ruleset(backend) == once, "a second apply of the same plan changed the ruleset"

    topo.containerboot("apply", "--tailnet-ip", ADDR[4]["ts_new"], "--tailnet-ip", ADDR[6]["ts_new"], env=env)
    moved = topo.ruleset(backend)
    assert mentions(moved, a["ts_new"]) and not mentions(moved, a["ts"])
    assert topo.lab.fetch(topo.tnet, a["ts_new"], source=a["peer"]) == f"backend {a['peer']}"
    assert topo.lab.fetch(topo.tnet, a["ts"], source=a["peer"]) is None, "the old tailnet address still forwards"

    status = topo.containerboot("status", env=env)
    assert f"dnat {a['ts_new']} -> {a['backend']}" in status

    topo.containerboot("flush", env=env)
    assert topo.ruleset(backend) == before
    assert topo.lab.fetch(topo.tnet, a["ts_new"], source=a["peer"]) is None


@pytest.mark.root
@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize(("backend", "path"), BACKENDS, ids=["iptables", "nft-binding", "nft-cli"])
def test_egress_dnat_and_snat(topo: Topology, backend: str, path: str, fam: int) -> None:
    a = ADDR[fam]
    env = _env(backend, path, TS_TAILNET_TARGET_IP=a["target"])
    before = topo.ruleset(backend)
    assert topo.lab.fetch(topo.pod, a["pod_gw"]) is None

    topo.containerboot("apply", "--tailnet-ip", ADDR[4]["ts"], "--tailnet-ip", ADDR[6]["ts"], env=env)
    # The target sees the proxy's tailnet address: the SNAT rule is live.
    assert topo.lab.fetch(topo.pod, a["pod_gw"]) == f"target {a['ts']}"
    # Traffic that arrives on tailscale0 is not redirected (iifname, not upstream's oifname).
    assert topo.lab.fetch(topo.tnet, a["ts"], source=a["peer"]) is None

    topo.containerboot("flush", env=env)
    assert topo.ruleset(backend) == before
    assert topo.lab.fetch(topo.pod, a["pod_gw"]) is None


@pytest.mark.root
@pytest.mark.parametrize(("backend", "path"), BACKENDS, ids=["iptables", "nft-binding", "nft-cli"])
def test_round_robin_dnat_reaches_every_backend(topo: Topology, backend: str, path: str) -> None:
    """A DNS-name ingress with two backends: both receive connections, through either renderer."""
    topo.lab.addr(topo.backend, "eth0", "198.18.2.3/24")
    topo.lab.serve(topo.backend, "second", "198.18.2.3")
    code = ("import ipaddress as I, sys; from firewall.detect import detect, make_driver;"
            "from firewall.model import Dnat, MssClamp, Plan;"
            "a = I.ip_address; d = detect(__import__('os').environ);"
            "make_driver(d).apply(Plan.of(Dnat(a('100.64.0.1'), (a('198.18.2.2'), a('198.18.2.3'))), MssClamp(4)))")
    topo.lab.run(topo.proxy, python_exe(), "-c", code, env={"PATH": os.environ["PATH"], **_env(backend, path)})
    seen = {topo.lab.fetch(topo.tnet, "100.64.0.1", source="100.64.0.2") for _ in range(6)}
    assert seen == {"backend 100.64.0.2", "second 100.64.0.2"}
