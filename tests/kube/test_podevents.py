"""Events on the proxy's own Pod against a real kube-apiserver: a real Pod (never scheduled) and a service
account with the operator's proxies' rights, or fewer. The Events are read back the way `kubectl describe
pod` finds them (a field selector on the involved object's kind, name, namespace and UID), and what the
proxy asked is counted from the server's own audit log (tests/lab/kubeapi.py, audit=True), so a request
made by any code path, on any connection, is seen."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from containerboot.kube import client as kube
from containerboot.kube import podevents as pe
from tests.lab.kubeapi import PROXIES_ROLE_RULES, SA_DIR, KubeAPI, Rule, proxy_rules
from tests.lab.wait import wait_for

pytestmark = pytest.mark.kube

POD = "ts-proxy-0"
SECRETS_ONLY: list[Rule] = [r for r in PROXIES_ROLE_RULES if r["resources"] != ["events"]]


@pytest.fixture(scope="module")
def audited(kubeapi: KubeAPI) -> Iterator[KubeAPI]:
    """A second server over the session's etcd that logs every request it answers (about 3 s to start)."""
    with KubeAPI(kubeapi.etcd, audit=True) as server:
        yield server


@dataclass
class Proxy:
    api: KubeAPI
    ns: str
    uid: str
    client: kube.Client
    lines: list[str] = field(default_factory=list)
    made: list[pe.PodEvents] = field(default_factory=list)

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.ns}:proxies"

    def events(self, uid: str = "") -> pe.PodEvents:
        ev = pe.PodEvents(self.client, self.client.namespace, POD, uid or self.uid, say=self.lines.append)
        self.made.append(ev)
        return ev

    def described(self) -> list[dict[str, Any]]:
        """The Pod's Events as kubectl describe pod lists them."""
        return self.api.events(self.ns, f"involvedObject.kind=Pod,involvedObject.name={POD},"
                                        f"involvedObject.namespace={self.ns},involvedObject.uid={self.uid}")

    def requests(self, settle: float = 0.0) -> list[tuple[str, str | None]]:
        """(verb, resource) of each request the proxy's service account made; `settle`: wait that long for
        the audit log to stop growing (an entry is written just after its answer)."""
        seen = self.api.requests_by(self.user)
        end = time.monotonic() + settle
        while time.monotonic() < end:
            time.sleep(0.2)
            now = self.api.requests_by(self.user)
            if len(now) != len(seen):
                seen, end = now, time.monotonic() + settle
        return [(r["verb"], r["resource"]) for r in seen]


def make_proxy(api: KubeAPI, root: Path, rules: list[Rule]) -> Proxy:
    ns = api.create_namespace()
    api.create_service_account(ns, "proxies")
    api.create_role(ns, "proxies", rules)
    api.bind_role(ns, "proxies", "proxies", "proxies")
    uid = api.create_pod(ns, POD, "proxies")
    api.pod_files(root, ns, api.token(ns, "proxies"))
    return Proxy(api, ns, uid, kube.Client(str(root / SA_DIR), "127.0.0.1", api.port))


@pytest.fixture
def proxy_for(audited: KubeAPI, tmp_path: Path) -> Iterator[Callable[[list[Rule]], Proxy]]:
    made: list[Proxy] = []

    def _make(rules: list[Rule]) -> Proxy:
        made.append(make_proxy(audited, tmp_path / str(len(made)), rules))
        return made[-1]

    yield _make
    for p in made:
        for ev in p.made:
            assert ev.close(2), "the worker must end within close's bound"
        p.client.close()


SSARS = [("create", "selfsubjectaccessreviews")] * 3


