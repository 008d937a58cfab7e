"""Scripted notifications from a fake tailscaled drive real kernel rules: the boot program moves
them with the node's address, puts them back after a flush, and follows an egress peer by name."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import need_root
from tests.lab.fakes import Root, Run, netmap, peer, temp_root
from tests.lab.netns import IP, Lab
from tests.lab.topology import ADDR, Topology
from tests.lab.wait import wait_for

pytestmark = pytest.mark.root


@pytest.fixture
def topo() -> Iterator[Topology]:
    need_root()
    lab = Lab("b")
    try:
        yield Topology(lab)
    finally:
        lab.close()


@pytest.fixture
def root() -> Iterator[Root]:
    with temp_root() as r:
        for fake in ("iptables", "ip6tables", "nft"):  # the real ones program the kernel here
            (r.d / "usr/bin" / fake).unlink()
        yield r


def boot(topo: Topology, root: Root, backend: str, **env: str) -> Run:
    full = root.env(TS_TEST_FAKE_NETFILTER="false", TS_USERSPACE="false", TS_TEST_RECORD_ENV=f"{root.d}/env",
                    **({"TS_DEBUG_FIREWALL_MODE": backend} if backend != "auto" else {}), **env)
    return Run(full, prefix=[IP, "netns", "exec", topo.proxy])


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_address_change_moves_the_rules_and_a_flush_is_undone(topo: Topology, root: Root, backend: str) -> None:
    a4, a6 = ADDR[4], ADDR[6]
    run = boot(topo, root, backend, TS_DEST_IP=a4["backend"])
    try:
        root.api.notify(netmap([f"{a4['ts']}/32", f"{a6['ts']}/128"]))
        run.wait_log("Startup complete, waiting for shutdown signal")
        assert topo.lab.fetch(topo.tnet, a4["ts"], source=a4["peer"]) == f"backend {a4['peer']}"

        root.api.notify({"SelfChange": {"ID": 1, "StableID": "myID", "Name": "test-node.test.ts.net.",
                                        "Addresses": [f"{a4['ts_new']}/32", f"{a6['ts_new']}/128"]}})
        run.wait_log(f"firewall: 2 rules live in {backend} for {a4['ts_new']}, {a6['ts_new']}")
        assert topo.lab.fetch(topo.tnet, a4["ts_new"], source=a4["peer"]) == f"backend {a4['peer']}"
        assert topo.lab.fetch(topo.tnet, a4["ts"], source=a4["peer"]) is None

        flush = ["nft", "flush", "ruleset"] if backend == "nftables" else ["iptables-legacy", "-t", "nat", "-F"]
        topo.lab.run(topo.proxy, *flush)
        flushed = time.monotonic()
        assert topo.lab.fetch(topo.tnet, a4["ts_new"], source=a4["peer"], timeout=0.5) is None
        back = wait_for(lambda: topo.lab.fetch(topo.tnet, a4["ts_new"], source=a4["peer"], timeout=0.5), 6.0)
        assert back == f"backend {a4['peer']}" and time.monotonic() - flushed < 5.0
        run.wait_contains("firewall: rules changed outside containerboot")
        assert root.read("env") == f"TS_DEBUG_FIREWALL_MODE={backend}"
    finally:
        assert run.stop() == 0
    assert topo.lab.fetch(topo.tnet, a4["ts_new"], source=a4["peer"]) is None, "rules left after shutdown"


def test_detected_backend_is_handed_to_tailscaled(topo: Topology, root: Root) -> None:
    topo.lab.run(topo.proxy, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", "198.18.9.9", "-j", "ACCEPT")
    run = boot(topo, root, "auto", TS_DEST_IP=ADDR[4]["backend"])
    try:
        root.api.notify(netmap([f"{ADDR[4]['ts']}/32"]))
        run.wait_log("Startup complete, waiting for shutdown signal")
        assert root.read("env") == "TS_DEBUG_FIREWALL_MODE=iptables"
        run.wait_contains("firewall iptables (legacy): ")
        assert topo.lab.fetch(topo.tnet, ADDR[4]["ts"], source=ADDR[4]["peer"]) == f"backend {ADDR[4]['peer']}"
    finally:
        run.stop()


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_egress_by_magicdns_name_follows_the_peer(topo: Topology, root: Root, backend: str) -> None:
    topo.lab.addr(topo.tnet, "eth0", "100.64.0.8/10")
    topo.lab.serve(topo.tnet, "moved", "100.64.0.8")
    run = boot(topo, root, backend, TS_TAILNET_TARGET_FQDN="db.test.ts.net")
    try:
        root.api.notify(netmap(["100.64.0.1/32"], peers=[peer(7, "db.test.ts.net.", "100.64.0.7")]))
        run.wait_log("Installing forwarding rules for destination 100.64.0.7")
        assert topo.lab.fetch(topo.pod, "198.18.1.1") == "target 100.64.0.1"
        root.api.notify({"PeersChanged": [peer(7, "db.test.ts.net.", "100.64.0.8")]})
        run.wait_log("Installing forwarding rules for destination 100.64.0.8")
        assert wait_for(lambda: topo.lab.fetch(topo.pod, "198.18.1.1") == "moved 100.64.0.1", 3.0)
    finally:
        run.stop()


def test_xtables_lock_held_by_another_process(topo: Topology, root: Root) -> None:
    # Another program (an `iptables --wait` run, tailscaled) holds the xtables lock and does not let go:
    # the boot neither hangs nor fails; it says so, installs once the lock is free, and SIGTERM stays prompt.
    a4 = ADDR[4]
    lock = root.d / "xtables.lock"
    holder = subprocess.Popen(["flock", "-o", str(lock), "sleep", "30"])  # -o: killing flock frees it
    try:
        assert wait_for(lambda: subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 1, 5)
        run = boot(topo, root, "iptables", TS_DEST_IP=a4["backend"], XTABLES_LOCKFILE=str(lock))
        root.api.notify(netmap([f"{a4['ts']}/32"]))
        run.wait_contains("has held the xtables lock", timeout=15)
        assert run.proc.poll() is None
        assert "Startup complete" not in run.output  # not while the rules are not in
        holder.kill()
        holder.wait()
        run.wait_contains("rules live in iptables", timeout=15)
        run.wait_log("Startup complete, waiting for shutdown signal")
        assert topo.lab.fetch(topo.tnet, a4["ts"], source=a4["peer"]) == f"backend {a4['peer']}"
        # Held again: SIGTERM during the wait for it still ends the program at once.
        holder = subprocess.Popen(["flock", "-o", str(lock), "sleep", "30"])  # -o: killing flock frees it
        assert wait_for(lambda: subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 1, 5)
        topo.lab.run(topo.proxy, "iptables-legacy", "-t", "nat", "-F")  # drift: the repair needs the lock
        time.sleep(2.5)
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(10) == 0
        assert time.monotonic() - sent < 2.5  # the abort, then the shutdown's own 1 s try to remove the rules
        run.wait_exit(5)
    finally:
        holder.kill()
        holder.wait()


def test_shutdown_says_in_one_line_which_chain_it_must_keep(topo: Topology, root: Root) -> None:
    # Someone else's rule jumps into our chain from another chain: the shutdown cannot remove that chain
    # without breaking their rule. It removes the rest, says so in one line, and exits as SIGTERM does.
    a4 = ADDR[4]
    run = boot(topo, root, "iptables", TS_DEST_IP=a4["backend"])
    try:
        root.api.notify(netmap([f"{a4['ts']}/32"]))
        run.wait_log("Startup complete, waiting for shutdown signal")
        topo.lab.run(topo.proxy, "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-j",
                     "CONTAINERBOOT-PREROUTING")
    finally:
        assert run.stop() == 0
    said = [ln for ln in run.output.splitlines() if "CONTAINERBOOT-PREROUTING" in ln]
    assert len(said) == 1 and said[0].endswith(
        "firewall: removing our rules failed: iptables (legacy): nat: chain CONTAINERBOOT-PREROUTING is kept: "
        "rules we did not install jump to it (OUTPUT rule 1); delete them, then flush again"), said
    save = topo.lab.run(topo.proxy, "iptables-legacy-save").stdout
    assert "-A OUTPUT -o lo -j CONTAINERBOOT-PREROUTING" in save and "CONTAINERBOOT-FORWARD" not in save, save
