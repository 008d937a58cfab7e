"""BusSession: tailscaled's IPN bus as the loop reads it.

Each phase opens the watch with the mask it needs; a thread of ours reads the stream into the inbox as
typed notifications, numbered by watch so that what is still queued from a closed watch is dropped. A
stream that drops is reopened with backoff (upstream's reconnectingIPNBusWatcher): the new watch starts
with a full status, so nothing is missed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from containerboot import log
from containerboot.events import BusError, Cancel, Clock, Event, Exit, Inbox, Notify
from containerboot.tailscale import ipn
from containerboot.tailscale.localapi import WATCH_OPEN_TIMEOUT, LocalAPIError, TailscaledAPI, Watch

MAX_BACKOFF = 30.0
REFUSED_RETRY = 0.05  # a first watch refused (tailscaled not listening yet) is tried again this often
MAX_DIAL_FAILURE = 60.0  # a watch that cannot be reopened for this long means tailscaled is gone
STEADY = 30.0  # a watch that lived this long starts the backoff again from its smallest step


class BusSession:
    def __init__(self, api: TailscaledAPI, inbox: Inbox, cancel: Cancel, clock: Clock, boot_timeout: float) -> None:
        self.api = api
        self.inbox = inbox
        self.cancel = cancel
        self.clock = clock
        self.boot_timeout = boot_timeout
        self.watch: Watch | None = None
        self.watch_id = 0
        self.mask = 0
        self.opened_at = 0.0
        self.reconnect_at: float | None = None
        self.backoff = 0.0
        self.dial_failing_since: float | None = None
        self.heard = False  # any notification arrived (a tailscaled that never answered advertised nothing)

    def deadline_exit(self) -> Exit:
        return Exit(1, "reading tailscaled IPN bus: context deadline exceeded "
                       f"(TS_BOOT_TIMEOUT={self.boot_timeout:g}s)")

    def open(self, mask: int, deadline: float | None, alive: Callable[[], bool]) -> None:
        """Watch with `mask`. Before the boot is done (`deadline` set) the deadline bounds the wait for
        tailscaled's answer too, and a socket that exists but does not listen yet (a restart's old file,
        or bind before listen) is tried again every REFUSED_RETRY while tailscaled is `alive`."""
        self.close()
        self.mask = mask
        self.reconnect_at = None
        self.backoff = 0.0
        while True:
            timeout = WATCH_OPEN_TIMEOUT
            if deadline is not None:
                timeout = max(0.05, min(timeout, deadline - self.clock.now()))
            try:
                watch = self.api.watch(mask, timeout)
                break
            except LocalAPIError as exc:
                not_yet = isinstance(exc.__cause__, (ConnectionRefusedError, FileNotFoundError))
                if (not_yet and deadline is not None and not self.cancel.requested()
                        and self.clock.now() + REFUSED_RETRY < deadline and alive()):
                    self.clock.sleep(REFUSED_RETRY)
                    continue
                if deadline is not None and self.clock.now() >= deadline:
                    raise self.deadline_exit() from exc
                raise Exit(1, f"failed to watch tailscaled for updates: {exc}") from exc
        self._attach(watch)

    def _attach(self, watch: Watch) -> None:
        self.watch_id += 1
        self.watch = watch
        self.opened_at = self.clock.now()
        self.dial_failing_since = None
        threading.Thread(target=self._read, args=(watch, self.watch_id), name="ipn-bus", daemon=True).start()

    def _read(self, watch: Watch, wid: int) -> None:
        try:
            for notify in watch:
                self.heard = True
                self.inbox.put(Notify(ipn.notification(notify), wid, self.clock.now()))
        except LocalAPIError as exc:
            self.inbox.put(BusError(str(exc), wid))

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
            self.watch_id += 1  # anything still queued from it is stale

    def dropped(self, message: str) -> None:
        """The stream failed (tailscaled itself is alive): reopen it after the backoff."""
        self.close()
        log.info(f"IPN bus watch ended; reconnecting: {message}")
        if self.clock.now() - self.opened_at >= STEADY:
            self.backoff = 0.0
        self._schedule()

    def _schedule(self) -> None:
        self.backoff = min(MAX_BACKOFF, max(0.1, self.backoff * 2))
        self.reconnect_at = self.clock.now() + self.backoff

    def _maybe_reconnect(self) -> None:
        if self.reconnect_at is None or self.clock.now() < self.reconnect_at:
            return
        try:
            watch = self.api.watch(self.mask)
        except LocalAPIError as exc:
            now = self.clock.now()
            if self.dial_failing_since is None:
                self.dial_failing_since = now
            elif now - self.dial_failing_since >= MAX_DIAL_FAILURE:
                raise Exit(1, f"reading tailscaled IPN bus: {exc}") from exc
            self._schedule()
            return
        self.reconnect_at = None
        self._attach(watch)
        log.info("IPN bus watch reconnected")

    def next_event(self, deadline: float | None = None) -> Event | None:
        """The next live event, or None on a tick (at most one second, or at the deadline); a due
        reconnect is tried first."""
        while True:
            self._maybe_reconnect()
            now = self.clock.now()
            wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - now))
            if self.reconnect_at is not None:
                wait = min(wait, max(0.0, self.reconnect_at - now))
            ev = self.inbox.get(wait)
            if ev is None:
                return None
            if isinstance(ev, Notify | BusError) and ev.watch != self.watch_id:
                continue
            return ev
