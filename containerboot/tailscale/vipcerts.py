"""Cert share (TS_EXPERIMENTAL_CERT_SHARE): replicas of an HA Ingress serve the same Service HTTPS names
with one shared certificate, which only the `rw` replica (POD_NAME ending in -0) may issue. That replica
asks tailscaled for each Service domain's certificate once the domain is one of the node's cert domains,
then daily (tailscaled renews when due); failures back off 1m, 10m, 100m, then daily, as upstream's loops do.

The decisions (which replica, which names, when to ask again) are the pure functions at the top; the loops
run on one thread of their own (`CertLoops`), started and stopped by the shell in vipservices.py. Apart
from advertisement (vipadvertise.py): the two share no state, only the LocalAPI calls of vipbase.py.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from containerboot import log
from containerboot.settings import Settings
from containerboot.tailscale.localapi import LocalAPIError
from containerboot.tailscale.vipbase import Calls, duration, serve_services

RETRY_SCHEDULE = (60.0, 600.0, 6000.0, 86400.0)  # Let's Encrypt's advice for retrying failed issuance
RENEW_INTERVAL = 86400.0  # a fresh certificate is asked for again daily; tailscaled renews it when due
CERT_CALL_TIMEOUT = 1800.0  # issuance queues behind tailscaled's one ACME lock; longer means it is wedged
DOMAINS_TIMEOUT = 10.0

_DNS_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._*")
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.EPIPE}


# ---- decisions (pure) -------------------------------------------------------------------------------


def cert_share_mode(s: Settings) -> str:
    """"rw" for the replica that issues the shared certificates, "ro" for the others, "" without cert share."""
    if not s.cert_share:
        return ""
    return "rw" if s.pod_name.endswith("-0") else "ro"


def cert_domains(cfg: Mapping[str, Any] | None) -> frozenset[str]:
    """The names whose certificates the `rw` replica keeps fresh: every Service's HTTPS web host (port 443)
    and every TCP handler's TerminateTLS name, as upstream's EnsureCertLoops reads them."""
    out: set[str] = set()
    for svc in serve_services(cfg).values():
        if not isinstance(svc, dict):
            continue
        for host_port in svc.get("Web") or {}:
            host, sep, port = str(host_port).rpartition(":")
            if sep and port == "443":
                out.add(host)
        for handler in (svc.get("TCP") or {}).values():
            if isinstance(handler, dict) and handler.get("TerminateTLS"):
                out.add(str(handler["TerminateTLS"]))
    # Only DNS names go into the cert endpoint's path: anything else (an address, a stray space or slash)
    # could never get a certificate, and would not be one path segment.
    return frozenset(d for d in out if d and set(d) <= _DNS_CHARS)


@dataclass(frozen=True)
class Timing:
    """The cert loops' intervals (upstream's by default; tests shorten them)."""

    schedule: tuple[float, ...] = RETRY_SCHEDULE
    renew: float = RENEW_INTERVAL
    call_timeout: float = CERT_CALL_TIMEOUT
    # How long a loop waits for its domain to become a cert domain before asking anyway. None, as upstream:
    # until it does (tailscaled refuses any other name without asking a CA).
    domain_wait: float | None = None


class CertError(Exception):
    def __init__(self, message: str, transient: bool = False, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.transient = transient  # never reached the CA: does not count as an attempt
        self.retry_after = retry_after  # the CA's rate limit said when to come back


def next_retry(error: CertError | None, retry: int, timing: Timing) -> tuple[float, int]:
    """(seconds until the next attempt, the retry count after this outcome), as upstream's nextRetryInterval."""
    if error is None:
        return timing.renew, 0
    if error.transient:
        return timing.schedule[0], retry
    retry += 1
    interval = timing.schedule[min(retry, len(timing.schedule)) - 1]
    return (error.retry_after if error.retry_after > 0 else interval), retry


def retry_after(value: str | None, now: float | None = None) -> float:
    """A Retry-After header (seconds, or an HTTP date) in seconds; 0 when absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    # Imported here: the email package costs about 1 MiB of resident memory in every pod, and a rate limit
    # that names a date is rare (measured: 14.0 -> 15.0 MiB max RSS importing this module with it at the top).
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _cert_error(exc: BaseException) -> CertError:
    """A failed call as upstream's isTransientCertErr classifies it."""
    if isinstance(exc, TimeoutError):
        return CertError(f"tailscaled did not answer within the call's timeout: {exc}", transient=True)
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return CertError(str(exc), transient=True)
    return CertError(str(exc) or type(exc).__name__)


# ---- cert loops ------------------------------------------------------------------------------------


@dataclass
class _Loop:
    """One Service domain's certificate loop: when it started and when it next asks."""

    domain: str
    since: float
    due: float | None = None  # None: waiting for the domain to be one of the node's cert domains
    retry: int = 0


