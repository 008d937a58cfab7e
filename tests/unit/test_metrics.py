"""containerboot's own metrics: the exposition as prometheus_client's parser reads it, and the figures the
loop's collaborators keep (in-process, against the fakes of tests/lab/loop.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from containerboot import log
from containerboot.metrics import Metrics, go_time
from firewall.model import Plan
from tests.lab.loop import LoopLab


@pytest.fixture(autouse=True)
def _text_log() -> Iterator[None]:
    yield
    log.setup("text", None)


def parsed(m: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {f.name: [(s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(m.render().decode())}


def test_every_family_has_help_and_type_and_escapes_its_labels() -> None:
    m = Metrics(firewall=("nftables", "nf_tables", 'rules here: 3 "kube-proxy"\\ \nnext'),
                rules={4: 3, 6: 1}, applies=2, drift_repairs=1, netmap_at=90.0, backend_state="Running",
                control_online=True, key_expiry=1_000_100.0, services={("egress", "configured"): 1000},
                reissues=1, clock=lambda: 100.0, wall=lambda: 1_000_000.0)
    text = m.render().decode()
    names = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")]
    assert len(names) == len(set(names)) == sum(ln.startswith("# HELP ") for ln in text.splitlines())
    got = parsed(m)
    assert got["containerboot_firewall_info"] == [({"backend": "nftables", "variant": "nf_tables",
                                                    "reason": 'rules here: 3 "kube-proxy"\\ \nnext'}, 1.0)]
    assert got["containerboot_rules"] == [({"family": "ipv4"}, 3.0), ({"family": "ipv6"}, 1.0)]
    assert got["containerboot_rule_applies"] == [({}, 2.0)]  # the parser names a counter without _total
    assert got["containerboot_netmap_age_seconds"] == [({}, 10.0)]
    assert got["containerboot_node_key_expiry_seconds"] == [({}, 100.0)]
    assert got["containerboot_services"] == [({"kind": "egress", "state": "configured"}, 1000.0)]
    assert [lb["state"] for lb, v in got["containerboot_tailscaled_backend_state"] if v == 1] == ["Running"]
    assert math.isnan(parsed(Metrics())["containerboot_rule_apply_seconds"][0][1])  # no apply yet
    assert parsed(Metrics())["containerboot_netmap_age_seconds"] == []  # no netmap yet: no sample


def test_status_gives_control_connection_and_key_expiry() -> None:
    m = Metrics()
    m.observe_status({"Self": {"Online": True, "KeyExpiry": "2027-06-04T10:00:00.123456789Z"}})
    assert m.control_online is True and m.key_expiry == go_time("2027-06-04T10:00:00.123456Z")
    m.observe_status({"Self": {"Online": False}})
    assert (m.control_online, m.key_expiry) == (False, None)  # a node whose key does not expire
    m.observe_status(None)  # tailscaled did not answer: unknown, so no sample at all
    assert parsed(m)["containerboot_control_connected"] == []
    assert go_time("0001-01-01T00:00:00Z") is None and go_time("soon") is None


def test_the_loop_keeps_the_figures(tmp_path: Path) -> None:
    lab = LoopLab(tmp_path, TS_DEST_IP="10.0.0.5")
    lab.driver.busy = 1
    lab.api.running()
    lab.start()
    lab.wait_log("Startup complete")
    m = lab.boot.metrics
    assert (m.applies, m.apply_failures, m.drift_repairs, m.backend_state) == (1, 1, 0, "Running")
    assert m.rules == {4: len(lab.driver.current.only(4).rules), 6: len(lab.driver.current.only(6).rules)}
    assert m.firewall == ("nftables", "nf_tables", "fake netfilter") and m.netmap_at is not None
    lab.driver.current = Plan()
    lab.wait_log("restoring them")
    lab.wait_journal(f"driver: apply {sum(m.rules.values())} full")
    assert m.drift_repairs == 1 and m.applies == 1
    assert lab.stop() == 0
    assert m.rules == {}  # flushed


def test_services_and_reissues_are_counted(tmp_path: Path) -> None:
    cfg = tmp_path / "egress"
    cfg.mkdir()
    services = {name: {"tailnetTarget": {"ip": ip, "fqdn": ""},
                       "ports": [{"protocol": "tcp", "matchPort": 8080, "targetPort": 80}]}
                for name, ip in (("a", "100.64.0.20"), ("b", "100.64.0.21"))}
    (cfg / "egress-services").write_text(json.dumps(services))
    lab = LoopLab(tmp_path, kube=True, TS_EGRESS_PROXIES_CONFIG_PATH=str(cfg), TS_TEST_NO_INOTIFY="true")
    lab.api.running()
    lab.start()
    lab.wait_log("egress services: status of 2 services written to the state Secret")
    assert lab.boot.metrics.services == {("egress", "configured"): 2, ("egress", "applied"): 2,
                                         ("ingress", "configured"): 0, ("ingress", "applied"): 0}
    assert lab.stop() == 0
