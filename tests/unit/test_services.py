"""Cert share and Service advertisement (containerboot/tailscale/vipservices.py): the decisions as tables, and the
threads against a LocalAPI stand-in on a unix socket (the real tailscaled runs in tests/e2e and
tests/lifecycle; here the stand-in can hold a call open or answer 429, which tailscaled will not on cue)."""

from __future__ import annotations

import json
import os
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from containerboot import log
from containerboot.settings import load
from containerboot.tailscale import vipservices
from containerboot.tailscale.localapi import LocalAPI
from containerboot.tailscale.serve import ServeWatcher
from containerboot.tailscale.vipservices import CertError, Services, Timing
from tests.lab.wait import wait_for

HA_INGRESS = {  # what the operator writes for an HA Ingress with HTTPS and HTTP, plus a kube-apiserver proxy
    "Services": {
        "svc:web": {"TCP": {"443": {"HTTPS": True}, "80": {"HTTP": True}},
                    "Web": {"web.tailnet.ts.net:443": {"Handlers": {"/": {"Proxy": "http://10.0.0.5:80"}}},
                            "web.tailnet.ts.net:80": {"Handlers": {"/": {"Proxy": "http://10.0.0.5:80"}}}}},
        "svc:api": {"TCP": {"443": {"TCPForward": "127.0.0.1:6443", "TerminateTLS": "api.tailnet.ts.net"}}},
        "svc:plain": {"TCP": {"5432": {"TCPForward": "10.0.0.9:5432"}}},
    },
    "TCP": {"443": {"HTTPS": True}},
    "Web": {"node.tailnet.ts.net:443": {"Handlers": {"/": {"Proxy": "http://10.0.0.5:80"}}}},
}


def settings(**env: str) -> Any:
    return load(env)


# ---- decisions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "mode"), [
    ({}, ""),
    ({"POD_NAME": "pg-0"}, ""),  # without cert share nobody issues
    ({"TS_EXPERIMENTAL_CERT_SHARE": "true", "POD_NAME": "pg-0"}, "rw"),
    ({"TS_EXPERIMENTAL_CERT_SHARE": "true", "POD_NAME": "pg-1"}, "ro"),
    ({"TS_EXPERIMENTAL_CERT_SHARE": "true", "POD_NAME": "pg-10"}, "ro"),
    ({"TS_EXPERIMENTAL_CERT_SHARE": "true", "POD_NAME": "pg-20"}, "ro"),
    ({"TS_EXPERIMENTAL_CERT_SHARE": "true"}, "ro"),
    ({"TS_EXPERIMENTAL_CERT_SHARE": "false", "POD_NAME": "pg-0"}, ""),
])
def test_cert_share_mode(env: dict[str, str], mode: str) -> None:
    assert vipservices.cert_share_mode(settings(**env)) == mode


def test_cert_domains_are_the_services_https_names() -> None:
    # Service web hosts on 443 and TerminateTLS names; not port 80, not the node's own (non-Service) HTTPS.
    assert vipservices.cert_domains(HA_INGRESS) == {"web.tailnet.ts.net", "api.tailnet.ts.net"}
    assert vipservices.cert_domains({}) == frozenset()
    assert vipservices.cert_domains(None) == frozenset()
    assert vipservices.cert_domains({"Services": {"svc:x": None, "svc:y": {"Web": None, "TCP": None}}}) == frozenset()
    # Not DNS names: never a certificate, and never into the endpoint's path.
    assert vipservices.cert_domains({"Services": {"svc:v6": {"Web": {"[fd7a::1]:443": {}, "a b:443": {},
                                                                   "x/../y:443": {}, ":443": {}}},
                                               "svc:q": {"TCP": {"443": {"TerminateTLS": "a?b"}}}}}) == frozenset()


def test_service_names_sorted() -> None:
    assert vipservices.service_names(HA_INGRESS) == ("svc:api", "svc:plain", "svc:web")
    assert vipservices.service_names({"TCP": {"80": {"HTTP": True}}}) == ()
    assert vipservices.service_names({"Services": []}) == ()


def test_next_retry_walks_upstreams_schedule() -> None:
    t = Timing()
    failed = CertError("500 boom")
    seen, retry = [], 0
    for _ in range(6):
        interval, retry = vipservices.next_retry(failed, retry, t)
        seen.append((interval, retry))
    assert seen == [(60.0, 1), (600.0, 2), (6000.0, 3), (86400.0, 4), (86400.0, 5), (86400.0, 6)]
    # Success resets the count and waits a day; a call that never reached the CA retries in a minute
    # without counting; a rate limit's Retry-After wins but still counts.
    assert vipservices.next_retry(None, 5, t) == (86400.0, 0)
    assert vipservices.next_retry(CertError("refused", transient=True), 2, t) == (60.0, 2)
    assert vipservices.next_retry(CertError("429", retry_after=3600.0), 0, t) == (3600.0, 1)


