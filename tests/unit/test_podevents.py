"""Events on the Pod: the pure parts (names, the Event object, the patch, the coalescing queue, the
permission verdict) as tables, then the worker against a stand-in client (tests/lab/kubeevents.py):
coalescing, the once-only check, no calls without the rights, recovery from 404/409, the close bound.
The real API server's side is tests/kube/test_podevents.py."""

from __future__ import annotations

import time
from typing import Any

import pytest

from containerboot.kube import podevents as pe
from containerboot.kube.client import KubeError
from tests.lab.kubeevents import FakeEventsClient
from tests.lab.wait import wait_for

WALL = 1_760_000_000.0  # 2025-10-09T08:53:20Z


# ---- pure ---------------------------------------------------------------------------------------------


def test_event_name_is_upstreams() -> None:
    assert pe.event_name("ts-proxy-0", "8f1c-uid", "FirewallRulesRestored") == \
        "ts-proxy-0.8f1c-uid.firewallrulesrestored"


def test_the_boots_reasons_are_valid_and_typed() -> None:
    reasons = [pe.REASON_FIREWALL_BACKEND, pe.REASON_FIREWALL_RULES_RESTORED, pe.REASON_AUTH_KEY_REISSUE,
               pe.REASON_CONFIG_REJECTED, pe.REASON_TAILSCALED_RESTARTED, pe.REASON_TAILSCALED_RULES_LOST]
    assert reasons == ["FirewallBackend", "FirewallRulesRestored", "AuthKeyReissue", "ConfigRejected",
                       "TailscaledRestarted", "TailscaledRulesLost"]
    assert all(pe.reason_ok(r) for r in reasons)
    assert pe.WARNING_REASONS == set(reasons) - {pe.REASON_FIREWALL_BACKEND}


@pytest.mark.parametrize(("reason", "ok"), [
    ("FirewallBackend", True), ("A1", True), ("x" * 63, True), ("x" * 64, False), ("", False),
    ("1Reason", False), ("Two Words", False), ("with.dot", False), ("Réason", False), ("a/b", False),
])
def test_reason_ok(reason: str, ok: bool) -> None:
    assert pe.reason_ok(reason) is ok


def test_message_is_cut_and_marked() -> None:
    assert pe.cut("short") == "short"
    assert pe.cut("x" * pe.MAX_MESSAGE) == "x" * pe.MAX_MESSAGE
    long = pe.cut("y" * 5000)
    assert len(long) == pe.MAX_MESSAGE and long.endswith("\u2026")


def test_rfc3339_is_utc_whole_seconds() -> None:
    assert pe.rfc3339(WALL + 0.9) == "2025-10-09T08:53:20Z"


def test_new_event_is_upstreams_shape() -> None:
    occ = pe.Occurrence("ConfigRejected", "bad", True, 3, WALL, WALL + 61)
    assert pe.new_event("tailscale", "ts-0", "uid-1", occ) == {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": "ts-0.uid-1.configrejected", "namespace": "tailscale"},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": "ts-0", "namespace": "tailscale",
                           "uid": "uid-1"},
        "reason": "ConfigRejected", "message": "bad", "type": "Warning",
        "source": {"component": "containerboot"},
        "firstTimestamp": "2025-10-09T08:53:20Z", "lastTimestamp": "2025-10-09T08:54:21Z", "count": 3,
    }
    normal = pe.new_event("ns", "p", "u", pe.Occurrence("FirewallBackend", "m" * 2000, False, 1, WALL, WALL))
    assert normal["type"] == "Normal" and len(normal["message"]) == pe.MAX_MESSAGE


def test_repeat_patch() -> None:
    occ = pe.Occurrence("AuthKeyReissue", "again", True, 2, WALL, WALL + 5)
    assert pe.repeat_patch(7, occ) == [{"op": "add", "path": "/count", "value": 7},
                                       {"op": "add", "path": "/lastTimestamp", "value": "2025-10-09T08:53:25Z"},
                                       {"op": "add", "path": "/message", "value": "again"}]


