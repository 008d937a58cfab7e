"""The boot's loop in-process, against the fakes of tests/lab/loop.py (no root, no processes): the ordering
rules, reissue, bus reconnect, drift repair, a bad config update, and the shutdown sequence. The same
behaviour is shown end to end by the lifecycle, kube and e2e layers; these say which collaborator is
asked what, and in which order, in a fraction of a second each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from containerboot import log
from containerboot.events import ServicesChanged
from firewall.model import Plan
from tests.lab.loop import LoopLab
from tests.lab.wait import wait_for


@pytest.fixture(autouse=True)
def _text_log() -> Iterator[None]:
    yield
    log.setup("text", None)


def before(journal: list[str], first: str, then: str) -> bool:
    """`first` is in the journal, and before the first `then`."""
    return first in journal and then in journal and journal.index(first) < journal.index(then)


def test_device_id_before_rules_and_endpoints_after(tmp_path: Path) -> None:
    lab = LoopLab(tmp_path, kube=True, TS_DEST_IP="10.0.0.5")
    lab.api.running()
    lab.start()
    lab.wait_log("Startup complete, waiting for shutdown signal")
    j = lab.journal
    rules = next(e for e in j if e.startswith("driver: apply"))
    assert before(j, "store: device_id", rules), j
    assert before(j, rules, "store: device_fqdn,device_ips"), j
    assert lab.driver.current.rules and lab.store is not None
    assert lab.store.data["device_ips"] == b'["100.64.0.7","fd7a:115c:a1e0::7"]'
    assert lab.stop() == 0


def test_a_busy_lock_holds_endpoints_and_startup_until_the_rules_are_live(tmp_path: Path) -> None:
    lab = LoopLab(tmp_path, kube=True, TS_DEST_IP="10.0.0.5")
    lab.driver.busy = 3
    lab.api.running()
    lab.start()
    lab.wait_log("Startup complete")
    j = lab.journal
    rules = j.index(next(e for e in j if e.startswith("driver: apply")))
    assert j.count("driver: busy") == 3 and j.index("driver: busy") < rules, j
    assert j.index("store: device_fqdn,device_ips") > rules, j
    lines = lab.lines()
    assert sum("another program holds the xtables lock; retrying" in ln for ln in lines) == 3
    assert [ln for ln in lines if ln.startswith("Startup complete")] and \
        lines.index(next(ln for ln in lines if ln.startswith("firewall: "))) < \
        lines.index("Startup complete, waiting for shutdown signal")
    assert lab.stop() == 0


def test_drift_is_repaired(tmp_path: Path) -> None:
    lab = LoopLab(tmp_path, TS_DEST_IP="10.0.0.5")
    lab.api.running()
    lab.start()
    lab.wait_log("Startup complete")
    want = lab.driver.current
    n = len(want.rules)
    lab.driver.current = Plan()  # somebody ran `nft flush ruleset`
    lab.wait_log(f"rules changed outside containerboot ({n} missing, 0 unexpected); restoring them")
    lab.wait_journal(f"driver: apply {n} full")
    assert lab.driver.current == want
    assert lab.wait_journal("event: FirewallRulesRestored") > lab.journal.index(f"driver: apply {n} full")
    assert lab.events.emitted[-1] == ("FirewallRulesRestored", f"rules changed outside containerboot ({n} missing, "
                                      "0 unexpected); restored", True)
    assert lab.stop() == 0


def test_bus_reconnects_with_backoff_and_follows_the_new_stream(tmp_path: Path) -> None:
    lab = LoopLab(tmp_path, TS_DEST_IP="10.0.0.5")
    lab.api.running()
    lab.start()
    lab.wait_log("Startup complete")
    watches = len(lab.api.watches)
    lab.api.refuse = 2
    lab.api.drop()
    lab.wait_log("IPN bus watch ended; reconnecting: the IPN bus stream ended (tailscaled went away)")
    lab.wait_log("IPN bus watch reconnected")
    assert lab.journal.count("api: watch refused") == 2 and len(lab.api.watches) == watches + 1
    # The new stream is the one followed: a SelfChange on it moves the rules to the new address.
    lab.api.push({"SelfChange": {"StableID": "n1", "Name": "proxy.ts.net.", "Addresses": ["100.64.0.9/32"]}})
    assert wait_for(lambda: any("100.64.0.9" in str(r) for r in lab.driver.current.rules))
    assert lab.stop() == 0


def test_tailscaled_gone_for_good_ends_the_boot(tmp_path: Path) -> None:
    lab = LoopLab(tmp_path, TS_DEST_IP="10.0.0.5")
    lab.api.running()
    lab.start()
    lab.wait_log("Startup complete")
    lab.api.refuse = 10_000
    lab.api.drop()
    assert lab.join(20) == 1
    assert lab.lines()[-2:] == ["reading tailscaled IPN bus: watch-ipn-bus: connection refused",
                                "Sending SIGTERM to tailscaled"]
    assert "driver: flush" not in lab.journal  # not a clean end: the rules stay for the restarted container


def test_a_bad_config_update_keeps_the_last_good_one(tmp_path: Path) -> None:
    cfg = tmp_path / "egress"
    cfg.mkdir()
    services = {"web": {"tailnetTarget": {"ip": "100.64.0.20", "fqdn": ""},
                        "ports": [{"protocol": "tcp", "matchPort": 8080, "targetPort": 80}]}}
    (cfg / "egress-services").write_text(json.dumps(services))
    lab = LoopLab(tmp_path, kube=True, TS_EGRESS_PROXIES_CONFIG_PATH=str(cfg), POD_IP="10.1.0.4",
                  TS_TEST_NO_INOTIFY="true")
    lab.api.running()
    lab.start()
    lab.wait_log("egress services: status of 1 services written to the state Secret")
    good = lab.driver.current
    assert any("100.64.0.20" in str(r) for r in good.rules)
    applies = sum(e.startswith("driver: apply") for e in lab.journal)
    (cfg / "egress-services").write_text('{"web": {"tailnetTarget": ')
    lab.inbox.put(ServicesChanged())
    lab.wait_log("keeping the 1 egress services in force")
    lab.inbox.put(ServicesChanged())  # the same bad bytes again: said once
    assert lab.stop() == 0
    rejected = [e for e in lab.events.emitted if e[0] == "ConfigRejected"]
    assert len(rejected) == 1 and rejected[0][2] and "keeping the 1 egress services in force" in rejected[0][1]
    assert sum("keeping the 1 egress services in force" in ln for ln in lab.lines()) == 1
    assert sum(e.startswith("driver: apply") for e in lab.journal) == applies
    assert lab.driver.current == Plan()  # flushed at the clean stop, after serving `good` until then


def test_reissue_asks_the_operator_and_restarts_on_the_new_key(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "cap-95.hujson").write_text('{"Version": "alpha0", "AuthKey": "tskey-auth-old"}')
    lab = LoopLab(tmp_path, kube=True, TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR=str(cfg), TS_TEST_NO_INOTIFY="true")
    lab.api.status = {"BackendState": "NeedsLogin"}
    lab.start()
    lab.wait_log("Waiting for operator to provide new auth key (max wait: 10m0s)")
    j = lab.journal
    assert before(j, "api: POST /localapi/v0/disconnect-control", "store: reissue_authkey"), j
    assert lab.store is not None and lab.store.data["reissue_authkey"] == b"tskey-auth-old"
    assert "cli: up" not in j  # a config file logs in by itself
    assert [(r, w) for r, _, w in lab.events.emitted] == [("AuthKeyReissue", True)]
    assert "tskey-auth-old" not in lab.events.emitted[0][1]  # Events are readable by anyone who lists them
    (cfg / "cap-95.hujson").write_text('{"Version": "alpha0", "AuthKey": "tskey-auth-new"}')
    assert lab.join(10) == 0
    lines = lab.lines()
    assert any(ln.startswith("New auth key received from operator after ") for ln in lines)
    assert "Successfully received new auth key, restarting to apply configuration" in lines
    assert "reissue_authkey" not in lab.store.data


def test_shutdown_sequence(tmp_path: Path) -> None:
    lab = LoopLab(tmp_path, kube=True, TS_DEST_IP="10.0.0.5")
    lab.api.running()
    lab.start()
    lab.wait_log("Startup complete")
    mark = len(lab.journal)
    assert lab.stop() == 0
    tail = lab.journal[mark:]
    # prefs read to unadvertise, then tailscaled is stopped, and only then are the rules removed.
    assert tail == ["api: GET /localapi/v0/prefs", "child: SIGTERM", "driver: flush"], tail
    lines = lab.lines()
    assert lines[lines.index("Received SIGTERM, shutting down"):] == [
        "Received SIGTERM, shutting down", "Checking for consistent state", "Sending SIGTERM to tailscaled"]


def test_tailscaled_exit_ends_the_boot_without_flushing(tmp_path: Path) -> None:
    lab = LoopLab(tmp_path, TS_DEST_IP="10.0.0.5")
    lab.api.running()
    lab.start()
    lab.wait_log("Startup complete")
    lab.children[0].exit(3)
    assert lab.join() == 3
    assert "tailscaled exited unexpectedly (exit status 3); exiting so that the container is restarted" in lab.lines()
    assert "driver: flush" not in lab.journal and "child: SIGTERM" not in lab.journal


def test_userspace_proxygroup_services_are_planned_and_their_status_written(tmp_path: Path) -> None:
    """Upstream's egress_svcs_config_kube: in userspace mode too, a netfilter runner is made for the
    ProxyGroup's services, which are resolved and their status written."""
    from containerboot.boot.prepare import prepare_firewall
    from containerboot.settings import load

    cfg = tmp_path / "egress"
    cfg.mkdir()
    services = {"web": {"tailnetTarget": {"ip": "", "fqdn": "foo.tailnetxyz.ts.net"},
                        "ports": [{"protocol": "tcp", "matchPort": 8080, "targetPort": 80}]}}
    (cfg / "egress-services").write_text(json.dumps(services))
    env = {"TS_USERSPACE": "true", "TS_EGRESS_PROXIES_CONFIG_PATH": str(cfg), "TS_TEST_FAKE_NETFILTER": "true",
           "KUBERNETES_SERVICE_HOST": "127.0.0.1", "TS_KUBE_SECRET": "proxy-0"}
    fw = prepare_firewall(load(env))
    assert fw.driver is not None and fw.detection is not None
    assert "TS_DEBUG_FIREWALL_MODE" not in fw.env  # tailscaled touches no netfilter in userspace mode
    assert prepare_firewall(load({"TS_USERSPACE": "true", "TS_TEST_FAKE_NETFILTER": "true"})).driver is None

    lab = LoopLab(tmp_path, kube=True, TS_USERSPACE="true", TS_EGRESS_PROXIES_CONFIG_PATH=str(cfg),
                  TS_TEST_NO_INOTIFY="true")
    lab.api.running(addrs=("100.64.0.1",))
    lab.api.status["Peer"] = {"k": {"ID": 2, "DNSName": "foo.tailnetxyz.ts.net.", "TailscaleIPs": ["100.64.0.2"]}}
    lab.start()
    lab.wait_log("egress services: status of 1 services written to the state Secret")
    assert lab.store is not None
    status = json.loads(lab.store.data["egress-services"])
    assert list(status["services"]) == ["web"] and status["services"]["web"]["tailnetTargetIPs"] == ["100.64.0.2"]
    assert lab.stop() == 0


