"""Cert share loops and Service advertisement against a real tailscaled logged in to headscale: the
services module (containerboot/tailscale/vipservices.py) driven as Boot drives it, its effect read back through the
node's own LocalAPI. headscale issues no certificates (no cert domains), so every cert call fails in
tailscaled: the loop's calls, their logged failures and its backoff are what is shown."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from containerboot import log
from containerboot.settings import load
from containerboot.tailscale.localapi import LocalAPI
from containerboot.tailscale.serve import ServeWatcher
from containerboot.tailscale.vipservices import Services, Timing
from tests.lab.tailnet import Node, Tailnet
from tests.lab.tailnet_boot import Booted, site
from tests.lab.wait import wait_for

pytestmark = pytest.mark.e2e

# A Service whose handlers tailscaled accepts without HTTPS (the lab has none), and one HA Ingress shape
# (HTTPS on 443) for the cert loops.
TCP_SERVICE = {"Services": {"svc:db": {"TCP": {"5432": {"TCPForward": "127.0.0.1:5432"}}}}}
TWO_SERVICES = {"Services": {"svc:db": {"TCP": {"5432": {"TCPForward": "127.0.0.1:5432"}}},
                             "svc:cache": {"TCP": {"6379": {"TCPForward": "127.0.0.1:6379"}}}}}
HTTPS_SERVICE = {"Services": {"svc:web": {"TCP": {"443": {"HTTPS": True}},
                                          "Web": {"web.lab.test:443": {"Handlers": {"/": {"Proxy": "http://127.0.0.1:80"}}}}}}}


@pytest.fixture(scope="module")
def node(net: Tailnet) -> Node:
    return net.client("svcnode", "198.18.0.240", userspace=True)


@pytest.fixture
def api(node: Node) -> Iterator[LocalAPI]:
    lapi = LocalAPI(node.socket)
    yield lapi
    # Leave the node as found for the next test.
    lapi.json("PATCH", "/localapi/v0/prefs", {"AdvertiseServicesSet": True, "AdvertiseServices": None})
    lapi.json("POST", "/localapi/v0/serve-config", {})


@pytest.fixture
def lines() -> Iterator[list[str]]:
    out: list[str] = []
    lock = threading.Lock()

    class Sink:
        def write(self, text: str) -> None:
            with lock:
                out.extend(line for line in text.splitlines() if line)

        def flush(self) -> None:
            pass

    log.setup("text", Sink())  # type: ignore[arg-type]
    yield out
    log.setup("text", None)


def advertised(api: LocalAPI) -> list[str] | None:
    prefs: dict[str, Any] = api.json("GET", "/localapi/v0/prefs")
    return prefs.get("AdvertiseServices")


def test_advertise_follows_the_serve_config_and_unadvertise_clears_it(api: LocalAPI, tmp_path: Path,
                                                                       lines: list[str]) -> None:
    svc = Services(load({}), api, failover_wait=1.0)
    path = tmp_path / "serve-config.json"
    watcher = ServeWatcher(str(path), api, on_change=svc.on_serve_config)
    svc.start()
    try:
        assert advertised(api) is None
        path.write_text(json.dumps(TCP_SERVICE))
        assert watcher.poll("no-https")
        assert wait_for(lambda: advertised(api) == ["svc:db"], 10), f"prefs: {advertised(api)}"
        # tailscaled holds the serve config the advertisement was read from.
        assert set(api.json("GET", "/localapi/v0/serve-config")["Services"]) == {"svc:db"}
        # The file changes (a kubelet swap would look the same to the watcher): the prefs follow.
        path.write_text(json.dumps(TWO_SERVICES))
        assert watcher.poll("no-https")
        assert wait_for(lambda: advertised(api) == ["svc:cache", "svc:db"], 10), f"prefs: {advertised(api)}"
        svc.on_netmap()  # nothing changed: no prefs write
        patches = sum("advertising services" in line for line in lines)
        assert patches == 2
    finally:
        svc.stop()
    until = svc.unadvertise(time.monotonic() + 25)
    assert advertised(api) is None
    assert until > time.monotonic()
    svc.wait_failover(until)
    assert time.monotonic() >= until
    assert any(line.endswith("unadvertising services: [svc:cache svc:db]") for line in lines)


def test_cert_loop_against_real_tailscaled(api: LocalAPI, tmp_path: Path, lines: list[str]) -> None:
    s = load({"TS_EXPERIMENTAL_CERT_SHARE": "true", "POD_NAME": "ingress-0",
              "TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT": "false"})
    # The lab's control gives no cert domains, so upstream's loop would wait for the domain for ever; here
    # it stops waiting after 0.5 s and asks, and tailscaled refuses. Upstream's schedule, in tenths.
    timing = Timing(schedule=(0.6, 1.0, 1.5, 2.0), renew=60.0, domain_wait=0.5)
    svc = Services(s, api, timing)
    svc.start()
    try:
        t0 = time.monotonic()
        svc.on_serve_config(HTTPS_SERVICE)
        assert svc.cert_loops == ("web.lab.test",)
        assert wait_for(lambda: svc.certs is not None and svc.certs.attempts >= 6, 15)
        # The sixth attempt comes after the wait for the domain and five backoff steps, not before: the loop
        # waited as it logged (a lower bound, whatever the machine's speed).
        assert time.monotonic() - t0 >= 0.5 + 0.6 + 1.0 + 1.5 + 2.0 + 2.0
    finally:
        svc.stop()
    failures = [line for line in lines if "Error refreshing certificate for web.lab.test" in line]
    print("\n" + "\n".join(failures))
    assert svc.certs is not None
    assert len(failures) == svc.certs.attempts, "one line per attempt"
    # tailscaled's own refusal, from its cert endpoint: the call reached it.
    assert "500 your Tailscale account does not support getting TLS certs" in failures[0]
    steps = [(f.split("(retry ")[1].split(")")[0], f.rsplit("Will retry in ", 1)[1]) for f in failures]
    assert steps[:6] == [("1", "600ms"), ("2", "1s"), ("3", "1.5s"), ("4", "2s"), ("5", "2s"), ("6", "2s")]


def test_cert_loop_waits_for_the_cert_domain_by_default(api: LocalAPI, lines: list[str]) -> None:
    s = load({"TS_EXPERIMENTAL_CERT_SHARE": "true", "POD_NAME": "ingress-0",
              "TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT": "false"})
    svc = Services(s, api)
    svc.start()
    try:
        svc.on_serve_config(HTTPS_SERVICE)
        for _ in range(3):
            svc.on_netmap(self_changed=True)  # each asks tailscaled's cert-domains again: still none
            time.sleep(0.3)
        assert svc.certs is not None and svc.certs.attempts == 0
        assert not any("Error refreshing certificate" in line for line in lines)
    finally:
        svc.stop()
    assert svc.cert_loops == ("web.lab.test",)
    assert api.json("GET", "/localapi/v0/cert-domains") in (None, [])


def test_other_replica_runs_no_loop(api: LocalAPI, lines: list[str]) -> None:
    s = load({"TS_EXPERIMENTAL_CERT_SHARE": "true", "POD_NAME": "ingress-1",
              "TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT": "false"})
    svc = Services(s, api, Timing(schedule=(0.1, 0.1, 0.1, 0.1), domain_wait=0.1))
    svc.start()
    svc.on_serve_config(HTTPS_SERVICE)
    time.sleep(1.0)
    svc.stop()
    assert svc.certs is None and svc.cert_loops == ()
    assert not any("cert share" in line or "certificate" in line for line in lines)


def test_containerboot_advertises_and_unadvertises(net: Tailnet, boot: Callable[..., Booted], tmp_path: Path) -> None:
    """The whole program: a serve config with Services is applied and advertised, the rw replica starts its
    cert loop, SIGTERM unadvertises and waits for the failover within the 25 s bound."""
    ns, _, n = site(net, "svc")
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({**TWO_SERVICES, "Services": {**TWO_SERVICES["Services"],
                                                           **HTTPS_SERVICE["Services"]}}))
    node = boot(ns, f"svc{n}", TS_SERVE_CONFIG=str(cfg), TS_EXPERIMENTAL_CERT_SHARE="true", POD_NAME=f"svc{n}-0")
    api = LocalAPI(node.node.socket)
    assert wait_for(lambda: advertised(api) == ["svc:cache", "svc:db", "svc:web"], 15), advertised(api)
    node.run.wait_contains("cert share: keeping the certificate for web.lab.test fresh")
    assert "not implemented yet" not in node.run.output
    # The operator drops a Service: the prefs follow without a restart.
    cfg.write_text(json.dumps(TCP_SERVICE))
    assert wait_for(lambda: advertised(api) == ["svc:db"], 15), advertised(api)
    node.run.wait_contains("cert share: web.lab.test is no longer in the serve config")
    sent = time.monotonic()
    node.run.proc.send_signal(signal.SIGTERM)
    assert node.run.wait_exit(timeout=35) == 0, node.run.output
    took = time.monotonic() - sent
    print(f"\ncontainerboot SIGTERM -> exit with a Service advertised: {took:.2f} s")
    out = node.run.output
    assert "unadvertising services: [svc:db]" in out
    assert out.index("unadvertising services") < out.index("Sending SIGTERM to tailscaled")
    assert 20.0 <= took <= 25.0 + 2.0, out