def test_transient_errors_are_upstreams() -> None:
    assert vipservices._cert_error(ConnectionRefusedError(111, "refused")).transient
    assert vipservices._cert_error(ConnectionResetError(104, "reset")).transient
    assert vipservices._cert_error(BrokenPipeError(32, "pipe")).transient
    assert vipservices._cert_error(TimeoutError("timed out")).transient
    assert not vipservices._cert_error(FileNotFoundError(2, "no socket")).transient
    assert not vipservices._cert_error(OSError("malformed status line")).transient


def test_retry_after_header() -> None:
    assert vipservices.retry_after("120") == 120.0
    assert vipservices.retry_after(None) == 0.0
    assert vipservices.retry_after("soon") == 0.0
    now = time.time()
    assert vipservices.retry_after(formatdate(now + 300, usegmt=True), now) == pytest.approx(300, abs=1)
    assert vipservices.retry_after(formatdate(now - 300, usegmt=True), now) == 0.0


@pytest.mark.parametrize(("seconds", "text"), [(60, "1m0s"), (600, "10m0s"), (6000, "1h40m0s"), (86400, "24h0m0s"),
                                               (0.3, "300ms"), (1.5, "1.5s"), (2, "2s")])
def test_duration_as_go_prints_it(seconds: float, text: str) -> None:
    assert vipservices.duration(seconds) == text


# ---- a LocalAPI stand-in ----------------------------------------------------------------------------------


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away (stop() cuts calls off) is what some tests do on purpose


