"""The boot's loop built in-process against fakes: tailscaled's LocalAPI and IPN bus, the child process,
the netfilter Driver, tailscaled's own chains, the state Secret, the Pod's Events and a clock.

Each fake is a full implementation of its seam (TailscaledAPI, Child, Driver, StateStore, Clock), in
memory, and writes what it was asked into one shared journal, so that a test can check the order in
which the loop asked things of different collaborators (the device ID before any rule, endpoints only
after the rules are live, the shutdown's sequence). `LoopLab.start()` runs the boots in a thread;
the test drives it through the fakes and reads the journal and the log lines.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from containerboot import log
from containerboot.boot.loop import Boot
from containerboot.boot.main import run
from containerboot.boot.prepare import Firewall
from containerboot.events import Cancel, Event, Inbox
from containerboot.kube.client import KubeError
from containerboot.settings import Settings, load
from containerboot.tailscale.localapi import LocalAPIError
from firewall.detect import Detection
from firewall.model import FirewallBusy, FirewallError, Plan
from firewall.tschains import Chain
from tests.lab.wait import wait_for

IDLE = 0.01  # real seconds the fake clock waits for an event before it lets fake time pass


class FakeClock:
    """Fake time that passes only while the loop waits with nothing to do (after IDLE real seconds), so
    minutes of timers take a fraction of a second, and an event posted by a test is never overtaken."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.lock = threading.Lock()

    def now(self) -> float:
        with self.lock:
            return self.t

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.t += max(0.0, seconds)

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def wait(self, events: queue.SimpleQueue[Event], timeout: float) -> Event | None:
        try:
            return events.get(timeout=IDLE)
        except queue.Empty:
            self.advance(timeout)
            return None


class FakeWatch:
    def __init__(self, api: FakeTailscaled) -> None:
        self.api = api
        self.q: queue.SimpleQueue[dict[str, object] | Exception | None] = queue.SimpleQueue()

    def __iter__(self) -> Iterator[Mapping[str, object]]:
        while True:
            item = self.q.get()
            if item is None:
                raise LocalAPIError("reading the IPN bus: closed")
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self.q.put(None)


class FakeTailscaled:
    """TailscaledAPI in memory. Every watch starts with the full status (as NotifyInitialStatus makes
    tailscaled do); `refuse` makes the next watches fail; `drop()` ends the current stream."""

    def __init__(self, journal: list[str], socket_path: str) -> None:
        self.journal = journal
        self.socket_path = socket_path
        self.status: dict[str, object] = {}  # InitialStatus; empty: not logged in yet
        self.state = "Running"
        self.watches: list[FakeWatch] = []
        self.refuse = 0
        self.answers: dict[str, object] = {}  # by "METHOD path"

    def running(self, stable_id: str = "n1", name: str = "proxy.ts.net.",
                addrs: tuple[str, ...] = ("100.64.0.7", "fd7a:115c:a1e0::7")) -> None:
        me = {"ID": stable_id, "DNSName": name, "TailscaleIPs": list(addrs)}
        self.status = {"BackendState": "Running", "Self": me}

    def watch(self, mask: int, timeout: float = 5.0) -> FakeWatch:
        if self.refuse:
            self.refuse -= 1
            self.journal.append("api: watch refused")
            raise LocalAPIError("watch-ipn-bus: connection refused")
        w = FakeWatch(self)
        self.watches.append(w)
        self.journal.append("api: watch")
        if self.status:
            w.q.put({"InitialStatus": self.status})
        return w

    def push(self, notify: dict[str, object]) -> None:
        self.watches[-1].q.put(notify)

    def drop(self) -> None:
        self.watches[-1].q.put(LocalAPIError("the IPN bus stream ended (tailscaled went away)"))

    def json(self, method: str, path: str, payload: object = None, headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> object:
        self.journal.append(f"api: {method} {path}")
        answer = self.answers.get(f"{method} {path}")
        if isinstance(answer, Exception):
            raise answer
        return answer

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float | None = 10.0) -> tuple[int, dict[str, str], bytes]:
        self.journal.append(f"api: {method} {path}")
        return 404, {}, b""


class FakeChild:
    def __init__(self, journal: list[str], on_exit: Callable[[int], None]) -> None:
        self.journal = journal
        self.on_exit = on_exit
        self.code: int | None = None

    @property
    def returncode(self) -> int | None:
        return self.code

    def alive(self) -> bool:
        return self.code is None

    def exit(self, code: int) -> None:
        """tailscaled dies on its own."""
        self.code = code
        self.on_exit(code)

    def terminate(self, timeout: float) -> int | None:
        self.journal.append("child: SIGTERM")
        self.code = -15
        self.on_exit(self.code)  # as the real one's waiting thread does: an event the loop must not mistake
        return self.code


class FakeDriver:
    """Driver in memory; `busy` applies fail as if another program held the lock."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.name = "fake-nftables"
        self.lock_wait = 5.0
        self.current = Plan()
        self.busy = 0
        self.broken = ""  # an apply fails with this FirewallError

    def apply(self, plan: Plan, full: bool = False) -> None:
        if self.busy:
            self.busy -= 1
            self.journal.append("driver: busy")
            raise FirewallBusy("another program holds the xtables lock")
        if self.broken:
            raise FirewallError(self.broken)
        self.journal.append(f"driver: apply {len(plan.rules)}{' full' if full else ''}")
        self.current = plan

    def flush(self) -> None:
        self.journal.append("driver: flush")
        self.current = Plan()

    def installed(self) -> Plan:
        return self.current


class FakeChains:
    """ChainReader in memory: tailscaled's own chains with their rule counts, as the test sets them (a
    started FakeChild makes `on_start` of them, as tailscaled's router does)."""

    def __init__(self) -> None:
        self.counts: dict[Chain, int] = {}
        self.on_start: dict[Chain, int] = {}
        self.reads = 0

    def read(self) -> dict[Chain, int] | None:
        self.reads += 1
        return dict(self.counts)