@pytest.mark.parametrize(("event", "count"), [
    ({"count": 4}, 4), ({}, 1), ({"count": 0}, 1), ({"count": "4"}, 1), ({"count": True}, 1), ({"count": -2}, 1),
])
def test_stored_count(event: dict[str, Any], count: int) -> None:
    assert pe.stored_count(event) == count


@pytest.mark.parametrize(("answers", "line"), [
    ({"get": True, "create": True, "patch": True}, None),
    ({"get": True, "create": False, "patch": False},
     'missing create, patch permission on events in namespace "ns" (the Role needs get, create, patch on events)'),
    ({"get": False, "create": False, "patch": False},
     'missing get, create, patch permission on events in namespace "ns" (the Role needs get, create, patch on '
     'events)'),
    ({"get": True, "create": KubeError("no answer within 5s")},
     "error checking create permission on events: no answer within 5s"),
])
def test_denied_names_what_is_missing(answers: dict[str, bool | KubeError], line: str | None) -> None:
    assert pe.denied("ns", answers) == line


def test_pending_coalesces_repeats_of_a_reason() -> None:
    q = pe.Pending(interval=1.0)
    assert q.add("A", "one", False, WALL) and q.add("A", "two", True, WALL + 2) and q.add("B", "b", False, WALL + 3)
    occ, wait = q.take(100.0)
    assert occ == pe.Occurrence("A", "two", True, 2, WALL, WALL + 2) and wait is None
    occ, _ = q.take(100.0)
    assert occ is not None and occ.reason == "B" and occ.times == 1
    assert q.take(100.0) == (None, None)


def test_pending_writes_a_reason_once_per_interval() -> None:
    q = pe.Pending(interval=1.0)
    q.add("A", "m", False, WALL)
    assert q.take(100.0)[0] is not None
    for _ in range(50):  # a flapping condition between two writes: one entry
        q.add("A", "m", False, WALL)
    q.add("B", "m", False, WALL)
    occ, _ = q.take(100.25)
    assert occ is not None and occ.reason == "B", "a reason not written before is due at once"
    assert q.take(100.25) == (None, 0.75)
    occ, _ = q.take(101.0)
    assert occ is not None and occ.reason == "A" and occ.times == 50
    q.add("A", "m", False, WALL)
    assert q.take(101.5)[0] is None and q.take(101.5, flush=True)[0] is not None, "closing flushes at once"


def test_pending_is_capped_and_counts_drops() -> None:
    q = pe.Pending(cap=2, reasons=3, interval=0.0)
    assert q.add("A", "", False, WALL) and q.add("B", "", False, WALL)
    assert not q.add("C", "", False, WALL), "full"
    assert q.add("A", "", False, WALL), "a repeat of a waiting reason always fits"
    q.take(1.0)
    q.take(1.0)
    assert q.add("C", "", False, WALL)
    q.take(1.0)
    assert not q.add("D", "", False, WALL), "a fourth distinct reason"
    assert not q.add("not valid", "", False, WALL)
    assert q.add("A", "", False, WALL) and q.dropped == 3 and len(q) == 1


# ---- the worker, against a stand-in client ------------------------------------------------------------


@pytest.fixture(autouse=True)
def short_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pe, "MIN_INTERVAL", 0.05)


def events(fake: FakeEventsClient, rights: tuple[str, ...] | None = None, pod: str = "ts-0",
           uid: str = "uid-1") -> tuple[pe.PodEvents, list[str]]:
    if rights is not None:
        fake.rights = set(rights)
    lines: list[str] = []
    return pe.PodEvents(fake, "ns", pod, uid, say=lines.append), lines  # type: ignore[arg-type]


def test_repeats_raise_the_count_of_one_event() -> None:
    fake = FakeEventsClient()
    fake.go.clear()  # a slow server: the emits arrive while the check is under way
    ev, lines = events(fake)
    for i in range(5):
        ev.emit(pe.REASON_FIREWALL_RULES_RESTORED, f"restored {i}", warning=True)
    fake.go.set()
    assert wait_for(lambda: ev.sent == 1)
    (name, event), = fake.events.items()
    assert name == "ts-0.uid-1.firewallrulesrestored"
    assert event["count"] == 5 and event["message"] == "restored 4" and event["type"] == "Warning"
    ev.emit(pe.REASON_FIREWALL_RULES_RESTORED, "restored 5", warning=True)
    assert wait_for(lambda: ev.sent == 2)
    assert fake.events[name]["count"] == 6 and fake.events[name]["message"] == "restored 5"
    assert ev.close(2) and not lines
    # The check once, one GET for the Event an earlier container may have left, then a POST and a PATCH.
    assert [m for m, _ in fake.calls] == ["SSAR", "SSAR", "SSAR", "GET", "POST", "PATCH"]
    assert fake.siblings and fake.siblings[0].closed and not fake.closed, "its own connection, closed"


