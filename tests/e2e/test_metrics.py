"""containerboot's own metrics on /metrics (TS_ENABLE_METRICS), beside tailscaled's, against a real tailscaled
and headscale: parsed with prometheus_client's parser, and values that move as the node does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.scrape import one, scrape
from tests.lab.tailnet import Node, Tailnet
from tests.lab.tailnet_boot import Booted, site
from tests.lab.wait import wait_for

pytestmark = pytest.mark.e2e

ADDR = "127.0.0.1:9002"


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_kernel_mode_metrics_move(net: Tailnet, client: Node, boot: Callable[..., Booted], backend: str,
                                  tmp_path: Path) -> None:
    ns, _, n = site(net, "met")
    name = f"met{n}"
    proxy = boot(ns, name, TS_USERSPACE="false", TS_DEST_IP=f"198.18.{n}.2", TS_DEBUG_FIREWALL_MODE=backend,
                 TS_ENABLE_METRICS="true", TS_LOCAL_ADDR_PORT=ADDR, TS_STATE_DIR=str(tmp_path))
    m, names = scrape(net, ns)
    assert {"containerboot_firewall_info", "containerboot_rules", "containerboot_rule_applies",
            "containerboot_drift_repairs", "containerboot_netmap_age_seconds",
            "containerboot_tailscaled_backend_state", "containerboot_control_connected"} <= names
    assert any(n.startswith("tailscaled_") for n in names), names  # tailscaled's own, still proxied
    info = [k for k in m if k[0] == "containerboot_firewall_info"]
    assert len(info) == 1 and dict(info[0][1])["backend"] == backend and dict(info[0][1])["reason"]
    assert one(m, "containerboot_tailscaled_backend_state", state="Running") == 1
    assert one(m, "containerboot_tailscaled_backend_state", state="NeedsLogin") == 0
    live = int(proxy.run.wait_contains(" rules live in ").split("firewall: ")[1].split()[0])
    assert (one(m, "containerboot_rules", family="ipv4") or 0) + (one(m, "containerboot_rules", family="ipv6") or 0) \
        == live >= 1
    assert one(m, "containerboot_rule_applies_total") == 1
    assert one(m, "containerboot_drift_repairs_total") == 0
    assert one(m, "containerboot_control_connected") == 1
    assert 0 <= (one(m, "containerboot_rule_apply_seconds") or -1) < 1

    # The netmap's age grows, and a change at control (a rename) makes a new netmap: it starts again.
    aged = wait_for(lambda: (a := one(scrape(net, ns)[0], "containerboot_netmap_age_seconds")) is not None
                    and a >= 3 and a, 30, interval=0.5)
    assert aged, "the netmap age did not grow"
    node_id = next(str(x["id"]) for x in net.nodes_json() if x.get("given_name") == name)
    net.hs_cli("nodes", "rename", "-i", node_id, f"{name}-renamed")
    fresh = wait_for(lambda: (a := one(scrape(net, ns)[0], "containerboot_netmap_age_seconds")) is not None
                     and a < aged - 1 and a, 20)
    assert fresh, "the netmap age did not start again after a rename"

    # Somebody flushes the rule set: ours repaired, and counted once; tailscaled's own (its ts-postrouting is
    # in the nat table too) brought back by a restart of tailscaled, counted once (tests/e2e/test_tailscaled_rules).
    assert one(m, "containerboot_tailscaled_restarts_total") == 0
    proxy.run.wait_contains("watching tailscaled's netfilter chains: ", timeout=10)
    net.lab.run(ns, *(["nft", "flush", "ruleset"] if backend == "nftables" else ["iptables-legacy", "-t", "nat", "-F"]))
    proxy.run.wait_contains("firewall: rules changed outside containerboot", timeout=10)
    proxy.run.wait_contains("tailscaled's netfilter chains are back", timeout=60)
    assert wait_for(lambda: one(scrape(net, ns)[0], "containerboot_drift_repairs_total") == 1, 10)
    m = scrape(net, ns)[0]
    assert one(m, "containerboot_rule_applies_total") == 1  # the rules outlived tailscaled: not applied again
    assert one(m, "containerboot_tailscaled_restarts_total") == 1

    # Control goes away: the control connection says so; back: up again.
    net.stop_control()
    try:
        assert wait_for(lambda: one(scrape(net, ns)[0], "containerboot_control_connected") == 0, 60)
    finally:
        net.start_control()
    assert wait_for(lambda: one(scrape(net, ns)[0], "containerboot_control_connected") == 1, 60)


def test_userspace_metrics(net: Tailnet, boot: Callable[..., Booted]) -> None:
    ns, _, n = site(net, "umet")
    boot(ns, f"umet{n}", TS_ENABLE_METRICS="true", TS_LOCAL_ADDR_PORT=ADDR)
    m, names = scrape(net, ns)
    assert one(m, "containerboot_tailscaled_backend_state", state="Running") == 1
    assert one(m, "containerboot_control_connected") == 1
    assert not [k for k in m if k[0] in ("containerboot_firewall_info", "containerboot_rules")]  # no netfilter
    assert one(m, "containerboot_rule_applies_total") == 0
    assert "containerboot_netmap_age_seconds" in names and one(m, "containerboot_netmap_age_seconds") is not None
