"""Kubernetes Events on the proxy's own Pod, best effort: what `kubectl describe pod` shows a user.

Upstream's kubeclient (kube/kubeclient/client.go, Event) keeps one Event object per reason on the Pod,
named `<pod>.<uid>.<reason in lower case>`, and on a repeat raises its `count` and `lastTimestamp`
instead of making a new object, so a condition that recurs is one line in `describe` with "(x12 over 3m)".
Its rights are asked once at start (SelfSubjectAccessReviews for get, create and patch on events); without
them, or without POD_NAME and POD_UID, it logs once and writes nothing. We do the same, and more strictly
best effort, since an Event must never hold up or break the boot:

- `emit` only queues: a daemon thread makes the calls, on a connection of its own (Client.sibling()).
- The queue is one entry per reason: repeats coalesce into the entry (its count grows, its message and
  time are the latest), and one reason is written at most once per MIN_INTERVAL, so a condition that
  flaps costs the API server one PATCH a second at most. A full queue, or more distinct reasons than
  MAX_REASONS, drops the emit and counts it (`dropped`).
- Our count of each Event is kept after its first write: a repeat is one JSON patch, not upstream's GET
  then PATCH. The GET happens once per reason, for the Event an earlier container of this Pod left.
- No retry storm: an Event that fails to write is dropped (logged once until a write succeeds again); a
  403 on a write (the Role changed since the check) ends the writing with one line, as a denied check does.
- `close(timeout)` sends what is queued until the timeout, then cuts the call in flight.

The pure parts (names, the Event object, the patch, the queue, the permission verdict) are functions and
the Pending class here, tested without a server in tests/unit/test_podevents.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from containerboot import log
from containerboot.kube.client import SA_DIR, Client, KubeError, server_address
from containerboot.settings import Settings

# The reasons the boot emits, and the type of each (kubectl shows Warning ones in `get events --types`).
REASON_FIREWALL_BACKEND = "FirewallBackend"  # Normal: which netfilter backend was chosen, and why
REASON_FIREWALL_RULES_RESTORED = "FirewallRulesRestored"  # Warning: someone removed or changed our rules
REASON_AUTH_KEY_REISSUE = "AuthKeyReissue"  # Warning: control refused the key; a new one is asked for
REASON_CONFIG_REJECTED = "ConfigRejected"  # Warning: a config file or a reload was refused
REASON_TAILSCALED_RESTARTED = "TailscaledRestarted"  # Warning: its own chains were removed; restarted for them
REASON_TAILSCALED_RULES_LOST = "TailscaledRulesLost"  # Warning: its own chains were removed; a restart would lose more
WARNING_REASONS = frozenset({REASON_FIREWALL_RULES_RESTORED, REASON_AUTH_KEY_REISSUE, REASON_CONFIG_REJECTED,
                             REASON_TAILSCALED_RESTARTED, REASON_TAILSCALED_RULES_LOST})


class Recorder(Protocol):
    """Where the boot says what it decided (PodEvents; NoEvents outside a Pod; a fake in the loop's tests)."""

    def emit(self, reason: str, message: str, warning: bool = False) -> None:
        """Best effort: never blocks, never raises."""
        ...

    def close(self, timeout: float) -> bool: ...


class NoEvents:
    """No Pod to write Events on (not in Kubernetes, or POD_NAME/POD_UID unset): nothing is written."""

    def emit(self, reason: str, message: str, warning: bool = False) -> None:
        pass

    def close(self, timeout: float) -> bool:
        return True

COMPONENT = "containerboot"  # the Event's source.component (upstream's tailscaled writes its own as
# "tailscale-state-store", with reasons of its own, so the names never meet)
VERBS = ("get", "create", "patch")  # what the operator's Role grants on events, and all we use
MAX_MESSAGE = 1024  # characters; events.k8s.io caps a note at 1 KiB, and describe shows one line of it
MAX_REASON = 63  # a reason names the object too: with a Pod name and a UID it must stay a DNS subdomain
MAX_PENDING = 8  # reasons waiting to be written at once (four are emitted today)
MAX_REASONS = 16  # distinct reasons per process: bounds what is remembered about each
MIN_INTERVAL = 1.0  # seconds between two writes of one reason's Event; the repeats between coalesce
CALL_BUDGET = 10.0  # one write (GET, POST or PATCH, with the client's retries) takes at most this
IDLE_WAIT = 60.0  # the idle worker wakes this often anyway, so no wait is unbounded
INTERRUPT_GRACE = 0.5  # after close's timeout, how long the cut call has to unwind


# ---- pure decisions ---------------------------------------------------------------------------------


def event_name(pod_name: str, pod_uid: str, reason: str) -> str:
    """Upstream's nameForEvent: one object per reason per Pod (the UID keeps a new Pod of the same name
    from counting on the old one's Events)."""
    return f"{pod_name}.{pod_uid}.{reason.lower()}"


def reason_ok(reason: str) -> bool:
    """A reason is CamelCase letters and digits (Kubernetes' convention), short enough to name an object."""
    return (0 < len(reason) <= MAX_REASON and reason.isascii() and reason.isalnum()
            and reason[0].isalpha())


def cut(message: str) -> str:
    """The message as the Event carries it: at most MAX_MESSAGE characters, marked when cut."""
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 1] + "\u2026"


