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

from tests.conftest import need_root, python_exe
from tests.lab.netns import Lab
from tests.lab.topology import ADDR, Topology

BACKENDS = [("iptables", ""), ("nftables", "binding"), ("nftables", "cli")]


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