class StandIn:
    """Answers what the services module asks: cert-domains, cert (any status, or held open), serve-config and
    prefs (kept, so PATCHes show in later GETs). Records every request."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.cert_domains: list[str] = []
        self.cert_status = (500, b"your Tailscale account does not support getting TLS certs\n", {})
        self.hold = threading.Event()  # set: cert calls wait until released
        self.release = threading.Event()
        self.serve_config: dict[str, Any] = {}
        self.serve_broken = False
        self.prefs: dict[str, Any] = {"AdvertiseServices": None}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = _Server(path, self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def calls(self, method: str, prefix: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def address_string(self) -> str:
                return "unix"

            def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with api.lock:
                    api.requests.append((self.command, self.path))
                path = self.path.split("?", 1)[0]
                if path == "/localapi/v0/cert-domains":
                    return self._reply(200, json.dumps(api.cert_domains).encode())
                if path.startswith("/localapi/v0/cert/"):
                    if api.hold.is_set():
                        api.release.wait(30)
                    status, text, headers = api.cert_status
                    return self._reply(status, text, headers)
                if path == "/localapi/v0/serve-config":
                    if api.serve_broken:
                        return self._reply(500, b"serve config unavailable\n")
                    return self._reply(200, json.dumps(api.serve_config).encode())
                if path == "/localapi/v0/prefs":
                    if self.command == "PATCH" and body.get("AdvertiseServicesSet"):
                        api.prefs["AdvertiseServices"] = body.get("AdvertiseServices")
                    return self._reply(200, json.dumps(api.prefs).encode())
                return self._reply(404, b"not here\n")

            do_GET = do_PATCH = do_POST = _any  # noqa: N815

        return Handler


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with tempfile.TemporaryDirectory(prefix="cbsvc") as d:
        api = StandIn(str(Path(d) / "ts.sock"))
        yield api
        api.close()


@pytest.fixture
def lines() -> Iterator[list[str]]:
    """Log lines written while the test runs."""
    out: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            out.extend(line for line in text.splitlines() if line)

        def flush(self) -> None:
            pass

    log.setup("text", Sink())  # type: ignore[arg-type]
    yield out
    log.setup("text", None)


POLL = 0.01  # wait_for's interval here: finer than FAST's first retry (0.05 s), so a count is seen at exactly 1
FAST = Timing(schedule=(0.05, 0.1, 0.2, 0.4), renew=0.4)

# ---- cert share: only the rw replica ---------------------------------------------------------------------


@pytest.mark.parametrize("pod", ["pg-1", "pg-10", ""])
def test_other_replicas_run_no_loops(standin: StandIn, pod: str) -> None:
    s = settings(TS_EXPERIMENTAL_CERT_SHARE="true", POD_NAME=pod, TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT="false")
    svc = Services(s, LocalAPI(standin.path), FAST)
    svc.start()
    standin.cert_domains = ["web.tailnet.ts.net", "api.tailnet.ts.net"]
    svc.on_serve_config(HA_INGRESS)
    svc.on_netmap(self_changed=True)
    time.sleep(0.3)  # room for a loop that should not exist to make its first call
    svc.stop()
    assert svc.certs is None and svc.cert_loops == ()
    assert standin.requests == []


def test_rw_replica_waits_for_the_cert_domain_then_refreshes(standin: StandIn, lines: list[str]) -> None:
    s = settings(TS_EXPERIMENTAL_CERT_SHARE="true", POD_NAME="pg-0", TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT="false")
    svc = Services(s, LocalAPI(standin.path), FAST)
    svc.start()
    try:
        svc.on_serve_config(HA_INGRESS)
        assert svc.cert_loops == ("api.tailnet.ts.net", "web.tailnet.ts.net")
        # Not yet cert domains (the node has not been given them): asked once, no certificate call.
        assert wait_for(lambda: standin.calls("GET", "/localapi/v0/cert-domains") == 1, interval=POLL)
        time.sleep(0.2)
        assert standin.calls("GET", "/localapi/v0/cert/") == 0
        # A netmap without a self change does not ask again; one with a self change does.
        svc.on_netmap(self_changed=False)
        time.sleep(0.1)
        assert standin.calls("GET", "/localapi/v0/cert-domains") == 1
        standin.cert_domains = ["web.tailnet.ts.net"]
        standin.cert_status = (200, b"-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n", {})
        svc.on_netmap(self_changed=True)
        assert wait_for(lambda: standin.calls("GET", "/localapi/v0/cert/web.tailnet.ts.net") >= 1, interval=POLL)
        assert ("GET", "/localapi/v0/cert/web.tailnet.ts.net?type=pair&min_validity=0s") in standin.requests
        assert standin.calls("GET", "/localapi/v0/cert/api.tailnet.ts.net") == 0
        # Success: the next call comes after the renewal interval (0.4 s here), not at once.
        assert wait_for(lambda: standin.calls("GET", "/localapi/v0/cert/web.tailnet.ts.net") >= 2, 3, interval=POLL)
        # The key material never reaches the log.
        assert not any("secret" in line or "PRIVATE KEY" in line for line in lines)
        # A domain that leaves the serve config ends its loop.
        svc.on_serve_config({"Services": {"svc:api": HA_INGRESS["Services"]["svc:api"]}})
        assert svc.cert_loops == ("api.tailnet.ts.net",)
        time.sleep(0.1)  # a call already under way when the domain left may still arrive
        calls = standin.calls("GET", "/localapi/v0/cert/web.tailnet.ts.net")
        time.sleep(0.6)
        assert standin.calls("GET", "/localapi/v0/cert/web.tailnet.ts.net") == calls
    finally:
        svc.stop()


def test_failures_back_off_and_log_once_per_step(standin: StandIn, lines: list[str]) -> None:
    s = settings(TS_EXPERIMENTAL_CERT_SHARE="true", POD_NAME="pg-0", TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT="false")
    timing = Timing(schedule=(0.1, 0.2, 0.4, 0.8), renew=10.0)
    svc = Services(s, LocalAPI(standin.path), timing)
    standin.cert_domains = ["web.tailnet.ts.net"]
    fds = len(os.listdir("/proc/self/fd"))
    svc.start()
    try:
        svc.on_serve_config({"Services": {"svc:web": HA_INGRESS["Services"]["svc:web"]}})
        # Five failures said (not five calls made: the fifth call's line may still be on its way when it is
        # counted, and stop() would then cut it off, leaving four lines on a busy machine).
        assert wait_for(lambda: sum("Error refreshing certificate" in line for line in lines) >= 5, 5, interval=POLL)
        svc.stop()
        failures = [line for line in lines if "Error refreshing certificate" in line]
        assert failures[:5] == [line for line in failures[:5] if "web.tailnet.ts.net" in line]
        steps = [(line.split("(retry ")[1].split(")")[0], line.rsplit("Will retry in ", 1)[1]) for line in failures]
        assert steps[:5] == [("1", "100ms"), ("2", "200ms"), ("3", "400ms"), ("4", "800ms"), ("5", "800ms")]
        assert "500 your Tailscale account does not support getting TLS certs" in failures[0]
        # One line per attempt; an attempt that stop() cut off in flight logs nothing (no failure to report).
        assert standin.calls("GET", "/localapi/v0/cert/") - len(failures) in (0, 1)
        # (the stand-in closes its side of the last call on its own thread: a moment's grace)
        assert wait_for(lambda: len(os.listdir("/proc/self/fd")) == fds, 2, interval=POLL), \
            "a call left its socket open"
    finally:
        svc.stop()


def test_rate_limit_retry_after_is_honoured(standin: StandIn, lines: list[str]) -> None:
    s = settings(TS_EXPERIMENTAL_CERT_SHARE="true", POD_NAME="pg-0", TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT="false")
    svc = Services(s, LocalAPI(standin.path), FAST)
    standin.cert_domains = ["web.tailnet.ts.net"]
    standin.cert_status = (429, b"rate limited\n", {"Retry-After": "3600"})
    svc.start()
    try:
        svc.on_serve_config({"Services": {"svc:web": HA_INGRESS["Services"]["svc:web"]}})
        assert wait_for(lambda: any("Will retry in 1h0m0s" in line for line in lines), interval=POLL)
        assert "(retry 1): 429 rate limited" in next(line for line in lines if "Will retry" in line)
        time.sleep(0.3)  # the schedule's 50 ms would have come and gone
        assert standin.calls("GET", "/localapi/v0/cert/") == 1
    finally:
        svc.stop()


def test_stop_cuts_off_a_cert_call_and_never_blocks_the_caller(standin: StandIn) -> None:
    s = settings(TS_EXPERIMENTAL_CERT_SHARE="true", POD_NAME="pg-0")
    svc = Services(s, LocalAPI(standin.path), FAST)
    standin.cert_domains = ["web.tailnet.ts.net"]
    standin.hold.set()  # tailscaled busy issuing: the call does not come back
    svc.start()
    svc.on_serve_config(HA_INGRESS)
    assert wait_for(lambda: standin.calls("GET", "/localapi/v0/cert/") == 1, interval=POLL)
    # The caller (Boot's main loop) is not held by the call in progress.
    svc.on_serve_config(HA_INGRESS)
    svc.on_netmap(self_changed=True)
    assert not standin.release.is_set()
    svc.stop()
    threads = [t for t in threading.enumerate() if t.name in ("cert-loops", "advertise")]
    assert threads == [], "stop() left a thread running while the call was still held"
    assert not standin.release.is_set()


# ---- advertisement ---------------------------------------------------------------------------------------


def test_advertises_the_serve_configs_services(standin: StandIn, lines: list[str]) -> None:
    svc = Services(settings(), LocalAPI(standin.path))
    svc.start()
    try:
        standin.serve_config = HA_INGRESS
        svc.on_serve_config(HA_INGRESS)
        assert wait_for(lambda: standin.prefs["AdvertiseServices"] == ["svc:api", "svc:plain", "svc:web"],
                        interval=POLL)
        assert "auto-advertisement: advertising services [svc:api svc:plain svc:web]" in lines[-1]
        # Unchanged: no new prefs write (each one is a state write); netmaps are coalesced.
        patches = standin.calls("PATCH", "/localapi/v0/prefs")
        for _ in range(20):
            svc.on_netmap()
        svc.on_serve_config(HA_INGRESS)
        assert wait_for(lambda: standin.calls("GET", "/localapi/v0/prefs") >= 2, interval=POLL)
        time.sleep(0.1)
        assert standin.calls("PATCH", "/localapi/v0/prefs") == patches
        assert standin.calls("GET", "/localapi/v0/serve-config") <= 3
        # A Service removed from the config is no longer advertised.
        standin.serve_config = {"Services": {"svc:web": HA_INGRESS["Services"]["svc:web"]}}
        svc.on_serve_config(standin.serve_config)
        assert wait_for(lambda: standin.prefs["AdvertiseServices"] == ["svc:web"], interval=POLL)
        # All of them gone: ours are withdrawn.
        standin.serve_config = {"TCP": {"80": {"HTTP": True}}}
        svc.on_serve_config(standin.serve_config)
        assert wait_for(lambda: standin.prefs["AdvertiseServices"] is None, interval=POLL)
    finally:
        svc.stop()


def test_a_failed_advertisement_is_retried(standin: StandIn, lines: list[str]) -> None:
    # Upstream exits (and the container restarts); here the thread logs and tries again, backing off.
    svc = Services(settings(), LocalAPI(standin.path))
    standin.serve_config = HA_INGRESS
    standin.serve_broken = True
    svc.start()
    try:
        svc.on_serve_config(HA_INGRESS)
        assert wait_for(lambda: any("auto-advertisement: GET /localapi/v0/serve-config: 500 serve config "
                                    "unavailable; trying again in 1s" in line for line in lines), interval=POLL)
        standin.serve_broken = False
        assert wait_for(lambda: standin.prefs["AdvertiseServices"] == ["svc:api", "svc:plain", "svc:web"], 5,
                        interval=POLL)
    finally:
        svc.stop()


def test_no_services_leaves_someone_elses_prefs(standin: StandIn) -> None:
    standin.prefs["AdvertiseServices"] = ["svc:manual"]
    svc = Services(settings(), LocalAPI(standin.path))
    svc.start()
    svc.on_serve_config({"TCP": {"80": {"HTTP": True}}})
    assert wait_for(lambda: standin.calls("GET", "/localapi/v0/serve-config") == 1, interval=POLL)
    time.sleep(0.1)
    svc.stop()
    assert standin.prefs["AdvertiseServices"] == ["svc:manual"]
    assert standin.calls("PATCH", "/localapi/v0/prefs") == 0


def test_advertisement_off(standin: StandIn) -> None:
    svc = Services(settings(TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT="false"), LocalAPI(standin.path))
    svc.start()
    standin.serve_config = HA_INGRESS
    svc.on_serve_config(HA_INGRESS)
    svc.on_netmap()
    time.sleep(0.2)
    assert standin.requests == []
    # Shutdown unadvertises whatever is advertised, as upstream does whether or not it advertised.
    standin.prefs["AdvertiseServices"] = ["svc:web"]
    until = svc.unadvertise(time.monotonic() + 25)
    assert standin.prefs["AdvertiseServices"] is None
    assert until > time.monotonic() + 15


def test_unadvertise_after_advertising_and_the_wait(standin: StandIn, lines: list[str]) -> None:
    svc = Services(settings(), LocalAPI(standin.path), failover_wait=0.3)
    svc.start()
    standin.serve_config = HA_INGRESS
    svc.on_serve_config(HA_INGRESS)
    assert wait_for(lambda: standin.prefs["AdvertiseServices"], interval=POLL)
    svc.on_netmap()  # a refresh that will be due in 5 s: stopped with the rest
    until = svc.unadvertise(time.monotonic() + 25)
    assert standin.prefs["AdvertiseServices"] is None
    assert "unadvertising services: [svc:api svc:plain svc:web]" in "\n".join(lines)
    svc.wait_failover(until)
    assert time.monotonic() >= until
    # Nothing advertised: no wait at all; a deadline already past bounds the wait.
    assert svc.unadvertise(time.monotonic() + 25) == 0.0
    standin.prefs["AdvertiseServices"] = ["svc:web"]
    soon = time.monotonic() + 0.2
    assert svc.unadvertise(soon) <= soon
    assert not [t for t in threading.enumerate() if t.name in ("cert-loops", "advertise")]


def test_interrupt_ends_the_failover_wait(standin: StandIn) -> None:
    svc = Services(settings(), LocalAPI(standin.path))
    standin.prefs["AdvertiseServices"] = ["svc:web"]
    until = svc.unadvertise(time.monotonic() + 25)
    threading.Timer(0.2, svc.interrupt).start()
    svc.wait_failover(until)
    assert time.monotonic() < until - 10


def test_handler_count_includes_services() -> None:
    from containerboot.tailscale.serve import handler_count

    # node: TCP 443 + one web handler; svc:web: two ports, two web handlers; svc:api and svc:plain: a port each
    assert handler_count(HA_INGRESS) == 2 + 4 + 1 + 1
    assert handler_count({"Services": {"svc:x": None}, "Web": {"h:443": None}}) == 0


def test_serve_watcher_hands_each_handled_config_on(standin: StandIn, tmp_path: Path) -> None:
    seen: list[Any] = []
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"Services": {"svc:web": {"Web": {"web.${TS_CERT_DOMAIN}:443": {}}}},
                                "TCP": {"443": {"HTTPS": True}}}))
    watcher = ServeWatcher(str(path), LocalAPI(standin.path), on_change=seen.append)
    assert watcher.poll("no-https")  # skipped for want of HTTPS: upstream still runs the cert loops
    assert watcher.poll("tailnet.ts.net")
    assert not watcher.poll("tailnet.ts.net")
    assert [vipservices.cert_domains(c) for c in seen] == [{"web.no-https"}, {"web.tailnet.ts.net"}]
