"""Shutdown with Services advertised: SIGTERM, unadvertise, upstream's 20 s failover wait, exit, all within
the 25 s shutdown bound, against a real tailscaled (not logged in: prefs work without control).

Until Boot calls the services module, a small program stands in for Boot's shutdown: it drives the module
the way the wiring given to boot.py does (main loop of one-second ticks, signal -> stop, unadvertise,
failover wait; a second signal cuts the wait short), so what is measured here is the module under
real signals and a real tailscaled, including one that stops answering (SIGSTOP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from containerboot.tailscale.localapi import LocalAPI
from tests.conftest import ROOT, need, need_root, python_exe
from tests.lab.fakes import Run
from tests.lab.netns import Lab
from tests.lab.tailnet import binaries, have_binaries
from tests.lab.wait import wait_for

SHUTDOWN_BOUND = 25.0  # boot.SHUTDOWN_TIMEOUT: unadvertise, the failover wait and tailscaled's SIGTERM fit in it
FAILOVER = 20.0

# Boot's part, as the wiring proposed for boot.py has it.
HARNESS = r"""
import json, os, signal, threading, time
from containerboot import log, settings
from containerboot.tailscale import vipservices
from containerboot.tailscale.localapi import LocalAPI

s = settings.load(os.environ)
api = LocalAPI(s.socket)
svc = vipservices.Services(s, api)
stop = threading.Event()
signals = []

def on_signal(signum, frame):
    signals.append(signum)
    stop.set()
    if len(signals) > 1:
        svc.interrupt()  # Boot.on_signal while shutting down

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
svc.start()
svc.on_serve_config(json.loads(os.environ.get("HARNESS_SERVE", "{}")))
log.info("Startup complete, waiting for shutdown signal")
while not stop.wait(1.0):  # Boot's tick: the main loop goes on whatever the services threads are doing
    svc.on_netmap()