def rfc3339(wall: float) -> str:
    """A metav1.Time as the API server writes it: UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


@dataclass
class Occurrence:
    """One reason's emits since its Event was last written: what the next write says."""

    reason: str
    message: str
    warning: bool
    times: int  # how many emits this stands for: what the write adds to the Event's count
    first: float  # wall-clock time of the first of them (a new Event's firstTimestamp)
    last: float  # and of the last (lastTimestamp)


def new_event(namespace: str, pod_name: str, pod_uid: str, occ: Occurrence) -> dict[str, Any]:
    """The core v1 Event upstream creates for a reason's first occurrence, counting all coalesced into it."""
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": event_name(pod_name, pod_uid, occ.reason), "namespace": namespace},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "namespace": namespace,
                           "uid": pod_uid},
        "reason": occ.reason,
        "message": cut(occ.message),
        "type": "Warning" if occ.warning else "Normal",
        "source": {"component": COMPONENT},
        "firstTimestamp": rfc3339(occ.first),
        "lastTimestamp": rfc3339(occ.last),
        "count": occ.times,
    }


def repeat_patch(count: int, occ: Occurrence) -> list[dict[str, Any]]:
    """The JSON patch of a repeat: the new count and lastTimestamp, as upstream, and the latest message
    (upstream keeps the first; the latest is what lastTimestamp dates, and what a user needs now).
    "add" rather than "replace": it also sets a field an Event from elsewhere left out."""
    return [{"op": "add", "path": "/count", "value": count},
            {"op": "add", "path": "/lastTimestamp", "value": rfc3339(occ.last)},
            {"op": "add", "path": "/message", "value": cut(occ.message)}]


def stored_count(event: Mapping[str, Any]) -> int:
    """The count of an Event that exists: at least 1 (Go's omitempty drops a zero count)."""
    count = event.get("count")
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1


def denied(namespace: str, answers: Mapping[str, bool | KubeError]) -> str | None:
    """The one line to log when Events cannot be written, from the access reviews' answers (verb ->
    allowed, or the error asking); None when all of VERBS are allowed."""
    for verb in VERBS:
        answer = answers.get(verb)
        if isinstance(answer, KubeError):
            return f"error checking {verb} permission on events: {answer}"
    missing = [verb for verb in VERBS if answers.get(verb) is not True]
    if not missing:
        return None
    return (f"missing {', '.join(missing)} permission on events in namespace {json.dumps(namespace)} "
            f"(the Role needs {', '.join(VERBS)} on events)")


