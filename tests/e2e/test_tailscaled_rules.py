"""tailscaled's own chains removed under it (a whole-ruleset flush), against real tailscaled and headscale:
containerboot notices, restarts tailscaled in-process, and the masquerade tailscaled owns is back.

The backend behind the proxy answers with the address it sees: the proxy's LAN address while tailscaled's
ts-postrouting masquerades forwarded tailnet traffic, the client's tailnet address when that chain is gone
and only our DNAT is there. So "backend 198.18.<n>.1" again after the flush shows tailscaled's rules back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.scrape import one, scrape
from tests.lab.tailnet import Node, Tailnet
from tests.lab.tailnet_boot import Booted, site
from tests.lab.wait import wait_for

pytestmark = pytest.mark.e2e

FLUSH = {
    "nftables": ["nft flush ruleset"],
    # What an iptables firewall reload does to the legacy tables: every chain flushed, every user chain deleted.
    "iptables": [f"{exe} -t {table} -{op}" for exe in ("iptables-legacy", "ip6tables-legacy")
                 for table in ("filter", "nat") for op in ("F", "X")],
}


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_a_flushed_ruleset_brings_tailscaled_rules_back(net: Tailnet, client: Node, boot: Callable[..., Booted],
                                                        backend: str, tmp_path: Path) -> None:
    ns, _, n = site(net, "tsr")
    proxy = boot(ns, f"tsr{n}", TS_USERSPACE="false", TS_DEST_IP=f"198.18.{n}.2", TS_DEBUG_FIREWALL_MODE=backend,
                 TS_STATE_DIR=str(tmp_path), TS_ENABLE_METRICS="true", TS_LOCAL_ADDR_PORT="127.0.0.1:9002")
    url, masqueraded = f"http://{proxy.ip()}:8080/", f"backend 198.18.{n}.1"
    ip = proxy.ip()
    assert net.wait_fetch(client.ns, url, masqueraded) == masqueraded

    proxy.run.wait_contains("watching tailscaled's netfilter chains: ", timeout=10)  # a removal counts from here
    flushed = time.monotonic()
    for cmd in FLUSH[backend]:
        net.lab.run(ns, *cmd.split())
    proxy.run.wait_contains("tailscaled's own netfilter chains were removed (", timeout=10)
    back = proxy.run.wait_contains("tailscaled's netfilter chains are back (", timeout=60)
    assert net.wait_fetch(client.ns, url, masqueraded, timeout=30) == masqueraded
    took = time.monotonic() - flushed
    print(f"\n{backend}: flush -> traffic masqueraded again in {took:.1f}s; {back.split('back (')[1]}")

    assert proxy.ip() == ip  # the same node: its state directory brought it back as itself
    assert proxy.run.output.count("Starting tailscaled") == 2
    m = wait_for(lambda: scrape(net, ns)[0], 10)
    assert m and one(m, "containerboot_tailscaled_restarts_total") == 1
    assert one(m, "containerboot_drift_repairs_total") == 1  # our own rules were put back by us, once
    listing = net.lab.run(ns, "nft", "list", "ruleset").stdout if backend == "nftables" else \
        net.lab.run(ns, "iptables-legacy-save").stdout
    assert "ts-postrouting" in listing and ("containerboot" in listing or "CONTAINERBOOT" in listing)