log.info(f"Received {signal.Signals(signals[0]).name}, shutting down")
deadline = time.monotonic() + float(os.environ.get("HARNESS_BOUND", "25"))
until = svc.unadvertise(deadline)
# Boot: wait_consistent_state(deadline) here, overlapping the failover wait
svc.wait_failover(until)
log.info("Sending SIGTERM to tailscaled")
"""


class Tailscaled:
    """A real tailscaled in a namespace of its own with only loopback: it never reaches a control server."""

    def __init__(self) -> None:
        self.lab = Lab("svc")
        self.dir = Path(tempfile.mkdtemp(prefix="cbsvc", dir="/tmp"))
        self.socket = str(self.dir / "ts.sock")
        ns = self.lab.ns("ts")
        bins = binaries()
        self.log = open(self.dir / "tailscaled.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = self.lab.spawn(ns, [bins["tailscaled"], f"--socket={self.socket}", "--state=mem:",
                                        f"--statedir={self.dir}", "--tun=userspace-networking"],
                                   env={"TS_NO_LOGS_NO_SUPPORT": "true", "HOME": str(self.dir),
                                        "PATH": os.environ["PATH"]},
                                   stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_for(lambda: os.path.exists(self.socket), timeout=15, interval=0.1):
            raise RuntimeError("tailscaled did not start: " + (self.dir / "tailscaled.log").read_text()[-2000:])
        self.api = LocalAPI(self.socket)

    def advertised(self) -> list[str] | None:
        prefs: dict[str, Any] = self.api.json("GET", "/localapi/v0/prefs")
        return prefs.get("AdvertiseServices")

    def advertise(self, *names: str) -> None:
        self.api.json("PATCH", "/localapi/v0/prefs", {"AdvertiseServicesSet": True, "AdvertiseServices": list(names)})

    def close(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)  # a test may have stopped it
        self.lab.close()
        self.log.close()


@pytest.fixture
def tailscaled() -> Iterator[Tailscaled]:
    need_root()
    need(have_binaries(), "needs tailscaled: run scripts/build-go.sh")
    ts = Tailscaled()
    yield ts
    ts.close()


def harness(ts: Tailscaled, **env: str) -> Run:
    full = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "TS_SOCKET": ts.socket, **env}
    run = Run(full, argv=[python_exe(), "-c", HARNESS])
    run.wait_log("Startup complete, waiting for shutdown signal", timeout=10)
    return run


def terminate(run: Run, sig: int = signal.SIGTERM) -> float:
    os.kill(run.proc.pid, sig)
    return time.monotonic()


def test_sigterm_unadvertises_waits_for_failover_and_exits_within_the_bound(tailscaled: Tailscaled) -> None:
    tailscaled.advertise("svc:web", "svc:db")
    run = harness(tailscaled)
    sent = terminate(run)
    code = run.wait_exit(timeout=SHUTDOWN_BOUND + 5)
    took = time.monotonic() - sent
    print(f"\nSIGTERM -> exit with services advertised: {took:.2f} s (failover wait {FAILOVER:g} s, bound "
          f"{SHUTDOWN_BOUND:g} s)")
    assert code == 0, run.output
    assert tailscaled.advertised() is None
    assert "unadvertising services: [svc:web svc:db]" in run.output
    assert "waiting 20s for control to move the unadvertised services to another node" in run.output
    assert FAILOVER <= took <= SHUTDOWN_BOUND, run.output
    order = [i for i, line in enumerate(run.lines) if line.endswith(("unadvertising services: [svc:web svc:db]",
                                                                     "Sending SIGTERM to tailscaled"))]
    assert len(order) == 2 and order[0] < order[1]


def test_a_second_signal_ends_the_failover_wait(tailscaled: Tailscaled) -> None:
    tailscaled.advertise("svc:web")
    run = harness(tailscaled)
    terminate(run)
    run.wait_contains("waiting 20s for control to move", timeout=5)
    again = terminate(run, signal.SIGINT)
    code = run.wait_exit(timeout=SHUTDOWN_BOUND)
    took = time.monotonic() - again
    print(f"\nsecond signal -> exit: {took:.2f} s")
    assert code == 0
    assert took < FAILOVER / 2, run.output
    assert "stopped waiting for the services' failover: asked to stop again" in run.output
    assert tailscaled.advertised() is None


def test_nothing_advertised_no_wait(tailscaled: Tailscaled) -> None:
    run = harness(tailscaled)
    sent = terminate(run)
    assert run.wait_exit(timeout=SHUTDOWN_BOUND) == 0
    took = time.monotonic() - sent
    print(f"\nSIGTERM -> exit with nothing advertised: {took:.2f} s")
    assert "unadvertising" not in run.output and "waiting 20s" not in run.output
    assert took < FAILOVER / 2


def test_the_deadline_bounds_the_failover_wait(tailscaled: Tailscaled) -> None:
    run = harness(tailscaled, HARNESS_BOUND="3")
    tailscaled.advertise("svc:web")
    sent = terminate(run)
    assert run.wait_exit(timeout=SHUTDOWN_BOUND) == 0
    took = time.monotonic() - sent
    # A shorter bound (HARNESS_BOUND=3) cuts the failover wait: the deadline wins over the 20 s.
    assert took < 3 + 2, run.output
    assert tailscaled.advertised() is None


def test_hung_tailscaled_bounds_the_shutdown(tailscaled: Tailscaled) -> None:
    """tailscaled stops answering (SIGSTOP: it still accepts connections) while the advertisement asks it
    something: the main loop still sees SIGTERM at once, and the shutdown ends within the bound."""
    tailscaled.advertise("svc:web")
    os.kill(tailscaled.proc.pid, signal.SIGSTOP)
    try:
        run = harness(tailscaled, HARNESS_SERVE=json.dumps({"Services": {"svc:web": {}}}))
        time.sleep(0.5)  # the advertisement's first call is now waiting on the stopped tailscaled
        sent = terminate(run)
        received = run.wait_log("Received SIGTERM, shutting down", timeout=3)
        assert received
        code = run.wait_exit(timeout=SHUTDOWN_BOUND + 5)
        took = time.monotonic() - sent
    finally:
        os.kill(tailscaled.proc.pid, signal.SIGCONT)
    print(f"\nSIGTERM -> exit with tailscaled stopped: {took:.2f} s")
    assert code == 0
    assert took <= SHUTDOWN_BOUND, run.output
    assert "Error ensuring services are not advertised" in run.output
    assert "waiting 20s" not in run.output  # nothing known to be unadvertised: no failover wait