TS_CHAINS = {(4, "filter", "ts-input"): 3, (4, "filter", "ts-forward"): 4, (4, "nat", "ts-postrouting"): 1}


def chains_lab(tmp_path: Path, kube: bool = True) -> LoopLab:
    """A proxy whose tailscaled keeps its state in the kube Secret (`kube`), or in memory."""
    lab = LoopLab(tmp_path, kube=kube, TS_DEST_IP="10.0.0.5")
    lab.chains.on_start = dict(TS_CHAINS)  # each tailscaled makes its chains when it starts
    lab.api.running()
    lab.api.answers["GET /localapi/v0/prefs"] = {"NetfilterMode": 2}
    lab.start()
    lab.wait_log("Startup complete")
    return lab


def flush_tailscaled_chains(lab: LoopLab) -> None:
    """`nft flush ruleset`, as far as tailscaled's chains go, once the watch has seen them."""
    reads = lab.chains.reads
    assert wait_for(lambda: lab.chains.reads >= reads + 2)
    lab.wait_log("watching tailscaled's netfilter chains: ip filter ts-forward, ip filter ts-input, ip nat "
                 "ts-postrouting")
    lab.chains.counts = {}


def test_tailscaled_is_restarted_when_its_chains_vanish_and_our_rules_stay(tmp_path: Path) -> None:
    lab = chains_lab(tmp_path)
    rules = lab.driver.current
    flush_tailscaled_chains(lab)
    lab.wait_log("tailscaled's own netfilter chains were removed (ip filter ts-forward, ip filter ts-input, "
                 "ip nat ts-postrouting): a ruleset flush or a firewall reload; tailscaled installs them only when "
                 "it starts, so it is restarted (our rules stay)")
    back = lab.wait_log("tailscaled's netfilter chains are back (ip filter ts-forward, ip filter ts-input, ip nat "
                        "ts-postrouting), ")
    assert back.endswith("s after they were found gone")
    j = lab.journal
    # The old tailscaled is stopped (its exit event is not taken for a crash), a new one started, no rule removed.
    starts = [i for i, e in enumerate(j) if e == "child: start"]
    assert len(starts) == 2 and starts[0] < j.index("child: SIGTERM") < starts[1], j
    assert "driver: flush" not in j and lab.driver.current == rules
    assert lab.events.emitted[-1][0] == "TailscaledRestarted" and lab.events.emitted[-1][2] is True
    assert lab.boot.metrics.tailscaled_restarts == 1 and lab.boot.metrics.tailscaled_rules_lost == 1
    assert b"containerboot_tailscaled_restarts_total 1" in lab.boot.metrics.render()
    assert sum(ln == "Startup complete, waiting for shutdown signal" for ln in lab.lines()) == 2
    assert lab.stop() == 0
    assert lab.journal[-1] == "driver: flush"  # the real shutdown removes our rules, once