class Pending:
    """The worker's queue, coalescing: one entry per reason, at most `cap` of them; a reason falls due
    `interval` seconds after its last write. Times are time.monotonic() (`now`) and time.time() (`wall`)."""

    def __init__(self, cap: int = MAX_PENDING, reasons: int = MAX_REASONS, interval: float | None = None) -> None:
        self.cap, self.reasons = cap, reasons
        self.interval = MIN_INTERVAL if interval is None else interval  # read at run time: tests shorten it
        self._waiting: dict[str, Occurrence] = {}  # in order of arrival
        self._written: dict[str, float] = {}  # reason -> when it was last taken for writing
        self._seen: set[str] = set()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, reason: str, message: str, warning: bool, wall: float) -> bool:
        """Queue one emit, or coalesce it into its reason's entry; False (and counted) when dropped."""
        occ = self._waiting.get(reason)
        if occ is not None:
            occ.times += 1
            occ.message, occ.warning, occ.last = message, warning, wall
            return True
        if (not reason_ok(reason) or len(self._waiting) >= self.cap
                or (reason not in self._seen and len(self._seen) >= self.reasons)):
            self.dropped += 1
            return False
        self._seen.add(reason)
        self._waiting[reason] = Occurrence(reason, message, warning, 1, wall, wall)
        return True

    def take(self, now: float, flush: bool = False) -> tuple[Occurrence | None, float | None]:
        """(the next entry due, removed and its reason marked written at `now`; None) or (None, seconds
        until the next falls due; None when nothing waits). With `flush` every entry is due (closing)."""
        wait: float | None = None
        for reason, occ in self._waiting.items():
            last = self._written.get(reason)
            due = now if flush or last is None else last + self.interval
            if due <= now:
                del self._waiting[reason]
                self._written[reason] = now
                return occ, None
            wait = due - now if wait is None else min(wait, due - now)
        return None, wait

    def clear(self) -> None:
        self._waiting.clear()


# ---- the worker -------------------------------------------------------------------------------------


