"""Tailscale Services on a proxy: cert share loops and auto-advertisement (TS_EXPERIMENTAL_CERT_SHARE,
TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT), and unadvertising them with the failover wait at shutdown.

- Cert share: replicas of an HA Ingress serve the same Service HTTPS names with one shared certificate,
  which only the `rw` replica (POD_NAME ending in -0) may issue. That replica asks tailscaled for each
  Service domain's certificate once the domain is one of the node's cert domains, then daily (tailscaled
  renews when due); failures back off 1m, 10m, 100m, then daily, as upstream's loops do.
- Advertisement: prefs AdvertiseServices follow the Services of tailscaled's serve config.

Both run on threads of their own, so the main loop never waits on them (upstream sleeps 20 s in its main
loop after each advertisement). The decisions are the pure functions at the top; `Services` is the shell.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from containerboot import log
from containerboot.settings import CAPABILITY_VERSION, Settings
from containerboot.tailscale import http1
from containerboot.tailscale.localapi import HOST, LocalAPIError, TailscaledAPI

RETRY_SCHEDULE = (60.0, 600.0, 6000.0, 86400.0)  # Let's Encrypt's advice for retrying failed issuance
RENEW_INTERVAL = 86400.0  # a fresh certificate is asked for again daily; tailscaled renews it when due
CERT_CALL_TIMEOUT = 1800.0  # issuance queues behind tailscaled's one ACME lock; longer means it is wedged
DOMAINS_TIMEOUT = 10.0
PREFS_TIMEOUT = 5.0  # per prefs/serve-config call, as the shutdown's unadvertise has always used
FAILOVER_WAIT = 20.0  # upstream: about 15 s for control to pick another primary, 5 s to spare
NETMAP_REFRESH_MIN = 5.0  # netmaps come in bursts; the serve watcher's own changes are handled at once
ADVERTISE_RETRY = (1.0, 60.0)  # backoff of a failed advertisement: first, most
JOIN_TIMEOUT = 1.0

_DNS_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._*")
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.EPIPE}


# ---- decisions (pure) -------------------------------------------------------------------------------


def cert_share_mode(s: Settings) -> str:
    """"rw" for the replica that issues the shared certificates, "ro" for the others, "" without cert share."""
    if not s.cert_share:
        return ""
    return "rw" if s.pod_name.endswith("-0") else "ro"


def _services(cfg: Mapping[str, Any] | None) -> Mapping[str, Any]:
    services = (cfg or {}).get("Services")
    return services if isinstance(services, dict) else {}


def service_names(cfg: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The Services a serve config serves ("svc:name"), sorted: prefs compare as lists."""
    return tuple(sorted(str(name) for name in _services(cfg)))


def cert_domains(cfg: Mapping[str, Any] | None) -> frozenset[str]:
    """The names whose certificates the `rw` replica keeps fresh: every Service's HTTPS web host (port 443)
    and every TCP handler's TerminateTLS name, as upstream's EnsureCertLoops reads them."""
    out: set[str] = set()
    for svc in _services(cfg).values():
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


def duration(seconds: float) -> str:
    """Seconds as Go prints a time.Duration (1m0s, 1h40m0s, 24h0m0s; 300ms and 1.5s below a minute)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:.3f}".rstrip("0") + "s"
    return log.go_duration(seconds)


# ---- LocalAPI calls that stop() can end --------------------------------------------------------------


class _Calls:
    """HTTP over tailscaled's socket from a worker thread; abort() shuts every open connection, so a thread
    inside a long call (a certificate issuance may take minutes) ends at once."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.aborted = False

    def request(self, method: str, path: str, timeout: float,
                payload: object = None) -> tuple[int, dict[str, str], bytes]:
        """Raises OSError (timeouts, refusals, malformed answers) and LocalAPIError once aborted."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:
            if self.aborted:
                sock.close()
                raise LocalAPIError(f"{method} {path}: stopped")
            self._open.add(sock)
        try:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            body = None if payload is None else json.dumps(payload).encode()
            resp = http1.request(sock, method, path, HOST, {"Tailscale-Cap": str(CAPABILITY_VERSION),
                                                            "Content-Type": "application/json"}, body)
            try:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
            finally:
                resp.close()
        except OSError:
            if self.aborted:
                raise LocalAPIError(f"{method} {path}: stopped") from None
            raise
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def json(self, method: str, path: str, timeout: float, payload: object = None) -> Any:
        try:
            status, _, data = self.request(method, path, timeout, payload)
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise LocalAPIError(f"{method} {path}: tailscaled did not answer within {timeout:g}s") from exc
            raise LocalAPIError(f"{method} {path}: {exc}") from exc
        if status // 100 != 2:
            raise LocalAPIError(f"{method} {path}: {status} {data.decode(errors='replace').strip()[:200]}")
        return json.loads(data) if data.strip() else None

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            socks = list(self._open)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in connect, send or recv on it
            except OSError:
                pass


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
class _CertLoops:
    """All domains' loops on one thread: tailscaled issues one certificate at a time anyway (one ACME lock),
    and a thread per domain would cost a stack and a bus watch each (upstream's goroutines watch the bus)."""

    calls: _Calls
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


# ---- advertisement ---------------------------------------------------------------------------------


@dataclass
class _Advertiser:
    """Makes prefs AdvertiseServices equal to the serve config's Services, on its own thread."""

    calls: _Calls
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


# ---- the shell -------------------------------------------------------------------------------------


class Services:
    """Boot's handle: `start()` once tailscaled runs, `on_serve_config(cfg)` from the serve watcher,
    `on_netmap(self_changed)` per netmap, and at shutdown `unadvertise(deadline)` then `wait_failover(until)`.
    Nothing here blocks the caller except the shutdown calls, which are bounded by the deadline given."""

    def __init__(self, s: Settings, api: TailscaledAPI, timing: Timing = Timing(),
                 failover_wait: float = FAILOVER_WAIT) -> None:
        self.api = api
        self.mode = cert_share_mode(s)
        self.failover_wait = failover_wait
        self._cut = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cert_calls = _Calls(api.socket_path)
        self.certs = _CertLoops(self._cert_calls, timing) if self.mode == "rw" else None
        self.advertiser = _Advertiser(_Calls(api.socket_path)) if s.service_auto_advertisement else None

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