class FakeStore:
    """StateStore in memory; `fail` patches fail (KubeError) while it is above 0."""

    def __init__(self, journal: list[str], name: str = "proxy-0") -> None:
        self.journal = journal
        self.name = name
        self.can_patch = True
        self.data: dict[str, bytes] = {}
        self.fail = 0
        self.deadline: float | None = None

    def get(self, deadline: float | None = None) -> dict[str, bytes] | None:
        return dict(self.data)

    def patch(self, data: Mapping[str, bytes | None]) -> None:
        if self.fail:
            self.fail -= 1
            self.journal.append("store: patch refused")
            raise KubeError("the apiserver said no", code=500)
        self.journal.append("store: " + ",".join(sorted(data)))
        for key, value in data.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value

    def delete_authkey(self) -> None:
        self.journal.append("store: -authkey")
        self.data.pop("authkey", None)

    def set_deadline(self, deadline: float | None) -> None:
        self.deadline = deadline


class FakeEvents:
    """Recorder in memory: each Event the boot emits, in the journal too."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.emitted: list[tuple[str, str, bool]] = []

    def emit(self, reason: str, message: str, warning: bool = False) -> None:
        self.journal.append(f"event: {reason}")
        self.emitted.append((reason, message, warning))

    def close(self, timeout: float) -> bool:
        return True


@dataclass
class Ended:
    code: int | None = None


class LoopLab:
    """A Boot on fakes. `env` holds TS_* settings; TS_SOCKET and TS_TEST_ONLY_ROOT point into `tmp`."""

    def __init__(self, tmp: Path, kube: bool = False, **env: str) -> None:
        self.journal: list[str] = []
        self.clock = FakeClock()
        sock = tmp / "tailscaled.sock"
        sock.write_text("")  # wait_for_socket only needs the path to exist
        base = {"TS_SOCKET": str(sock), "TS_TEST_ONLY_ROOT": str(tmp), "TS_AUTH_ONCE": "false",
                "TS_USERSPACE": "false"}
        if kube:
            base.update(KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT="443", TS_KUBE_SECRET="proxy-0")
        self.s: Settings = load({**base, **env})
        self.api = FakeTailscaled(self.journal, str(sock))
        self.driver = FakeDriver(self.journal)
        self.store = FakeStore(self.journal) if kube else None
        self.events = FakeEvents(self.journal)
        self.chains = FakeChains()
        self.children: list[FakeChild] = []
        self.cli_calls: list[list[str]] = []
        self.out = io.StringIO()
        log.setup("text", self.out)
        self.inbox = Inbox(self.clock)
        self.cancel = Cancel(self.inbox)
        detection = Detection("nftables", ("fake netfilter",), fake=True)
        self.boot = Boot(self.s, self.api, Firewall(detection, self.driver, {}, self.chains), self.store, self.events,
                         self.cancel, self.clock, self.clock.now() + self.s.boot_timeout, launch=self.launch,
                         cli=self.cli)
        self.ended = Ended()
        self.thread: threading.Thread | None = None

    def launch(self, argv: list[str], env: Mapping[str, str], on_exit: Callable[[int], None]) -> FakeChild:
        self.journal.append("child: start")
        self.chains.counts = dict(self.chains.on_start)
        self.children.append(FakeChild(self.journal, on_exit))
        return self.children[-1]

    def cli(self, argv: list[str], timeout: float | None, stop: Callable[[], bool]) -> str | None:
        self.cli_calls.append(argv)
        self.journal.append(f"cli: {argv[1] if len(argv) > 1 else argv[0]}")
        return None

    def start(self) -> LoopLab:
        def boots() -> None:
            self.ended.code = run(self.boot)

        self.thread = threading.Thread(target=boots, name="boot-under-test", daemon=True)
        self.thread.start()
        return self

    def lines(self) -> list[str]:
        return [ln.split(" ", 3)[3] for ln in self.out.getvalue().splitlines() if ln.startswith("boot: ")]

    def wait_log(self, text: str, timeout: float = 5.0) -> str:
        line = wait_for(lambda: next((ln for ln in self.lines() if text in ln), None), timeout)
        assert line, f"no log line containing {text!r} in:\n" + "\n".join(self.lines())
        return str(line)

    def wait_journal(self, entry: str, timeout: float = 5.0, after: int = 0) -> int:
        """The index of the first journal entry equal to `entry` at or after `after`."""
        found = wait_for(lambda: next((i + 1 for i, e in enumerate(self.journal) if i >= after and e == entry), None),
                         timeout)
        assert found, f"no {entry!r} in the journal: {self.journal}"
        return int(found) - 1

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM as the handler delivers it, then the exit code."""
        self.cancel.on_signal(15, None)  # off the main thread: posts Signal(15), never raises
        return self.join(timeout)

    def join(self, timeout: float = 5.0) -> int | None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the boot did not end:\n" + "\n".join(self.lines())
        return self.ended.code