@dataclass
class CertLoops:
    """All domains' loops on one thread: tailscaled issues one certificate at a time anyway (one ACME lock),
    and a thread per domain would cost a stack and a bus watch each (upstream's goroutines watch the bus)."""

    calls: Calls
    timing: Timing
    loops: dict[str, _Loop] = field(default_factory=dict)
    cv: threading.Condition = field(default_factory=threading.Condition)
    recheck: bool = False
    stopped: bool = False
    attempts: int = 0  # certificate calls made, for tests and debugging

    def ensure(self, domains: frozenset[str]) -> None:
        """One loop per domain: start the new ones, end the ones no longer served."""
        with self.cv:
            for domain in sorted(domains - self.loops.keys()):
                self.loops[domain] = _Loop(domain, time.monotonic())
                self.recheck = True
                log.info(f"cert share: keeping the certificate for {domain} fresh (waiting for it to be one of "
                         "this node's cert domains first)")
            for domain in sorted(self.loops.keys() - domains):
                del self.loops[domain]
                log.info(f"cert share: {domain} is no longer in the serve config; its certificate loop ends")
            self.cv.notify()

    def self_changed(self) -> None:
        """The node changed (upstream waits for SelfChange): its cert domains may now include a waiting one."""
        with self.cv:
            if any(loop.due is None for loop in self.loops.values()):
                self.recheck = True
                self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()

    def _next(self) -> tuple[str, _Loop | None] | None:
        """What to do now: ("domains", None) or ("cert", loop); waits for it; None once stopped."""
        with self.cv:
            while not self.stopped:
                now = time.monotonic()
                waiting = [loop for loop in self.loops.values() if loop.due is None]
                if self.recheck and waiting:
                    self.recheck = False
                    return "domains", None
                wake: float | None = None
                if self.timing.domain_wait is not None:
                    for loop in waiting:
                        until = loop.since + self.timing.domain_wait
                        if until <= now:
                            log.info(f"cert share: {loop.domain} is still not one of this node's cert domains after "
                                     f"{duration(self.timing.domain_wait)}; asking for its certificate anyway")
                            loop.due = now
                        else:
                            wake = until if wake is None else min(wake, until)
                due = [loop for loop in self.loops.values() if loop.due is not None]
                if due:
                    first = min(due, key=lambda loop: (loop.due or 0.0, loop.domain))
                    assert first.due is not None
                    if first.due <= now:
                        return "cert", first
                    wake = first.due if wake is None else min(wake, first.due)
                self.cv.wait(None if wake is None else max(0.0, wake - now))
            return None

    def run(self) -> None:
        while True:
            step = self._next()
            if step is None:
                return
            kind, loop = step
            if kind == "domains":
                self._check_domains()
            elif loop is not None:
                self._refresh(loop)

    def _check_domains(self) -> None:
        try:
            domains = self.calls.json("GET", "/localapi/v0/cert-domains", DOMAINS_TIMEOUT)
        except Exception:  # noqa: BLE001 - as upstream, any failure: the next change of the node asks again
            return
        known = {str(d) for d in domains} if isinstance(domains, list) else set()
        with self.cv:
            for loop in self.loops.values():
                if loop.due is None and loop.domain in known:
                    loop.due = time.monotonic()

    def _refresh(self, loop: _Loop) -> None:
        # The answer (a private key and its certificate) is not used here: asking makes tailscaled issue or
        # renew as needed and keep the pair in its store, where the other replicas read it.
        path = f"/localapi/v0/cert/{loop.domain}?type=pair&min_validity=0s"
        error: CertError | None = None
        self.attempts += 1
        try:
            status, headers, data = self.calls.request("GET", path, self.timing.call_timeout)
            if status != 200:
                text = data.decode(errors="replace").strip()[:300]
                error = CertError(f"{status} {text}", retry_after=retry_after(headers.get("retry-after"))
                                  if status == 429 else 0.0)
        except LocalAPIError as exc:  # stopped
            error = CertError(str(exc), transient=True)
        except OSError as exc:
            error = _cert_error(exc)
        except Exception as exc:  # noqa: BLE001 - a surprise must cost one attempt, not end the loops for good
            error = CertError(f"unexpected error: {type(exc).__name__}: {exc}")
        with self.cv:
            if self.stopped or self.loops.get(loop.domain) is not loop:
                return  # stopped, or the domain left the serve config during the call
            interval, loop.retry = next_retry(error, loop.retry, self.timing)
            loop.due = time.monotonic() + interval
        if error is not None:
            log.info(f"Error refreshing certificate for {loop.domain} (retry {loop.retry}): {error}. Will retry in "
                     f"{duration(interval)}")

