"""Auto-advertisement (TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT): prefs AdvertiseServices follow the
Services of tailscaled's serve config, on a thread of its own (`Advertiser`), so the main loop never waits
on it (upstream sleeps 20 s in its main loop after each advertisement).

Apart from cert share (vipcerts.py): the two share no state, only the LocalAPI calls of vipbase.py. The
shell in vipservices.py starts and stops it, and clears the advertisement at shutdown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from containerboot import log
from containerboot.tailscale.localapi import LocalAPIError
from containerboot.tailscale.vipbase import Calls, duration, serve_services

PREFS_TIMEOUT = 5.0  # per prefs/serve-config call, as the shutdown's unadvertise has always used
NETMAP_REFRESH_MIN = 5.0  # netmaps come in bursts; the serve watcher's own changes are handled at once
ADVERTISE_RETRY = (1.0, 60.0)  # backoff of a failed advertisement: first, most


def service_names(cfg: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The Services a serve config serves ("svc:name"), sorted: prefs compare as lists."""
    return tuple(sorted(str(name) for name in serve_services(cfg)))


# ---- advertisement ---------------------------------------------------------------------------------


@dataclass
class Advertiser:
    """Makes prefs AdvertiseServices equal to the serve config's Services, on its own thread."""

    calls: Calls
    cv: threading.Condition = field(default_factory=threading.Condition)
    due: float | None = None  # when to refresh next; None: nothing asked
    last: float = float("-inf")
    failures: int = 0
    stopped: bool = False
    busy: bool = False  # inside refresh()
    writing: bool = False  # inside refresh()'s prefs write
    advertised: tuple[str, ...] = ()  # what this program set last (empty: nothing of ours)

    def trigger(self, soon: bool) -> None:
        with self.cv:
            at = time.monotonic() if soon else max(time.monotonic(), self.last + NETMAP_REFRESH_MIN)
            self.due = at if self.due is None else min(self.due, at)
            self.cv.notify()

    def stop(self) -> None:
        """Ends the thread. A read in progress is cut off; a prefs write is let finish (join()), so that
        unadvertise, which comes next, is the last write."""
        with self.cv:
            self.stopped = True
            writing = self.writing
            self.cv.notify()
        if not writing:
            self.calls.abort()

    def run(self) -> None:
        while True:
            with self.cv:
                while not self.stopped and (self.due is None or self.due > time.monotonic()):
                    self.cv.wait(None if self.due is None else self.due - time.monotonic())
                if self.stopped:
                    return
                self.due, self.last, self.busy = None, time.monotonic(), True
            try:
                self.refresh()
                self.failures = 0
            except Exception as exc:  # noqa: BLE001 - LocalAPI errors, or a surprise: retried, never the end
                if self.stopped:
                    return
                self.failures += 1
                wait = min(ADVERTISE_RETRY[1], ADVERTISE_RETRY[0] * 2 ** (self.failures - 1))
                text = str(exc) if isinstance(exc, LocalAPIError | ValueError) else \
                    f"unexpected error: {type(exc).__name__}: {exc}"
                log.info(f"auto-advertisement: {text}; trying again in {duration(wait)}")
                with self.cv:
                    retry_at = time.monotonic() + wait
                    self.due = retry_at if self.due is None else min(self.due, retry_at)
            finally:
                with self.cv:
                    self.busy = self.writing = False
                    self.cv.notify_all()

    def refresh(self) -> None:
        cfg = self.calls.json("GET", "/localapi/v0/serve-config", PREFS_TIMEOUT)
        wanted = service_names(cfg if isinstance(cfg, dict) else None)
        if not wanted and not self.advertised:
            return  # as upstream: no Services, nothing to advertise, and someone else's prefs stay as they are
        prefs = self.calls.json("GET", "/localapi/v0/prefs", PREFS_TIMEOUT)
        current = prefs.get("AdvertiseServices") if isinstance(prefs, dict) else None
        if tuple(sorted(current or ())) == wanted:
            self.advertised = wanted
            return  # each prefs change is a state write (a Secret PATCH in Kubernetes): only when it differs
        with self.cv:
            if self.stopped:
                return  # shutting down: unadvertise owns the prefs now
            self.writing = True  # from here stop() lets the write finish rather than cut it off
        if wanted:
            log.info(f"auto-advertisement: advertising services {log.go_list(wanted)}")
        else:
            log.info(f"auto-advertisement: the serve config has no Services any more; unadvertising "
                     f"{log.go_list(self.advertised)}")
        self.calls.json("PATCH", "/localapi/v0/prefs", PREFS_TIMEOUT,
                        {"AdvertiseServicesSet": True, "AdvertiseServices": list(wanted) or None})
        self.advertised = wanted

    def join(self, timeout: float) -> None:
        """Wait (bounded) for a refresh in progress, so that unadvertise comes after its last write."""
        end = time.monotonic() + timeout
        with self.cv:
            while self.busy and time.monotonic() < end:
                self.cv.wait(end - time.monotonic())

