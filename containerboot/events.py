"""What the boot's loop is told, and how it waits and stops: shared by the loop (containerboot/boot/) and
the collaborators it drives (kube/state.py, kube/configdir.py, proxygroup/services.py), so it sits
beside them rather than inside boot/, and none of them imports the loop.

One type per kind of event: a reader thread, a signal handler, a watcher or the tailscaled child puts
one in the `Inbox`, and the loop takes them in order. `Exit` ends the program with a code and a line.
`Cancel` is what a SIGTERM or SIGINT interrupts: a blocking call of the main thread is aborted at once
(a kube-apiserver that accepts and never answers must not hold a shutdown for its timeout), any other
wait is asked to stop. The `Clock` is the one source of time, so the loop can run on a fake one in tests.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn, Protocol

from containerboot import log
from containerboot.tailscale.ipn import Notification


@dataclass(frozen=True)
class Notify:
    """One notification from tailscaled's IPN bus, from the watch numbered `watch` (a later watch makes
    the ones still queued from an earlier one stale)."""

    note: Notification
    watch: int
    at: float  # when it arrived (the Clock's time): the netmap's age, and the "our share" figure


@dataclass(frozen=True)
class BusError:
    """The IPN bus watch numbered `watch` failed."""

    message: str
    watch: int


@dataclass(frozen=True)
class TailscaledExit:
    """tailscaled exited on its own: its wait status (negative: killed by that signal)."""

    code: int


@dataclass(frozen=True)
class Signal:
    """SIGTERM or SIGINT arrived."""

    signum: int


@dataclass(frozen=True)
class ConfigChanged:
    """The versioned config directory changed (the kubelet swapped ..data)."""


@dataclass(frozen=True)
class ServicesChanged:
    """A ProxyGroup service config changed."""


Event = Notify | BusError | TailscaledExit | Signal | ConfigChanged | ServicesChanged


class Exit(Exception):
    """End the program with `code`, logging `message` (if any) first."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code


class RestartTailscaled(Exception):
    """End this boot, and begin another with a new tailscaled in the same process (the rules ours stay)."""


def signal_exit(signum: int) -> Exit:
    return Exit(0, f"Received {signal.Signals(signum).name}, shutting down")


def stop_now(signum: int) -> NoReturn:
    """A shutdown signal seen between events: said at once, then the program ends with 0."""
    log.info(f"Received {signal.Signals(signum).name}, shutting down")
    raise Exit(0)


class Clock(Protocol):
    """Time as the loop and its collaborators see it (monotonic seconds)."""

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def wait(self, events: queue.SimpleQueue[Event], timeout: float) -> Event | None:
        """The next event within `timeout` seconds, or None."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, events: queue.SimpleQueue[Event], timeout: float) -> Event | None:
        try:
            return events.get(timeout=timeout)
        except queue.Empty:
            return None


class Every:
    """A period on the loop's Clock, asked on the tick: `due()` is true at most once per `seconds`."""

    def __init__(self, clock: Clock, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self.next = 0.0

    def due(self) -> bool:
        if self.clock.now() < self.next:
            return False
        self.restart()
        return True

    def restart(self) -> None:
        """The next one a whole period from now."""
        self.next = self.clock.now() + self.seconds


class Inbox:
    """The loop's one queue. put() is safe from threads and from signal handlers."""

    def __init__(self, clock: Clock) -> None:
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.clock = clock

    def put(self, ev: Event) -> None:
        self._events.put(ev)

    def get(self, timeout: float) -> Event | None:
        return self.clock.wait(self._events, timeout)


class Cancel:
    """The shutdown request: set by SIGTERM or SIGINT, read by every wait of the boot.

    A signal posts `Signal` to the inbox, where the loop handles it between events. While the main thread
    is inside `blocking()` the handler also raises `Exit(0)` right there, which aborts the system call the
    thread is in. A second signal during the shutdown itself calls `on_repeat` (stop waiting for the
    Tailscale Services' failover)."""

    def __init__(self, inbox: Inbox, on_repeat: Callable[[], None] = lambda: None) -> None:
        self.inbox = inbox
        self.on_repeat = on_repeat
        self.signum = 0  # the signal that asked us to stop
        self.shutting_down = False
        self._blocking = False

    def requested(self) -> bool:
        return bool(self.signum)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.shutting_down:
            self.on_repeat()
        self.signum = signum
        self.inbox.put(Signal(signum))
        if self._blocking:
            self._blocking = False
            raise signal_exit(signum)

    def shutdown(self) -> None:
        """From here calls run to their own timeouts: the signal has been handled already."""
        self.shutting_down = True
        self._blocking = False

    def resume(self) -> None:
        """After an in-process restart of tailscaled: signals act again, and the next boot reads a new inbox
        (what the stopped tailscaled's threads still post lands in the old one, unread)."""
        self.shutting_down = False
        self.inbox = Inbox(self.inbox.clock)

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        """A blocking call in the main thread that a shutdown signal may abort. In another thread (the
        Kubernetes setup runs beside detection) calls are bounded by their timeouts and deadline only."""
        if self.shutting_down or threading.current_thread() is not threading.main_thread():
            yield
            return
        if self.signum:
            raise signal_exit(self.signum)
        outer, self._blocking = self._blocking, True
        try:
            yield
        finally:
            self._blocking = outer