def test_chains_lost_with_state_in_memory_are_said_and_tailscaled_kept(tmp_path: Path) -> None:
    """A restart would register a new device with new addresses: the node is kept, the loss said once."""
    lab = chains_lab(tmp_path, kube=False)
    flush_tailscaled_chains(lab)
    line = lab.wait_log("tailscaled's own netfilter chains were removed (ip filter ts-forward, ip filter ts-input, "
                        "ip nat ts-postrouting); not restarting tailscaled to put them back: its state is in memory")
    assert line.endswith("set TS_STATE_DIR (or TS_KUBE_SECRET) for that")
    reads = lab.chains.reads
    assert wait_for(lambda: lab.chains.reads >= reads + 3)
    assert lab.journal.count("child: start") == 1 and "child: SIGTERM" not in lab.journal
    assert [e[0] for e in lab.events.emitted] == ["TailscaledRulesLost"]
    assert (lab.boot.metrics.tailscaled_rules_lost, lab.boot.metrics.tailscaled_restarts) == (1, 0)
    assert lab.stop() == 0


def test_chains_removed_by_netfilter_mode_off_restart_nothing(tmp_path: Path) -> None:
    lab = chains_lab(tmp_path)
    lab.api.answers["GET /localapi/v0/prefs"] = {"NetfilterMode": 0}  # `tailscale set --netfilter-mode=off`
    flush_tailscaled_chains(lab)
    reads = lab.chains.reads
    assert wait_for(lambda: lab.chains.reads >= reads + 3)
    assert lab.journal.count("child: start") == 1 and not lab.events.emitted
    assert lab.stop() == 0


def test_chains_that_keep_vanishing_end_the_boot_after_three_restarts(tmp_path: Path) -> None:
    lab = chains_lab(tmp_path)
    for n in range(1, 4):
        flush_tailscaled_chains(lab)
        assert wait_for(lambda n=n: lab.journal.count("child: start") == n + 1 and lab.chains.counts)
        lab.wait_log("Startup complete")
    flush_tailscaled_chains(lab)
    assert lab.join() == 1
    assert any(ln.startswith("tailscaled's own netfilter chains were removed (ip filter ts-forward, ip filter "
                             "ts-input, ip nat ts-postrouting) again, after 3 restarts of tailscaled in 10m0s: "
                             "something keeps removing them") for ln in lab.lines()), lab.lines()[-3:]
    assert lab.boot.metrics.tailscaled_restarts == 3