class PodEvents:
    """Events on the Pod `pod_name` (UID `pod_uid`) in `namespace`, written by a thread of their own.

    `emit` never blocks and never raises; `close` ends the thread within its timeout (plus
    INTERRUPT_GRACE when a call had to be cut). Counters for metrics and tests: `sent` (writes that
    succeeded), `failed` (writes that did not), `dropped` (emits not queued). `enabled` is None until the
    permission check has answered, then whether Events are written."""

    def __init__(self, client: Client, namespace: str, pod_name: str, pod_uid: str,
                 say: Callable[[str], None] = log.info) -> None:
        self.namespace, self.pod_name, self.pod_uid = namespace, pod_name, pod_uid
        self._log = say
        self._pending = Pending()
        self._cond = threading.Condition()
        self._closing = False
        self._close_by: float | None = None  # monotonic; set by close()
        self._known: dict[str, int] = {}  # reason -> the count its Event has (after our write)
        self._failing = False  # a write failed and was logged; quiet until one succeeds
        self.sent = self.failed = 0
        self.enabled: bool | None = None
        # A connection of its own: the boot's calls on the shared client never wait behind an Event, and
        # the boot's deadline (client.deadline) does not cut these. The boot's stop (a shutdown signal)
        # still refuses retries; so does our close once its time is up.
        self._client = client.sibling()
        self._client.deadline = None
        parent_stop = client.stop
        self._client.stop = lambda: parent_stop() or self._past_close()
        self._thread: threading.Thread | None = None
        if not pod_name or not pod_uid:
            self._disable("POD_NAME and POD_UID must both be set (the operator sets them from the Pod's "
                          "metadata)")
            return
        self._thread = threading.Thread(target=self._run, name="pod-events", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self._pending.dropped

    def emit(self, reason: str, message: str, warning: bool = False) -> None:
        """Queue an Event of `reason` (one of the REASON_* constants; CamelCase) on the Pod. Repeats of a
        reason add to its count. `message` is shown to anyone who may read events: never put a secret in it."""
        try:
            wall = time.time()
            with self._cond:
                if self.enabled is False or self._closing:
                    return
                if self._pending.add(reason, str(message), bool(warning), wall):
                    self._cond.notify()
        except Exception:  # never the caller's problem; e.g. a message whose str() raised
            self._pending.dropped += 1

    def close(self, timeout: float) -> bool:
        """Write what is queued for up to `timeout` seconds, then stop: True when the thread has ended."""
        with self._cond:
            self._closing = True
            self._close_by = time.monotonic() + max(0.0, timeout)
            self._cond.notify()
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, timeout))
            if thread.is_alive():  # a call begun before close, bounded by CALL_BUDGET only: cut it
                self._client.interrupt()
                thread.join(INTERRUPT_GRACE)
            if thread.is_alive():
                return False  # a daemon thread: it cannot outlive the process
        self._client.close()
        return True

    # ---- the thread -------------------------------------------------------------------------------

    def _past_close(self) -> bool:
        close_by = self._close_by
        return close_by is not None and time.monotonic() >= close_by

    def _deadline(self) -> float:
        deadline = time.monotonic() + CALL_BUDGET
        close_by = self._close_by
        return deadline if close_by is None else min(deadline, close_by)

    def _disable(self, why: str) -> None:
        with self._cond:
            self.enabled = False
            self._pending.clear()
        self._log(f"not writing Kubernetes Events for Pod {self.namespace}/{self.pod_name}: {why}")

    def _run(self) -> None:
        try:
            if not self._check():
                return
            while True:
                occ = self._next()
                if occ is None:
                    return
                self._write_logged(occ)
        except Exception as exc:  # a bug must not end in a traceback on the proxy's log
            self._disable(f"unexpected {type(exc).__name__}: {exc}")

    def _check(self) -> bool:
        answers: dict[str, bool | KubeError] = {}
        for verb in VERBS:
            try:
                answers[verb] = self._client.allowed(verb, "events", namespace=self.namespace,
                                                     deadline=self._deadline())
            except KubeError as exc:
                answers[verb] = exc
                break  # the others would most likely fail alike, each after its retries
        why = denied(self.namespace, answers)
        if why is not None:
            self._disable(why)
            return False
        with self._cond:
            self.enabled = True
        return True

    def _next(self) -> Occurrence | None:
        """The next entry to write, waiting for one; None when closing and done (or out of time)."""
        with self._cond:
            while True:
                if self._closing and self._past_close():
                    return None
                occ, wait = self._pending.take(time.monotonic(), flush=self._closing)
                if occ is not None:
                    return occ
                if self._closing:
                    return None  # everything queued is written
                self._cond.wait(IDLE_WAIT if wait is None else min(wait, IDLE_WAIT))

    def _write_logged(self, occ: Occurrence) -> None:
        try:
            self._write(occ)
        except (KubeError, OSError, ValueError) as exc:
            self.failed += 1
            if isinstance(exc, KubeError) and exc.code == 403:
                self._disable(f"writing Event {occ.reason} was refused: {exc}")
                return
            if not self._failing:
                self._failing = True
                self._log(f"error writing Kubernetes Event {occ.reason} for Pod {self.namespace}/{self.pod_name} "
                          f"(dropped; further errors are not logged until a write succeeds): {exc}")
            return
        self.sent += 1
        self._failing = False

    def _write(self, occ: Occurrence) -> None:
        name = event_name(self.pod_name, self.pod_uid, occ.reason)
        # Two rounds at most: a PATCH finding the Event gone (the API server's --event-ttl expires Events,
        # 1 h by default) creates it again; a POST finding it there (made meanwhile) patches it.
        for _ in range(2):
            count = self._known.get(occ.reason)
            if count is None:
                try:
                    count = stored_count(self._client.get_event(self.namespace, name, self._deadline()))
                except KubeError as exc:
                    if not exc.not_found:
                        raise
                    count = 0
            try:
                if count == 0:
                    self._client.create_event(self.namespace, new_event(self.namespace, self.pod_name,
                                                                        self.pod_uid, occ), self._deadline())
                else:
                    self._client.patch_event(self.namespace, name, repeat_patch(count + occ.times, occ),
                                             self._deadline())
            except KubeError as exc:
                self._known.pop(occ.reason, None)
                if exc.code not in (404, 409):
                    raise
                continue
            self._known[occ.reason] = count + occ.times
            return
        raise KubeError(f"Event {name} was deleted or created by someone else twice in a row")


def open_events(s: Settings, stop: Callable[[], bool], client: Client | None = None) -> Recorder:
    """PodEvents for this Pod where there is one, on a sibling of `client` (the state Secret's, whose
    credentials and TLS context are loaded already) or of a client of its own; the rights are asked in
    its thread."""
    if not (s.in_kubernetes and s.pod_name and s.pod_uid):
        return NoEvents()
    if client is None:
        try:
            host, port = server_address(s, os.environ)
            client = Client(s.root_path(SA_DIR), host, port, stop=stop)
        except KubeError as exc:
            log.info(f"not writing Kubernetes Events for Pod {s.pod_name}: {exc}")
            return NoEvents()
    return PodEvents(client, client.namespace, s.pod_name, s.pod_uid)