def test_an_event_left_by_an_earlier_container_is_counted_on() -> None:
    fake = FakeEventsClient()
    fake.events["ts-0.uid-1.firewallbackend"] = {"count": 3, "message": "old"}
    ev, _ = events(fake)
    ev.emit(pe.REASON_FIREWALL_BACKEND, "nftables")
    assert wait_for(lambda: ev.sent == 1) and ev.close(2)
    assert fake.events["ts-0.uid-1.firewallbackend"]["count"] == 4


def test_several_reasons_several_events() -> None:
    fake = FakeEventsClient()
    ev, _ = events(fake)
    for reason in (pe.REASON_FIREWALL_BACKEND, pe.REASON_AUTH_KEY_REISSUE, pe.REASON_CONFIG_REJECTED):
        ev.emit(reason, "m")
    assert wait_for(lambda: ev.sent == 3) and ev.close(2)
    assert sorted(fake.events) == ["ts-0.uid-1.authkeyreissue", "ts-0.uid-1.configrejected",
                                   "ts-0.uid-1.firewallbackend"]


@pytest.mark.parametrize("rights", [("get", "patch"), ()])
def test_without_the_rights_one_line_and_no_more_calls(rights: tuple[str, ...]) -> None:
    fake = FakeEventsClient()
    ev, lines = events(fake, rights)
    assert wait_for(lambda: ev.enabled is False)
    for _ in range(100):
        ev.emit(pe.REASON_FIREWALL_RULES_RESTORED, "m", warning=True)
    assert ev.close(2)
    assert [m for m, _ in fake.calls] == ["SSAR"] * 3
    assert len(lines) == 1 and lines[0].startswith("not writing Kubernetes Events for Pod ns/ts-0: missing ")
    assert lines[0].endswith('on events in namespace "ns" (the Role needs get, create, patch on events)')


def test_an_error_asking_is_one_line_and_no_more_calls() -> None:
    fake = FakeEventsClient()
    fake.hang = True
    fake.release.set()  # every call fails at once, as a cut connection
    ev, lines = events(fake)
    assert wait_for(lambda: ev.enabled is False) and ev.close(2)
    ev.emit(pe.REASON_FIREWALL_BACKEND, "m")
    assert fake.calls == [("SSAR", "get")]
    assert lines == ["not writing Kubernetes Events for Pod ns/ts-0: error checking get permission on events: "
                     "SSAR get: connection shut down"]


@pytest.mark.parametrize(("pod", "uid"), [("", "uid-1"), ("ts-0", "")])
def test_without_pod_name_or_uid_nothing_is_asked(pod: str, uid: str) -> None:
    fake = FakeEventsClient()
    ev, lines = events(fake, pod=pod, uid=uid)
    assert ev.enabled is False and len(lines) == 1 and "POD_NAME and POD_UID must both be set" in lines[0]
    ev.emit(pe.REASON_FIREWALL_BACKEND, "m")
    assert ev.close(0) and not fake.calls


def test_a_refused_write_ends_the_writing_with_one_line() -> None:
    fake = FakeEventsClient()
    fake.fail = [403]
    ev, lines = events(fake)
    ev.emit(pe.REASON_CONFIG_REJECTED, "m", warning=True)
    assert wait_for(lambda: ev.enabled is False)
    calls = len(fake.calls)
    ev.emit(pe.REASON_CONFIG_REJECTED, "m", warning=True)
    assert ev.close(2) and len(fake.calls) == calls and ev.failed == 1
    assert len(lines) == 1 and "writing Event ConfigRejected was refused" in lines[0]


