"""Tailscale Services on a proxy: cert share loops and auto-advertisement (TS_EXPERIMENTAL_CERT_SHARE,
TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT), and unadvertising them with the failover wait at shutdown.

- Cert share (vipcerts.py): the `rw` replica of an HA Ingress (POD_NAME ending in -0) keeps the shared
  certificate of each Service HTTPS name fresh, backing off as upstream's loops do.
- Advertisement (vipadvertise.py): prefs AdvertiseServices follow the Services of tailscaled's serve config.

Both run on threads of their own, so the main loop never waits on them (upstream sleeps 20 s in its main
loop after each advertisement); what they share is in vipbase.py. This module is the shell Boot drives
(`Services`); the parts' names are importable from here too, as they were when all of it lived here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from containerboot import log
from containerboot.settings import Settings
from containerboot.tailscale.localapi import LocalAPIError, TailscaledAPI
from containerboot.tailscale.vipadvertise import (
    ADVERTISE_RETRY,
    NETMAP_REFRESH_MIN,
    PREFS_TIMEOUT,
    Advertiser,
    service_names,
)
from containerboot.tailscale.vipbase import Calls, duration
from containerboot.tailscale.vipcerts import (
    CERT_CALL_TIMEOUT,
    DOMAINS_TIMEOUT,
    RENEW_INTERVAL,
    RETRY_SCHEDULE,
    CertError,
    CertLoops,
    Timing,
    cert_domains,
    cert_share_mode,
    next_retry,
    retry_after,
)
from containerboot.tailscale.vipcerts import _cert_error as _cert_error  # tests check the classification here

__all__ = [
    "ADVERTISE_RETRY", "CERT_CALL_TIMEOUT", "DOMAINS_TIMEOUT", "FAILOVER_WAIT", "JOIN_TIMEOUT", "NETMAP_REFRESH_MIN",
    "PREFS_TIMEOUT", "RENEW_INTERVAL", "RETRY_SCHEDULE", "CertError", "Services", "Timing", "cert_domains",
    "cert_share_mode", "duration", "next_retry", "retry_after", "service_names",
]

FAILOVER_WAIT = 20.0  # upstream: about 15 s for control to pick another primary, 5 s to spare
JOIN_TIMEOUT = 1.0
_TIMING = Timing()  # upstream's intervals: the default of every Services


class Services:
    """Boot's handle: `start()` once tailscaled runs, `on_serve_config(cfg)` from the serve watcher,
    `on_netmap(self_changed)` per netmap, and at shutdown `unadvertise(deadline)` then `wait_failover(until)`.
    Nothing here blocks the caller except the shutdown calls, which are bounded by the deadline given."""

    def __init__(self, s: Settings, api: TailscaledAPI, timing: Timing = _TIMING,
                 failover_wait: float = FAILOVER_WAIT) -> None:
        self.api = api
        self.mode = cert_share_mode(s)
        self.failover_wait = failover_wait
        self._cut = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cert_calls = Calls(api.socket_path)
        self.certs = CertLoops(self._cert_calls, timing) if self.mode == "rw" else None
        self.advertiser = Advertiser(Calls(api.socket_path)) if s.service_auto_advertisement else None

    @property
    def cert_loops(self) -> tuple[str, ...]:
        """The domains whose certificates this replica keeps fresh."""
        if self.certs is None:
            return ()
        with self.certs.cv:
            return tuple(sorted(self.certs.loops))

    def start(self) -> None:
        if self._threads:
            return
        for name, target in (("cert-loops", self.certs.run if self.certs else None),
                             ("advertise", self.advertiser.run if self.advertiser else None)):
            if target is not None:
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def on_serve_config(self, cfg: Mapping[str, Any]) -> None:
        """A serve config was handled (applied, or skipped for want of HTTPS, as upstream's watcher counts)."""
        if self.certs is not None:
            self.certs.ensure(cert_domains(cfg))
        if self.advertiser is not None:
            self.advertiser.trigger(soon=True)

    def on_netmap(self, self_changed: bool = False) -> None:
        """Upstream re-reads the serve config for advertisement on every netmap; here at most every 5 s."""
        if self.advertiser is not None:
            self.advertiser.trigger(soon=False)
        if self.certs is not None and self_changed:
            self.certs.self_changed()

    def stop(self) -> None:
        """End the loops; a certificate call or serve-config read in progress is cut off, a prefs write
        finishes (bounded by its timeout)."""
        if self.certs is not None:
            self.certs.stop()
            self._cert_calls.abort()
        if self.advertiser is not None:
            self.advertiser.stop()
            self.advertiser.join(PREFS_TIMEOUT + JOIN_TIMEOUT)
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT)

    def unadvertise(self, deadline: float) -> float:
        """Clear prefs AdvertiseServices (always, as upstream, whoever set them); returns when the failover
        wait ends (at most `deadline`), or 0.0 when nothing was advertised or the change failed."""
        self.stop()
        timeout = max(0.1, min(PREFS_TIMEOUT, deadline - time.monotonic()))
        try:
            prefs = self.api.json("GET", "/localapi/v0/prefs", timeout=timeout) or {}
        except (LocalAPIError, ValueError) as exc:
            log.info(f"Error ensuring services are not advertised: error getting prefs: {exc}")
            return 0.0
        services = prefs.get("AdvertiseServices") if isinstance(prefs, dict) else None
        if not services:
            return 0.0
        log.info(f"unadvertising services: {log.go_list(services)}")
        timeout = max(0.1, min(PREFS_TIMEOUT, deadline - time.monotonic()))
        try:
            self.api.json("PATCH", "/localapi/v0/prefs", {"AdvertiseServicesSet": True, "AdvertiseServices": None},
                          timeout=timeout)
        except LocalAPIError as exc:
            log.info(f"Error ensuring services are not advertised: error setting prefs AdvertiseServices: {exc}")
            return 0.0
        return min(time.monotonic() + self.failover_wait, deadline)

    def wait_failover(self, until: float) -> None:
        """Give control time to move the Services to another replica before tailscaled stops; `interrupt()`
        (a second signal) ends the wait early."""
        left = until - time.monotonic()
        if left <= 0:
            return
        shown = duration(round(left) if left >= 1 else left)
        log.info(f"waiting {shown} for control to move the unadvertised services to another node")
        if self._cut.wait(left):
            log.info("stopped waiting for the services' failover: asked to stop again")

    def interrupt(self) -> None:
        self._cut.set()