@pytest.mark.parametrize("rules", [PROXIES_ROLE_RULES, proxy_rules(POD)], ids=["proxies-role", "proxygroup-role"])
def test_an_event_is_on_the_pod(proxy_for: Callable[[list[Rule]], Proxy], rules: list[Rule]) -> None:
    p = proxy_for(rules)
    ev = p.events()
    ev.emit(pe.REASON_FIREWALL_BACKEND, 'nftables (evidence: rules already in "nat")')
    assert wait_for(lambda: ev.sent == 1, 10), p.lines
    (event,) = p.described()
    assert event["metadata"]["name"] == f"{POD}.{p.uid}.firewallbackend"
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "name": POD, "namespace": p.ns,
                                       "uid": p.uid}
    assert event["reason"] == "FirewallBackend" and event["type"] == "Normal"
    assert event["message"] == 'nftables (evidence: rules already in "nat")'
    assert event["source"] == {"component": "containerboot"} and event["count"] == 1
    assert event["firstTimestamp"] == event["lastTimestamp"]
    stamp = calendar.timegm(time.strptime(str(event["lastTimestamp"]), "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(time.time() - stamp) < 30, event["lastTimestamp"]
    assert p.requests(settle=0.5) == [*SSARS, ("get", "events"), ("create", "events")]
    assert not p.lines


def test_repeats_raise_the_count_of_one_object(proxy_for: Callable[[list[Rule]], Proxy]) -> None:
    p = proxy_for(PROXIES_ROLE_RULES)
    ev = p.events()
    ev.emit(pe.REASON_FIREWALL_RULES_RESTORED, "restored 1 rule", warning=True)
    assert wait_for(lambda: ev.sent == 1, 10), p.lines
    first = p.described()[0]
    for n in range(2, 6):  # within MIN_INTERVAL of the first write: one write, MIN_INTERVAL after it
        ev.emit(pe.REASON_FIREWALL_RULES_RESTORED, f"restored {n} rules", warning=True)
    assert wait_for(lambda: ev.sent == 2, 10), p.lines
    # At least MIN_INTERVAL (1 s) after the first: a later second in lastTimestamp, which has whole seconds.
    ev.emit(pe.REASON_FIREWALL_RULES_RESTORED, "restored 6 rules", warning=True)
    assert wait_for(lambda: ev.sent == 3, 10), p.lines
    (event,) = p.described()
    assert event["count"] == 6 and event["type"] == "Warning" and event["message"] == "restored 6 rules"
    assert event["metadata"]["uid"] == first["metadata"]["uid"], "the same object"
    assert event["firstTimestamp"] == first["firstTimestamp"] and event["lastTimestamp"] > first["lastTimestamp"]
    # One GET for an Event an earlier container may have left, the POST, then a PATCH per write.
    assert p.requests(settle=0.5) == [*SSARS, ("get", "events"), ("create", "events"), ("patch", "events"),
                                      ("patch", "events")]
    # A restarted container of the same Pod counts on from what the server has.
    again = p.events()
    again.emit(pe.REASON_FIREWALL_RULES_RESTORED, "restored 1 rule", warning=True)
    assert wait_for(lambda: again.sent == 1, 10), p.lines
    (event,) = p.described()
    assert event["count"] == 7 and not p.lines


def test_several_reasons_several_objects(proxy_for: Callable[[list[Rule]], Proxy]) -> None:
    p = proxy_for(proxy_rules(POD))
    ev = p.events()
    reasons = [pe.REASON_FIREWALL_BACKEND, pe.REASON_FIREWALL_RULES_RESTORED, pe.REASON_AUTH_KEY_REISSUE,
               pe.REASON_CONFIG_REJECTED]
    for reason in reasons:
        ev.emit(reason, f"about {reason}", warning=reason in pe.WARNING_REASONS)
    ev.emit(pe.REASON_CONFIG_REJECTED, "x" * 5000, warning=True)  # coalesced; the latest message, cut
    # The repeat joins its entry, or is a PATCH a second later if the first was already taken: count 2.
    assert wait_for(lambda: sum(int(e["count"]) for e in p.described()) == 5, 10), p.lines
    by_reason = {e["reason"]: e for e in p.described()}
    assert sorted(by_reason) == sorted(reasons)
    for reason, e in by_reason.items():
        assert e["metadata"]["name"] == f"{POD}.{p.uid}.{reason.lower()}"
        assert e["type"] == ("Warning" if reason in pe.WARNING_REASONS else "Normal")
        assert e["count"] == (2 if reason == pe.REASON_CONFIG_REJECTED else 1)
    rejected = by_reason[pe.REASON_CONFIG_REJECTED]["message"]
    assert isinstance(rejected, str) and len(rejected) == pe.MAX_MESSAGE and rejected.endswith("\u2026")
    # An Event of another Pod's UID (a Pod of the same name before) is not this Pod's.
    other = p.events(uid="0a5e6c1e-0000-4000-8000-000000000000")
    other.emit(pe.REASON_FIREWALL_BACKEND, "old pod")
    assert wait_for(lambda: other.sent == 1, 10)
    assert len(p.described()) == 4 and len(p.api.events(p.ns)) == 5


@pytest.mark.parametrize(("rules", "missing"), [
    (SECRETS_ONLY, "get, create, patch"),
    ([*SECRETS_ONLY, {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}], "get, patch"),
], ids=["no-events", "create-only"])
def test_without_the_rights_one_line_and_no_more_requests(proxy_for: Callable[[list[Rule]], Proxy],
                                                          rules: list[Rule], missing: str) -> None:
    p = proxy_for(rules)
    ev = p.events()
    for _ in range(50):  # before and after the check has answered
        ev.emit(pe.REASON_FIREWALL_RULES_RESTORED, "restored", warning=True)
    assert wait_for(lambda: ev.enabled is False, 10)
    for reason in (pe.REASON_FIREWALL_BACKEND, pe.REASON_AUTH_KEY_REISSUE, pe.REASON_CONFIG_REJECTED):
        ev.emit(reason, "m")
    time.sleep(pe.MIN_INTERVAL + 0.5)  # time for any write that would be due
    assert ev.close(2)
    assert p.lines == [f"not writing Kubernetes Events for Pod {p.ns}/{POD}: missing {missing} permission on events "
                       f'in namespace "{p.ns}" (the Role needs get, create, patch on events)']
    assert p.requests(settle=1.0) == SSARS, "the three access reviews, and nothing after them"
    assert p.api.events(p.ns) == [] and ev.sent == 0