def test_failures_are_logged_once_until_a_write_succeeds() -> None:
    fake = FakeEventsClient()
    fake.fail = [500, 500, 500]
    ev, lines = events(fake)
    for _ in range(3):
        ev.emit(pe.REASON_FIREWALL_RULES_RESTORED, "m", warning=True)
        n = ev.failed + 1
        assert wait_for(lambda: ev.failed == n)  # noqa: B023 (n is read before the next round)
    assert len(lines) == 1 and lines[0].startswith("error writing Kubernetes Event FirewallRulesRestored for Pod "
                                                   "ns/ts-0 (dropped; further errors are not logged")
    ev.emit(pe.REASON_FIREWALL_RULES_RESTORED, "m", warning=True)
    assert wait_for(lambda: ev.sent == 1)
    fake.fail = [500]
    ev.emit(pe.REASON_FIREWALL_RULES_RESTORED, "m", warning=True)
    assert wait_for(lambda: ev.failed == 4) and ev.close(2)
    assert len(lines) == 2, "after a success, the next failure is news again"


def test_an_expired_event_is_created_again_and_a_raced_one_patched() -> None:
    fake = FakeEventsClient()
    ev, _ = events(fake)
    ev.emit(pe.REASON_AUTH_KEY_REISSUE, "m", warning=True)
    assert wait_for(lambda: ev.sent == 1)
    del fake.events["ts-0.uid-1.authkeyreissue"]  # the API server's --event-ttl passed
    ev.emit(pe.REASON_AUTH_KEY_REISSUE, "again", warning=True)
    assert wait_for(lambda: ev.sent == 2)
    assert fake.events["ts-0.uid-1.authkeyreissue"]["count"] == 1
    # Someone else made it between our GET and our POST: it is patched instead.
    fake.events.clear()
    ev2, _ = events(fake, uid="uid-2")
    fake.go.clear()
    ev2.emit(pe.REASON_AUTH_KEY_REISSUE, "m", warning=True)
    assert wait_for(lambda: ("GET", "ts-0.uid-2.authkeyreissue") in fake.calls)
    fake.events["ts-0.uid-2.authkeyreissue"] = {"count": 2}
    fake.go.set()
    assert wait_for(lambda: ev2.sent == 1) and ev.close(2) and ev2.close(2)
    assert fake.events["ts-0.uid-2.authkeyreissue"]["count"] == 3


def test_emit_never_blocks_nor_raises() -> None:
    fake = FakeEventsClient()
    fake.go.clear()  # the server does not answer the check
    ev, _ = events(fake)

    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

    began = time.monotonic()
    ev.emit(pe.REASON_FIREWALL_BACKEND, Hostile())  # type: ignore[arg-type]
    ev.emit("not a reason", "m")
    for i in range(1000):
        ev.emit(f"Reason{i}", "m")
    assert time.monotonic() - began < 0.5
    assert ev.dropped == 2 + 1000 - pe.MAX_PENDING
    fake.go.set()
    assert ev.close(5)


def test_close_is_bounded_when_a_call_hangs() -> None:
    fake = FakeEventsClient()
    ev, _ = events(fake)
    assert wait_for(lambda: ev.enabled)
    fake.hang = True
    ev.emit(pe.REASON_FIREWALL_BACKEND, "m")
    assert wait_for(lambda: len(fake.calls) == 4)
    began = time.monotonic()
    assert ev.close(0.3)
    assert 0.25 < time.monotonic() - began < 0.3 + pe.INTERRUPT_GRACE
    assert fake.siblings[0].deadline is None and fake.deadline == 12345.0, "the boot's deadline is not ours"


def test_close_writes_what_is_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pe, "MIN_INTERVAL", 30.0)  # the second write of a reason would wait half a minute
    fake = FakeEventsClient()
    ev, _ = events(fake)
    ev.emit(pe.REASON_FIREWALL_BACKEND, "first")
    assert wait_for(lambda: ev.sent == 1)
    ev.emit(pe.REASON_FIREWALL_BACKEND, "second")
    ev.emit(pe.REASON_CONFIG_REJECTED, "third", warning=True)
    assert ev.close(2) and ev.sent == 3
    assert fake.events["ts-0.uid-1.firewallbackend"]["message"] == "second"
