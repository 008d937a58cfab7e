"""Hostile clients on the health/metrics endpoint (TS_LOCAL_ADDR_PORT).

500 idle and 500 slow (slowloris) clients, reconnecting whenever they are dropped, against containerboot
running with 256 file descriptors (`prlimit --nofile=256`). The boot must keep running, /healthz must
keep answering, and containerboot must stay small: a thread per client would need 1000 threads and
1000 fds. Also: oversized and malformed requests get an answer or a close, never a stuck slot.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import selectors
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.lab.fakes import Root, Run, netmap, temp_root
from tests.lab.ports import free_port
from tests.lab.wait import wait_for

FLOOD_SECONDS = 60  # the issue asks that the boot keep running for 60 s under the flood
PROBE_EVERY = 0.5
PROBE_TIMEOUT = 3.0  # a kubelet probe gives 1 s by default; one SYN retransmit is 1 s more
MAX_THREADS = 16


@pytest.fixture
def root() -> Iterator[Root]:
    need(shutil.which("prlimit") is not None, "needs prlimit (util-linux)")
    with temp_root() as r:
        yield r


class Flood:
    """Idle clients connect and say nothing; slow ones send a request head a line per second and never
    finish it. Each reconnects 0.1-0.5 s after being dropped, or when its connect has not completed within
    a second (as impatient clients do, instead of waiting for the kernel's SYN retries). One selector
    thread drives them all."""

    def __init__(self, port: int, idle: int, slow: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = idle + slow + 256
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        self.addr = ("127.0.0.1", port)
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.pending: list[tuple[float, str]] = [(0.0, "idle")] * idle + [(0.0, "slow")] * slow
        self.connected = 0
        self.dropped = 0
        self.open = 0
        self.max_open = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()

    def _connect(self, kind: str) -> None:
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.pending.append((time.monotonic() + 0.2, kind))
            return
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        self.sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, [kind, False, time.monotonic()])

    def _drop(self, s: socket.socket, kind: str) -> None:
        self.sel.unregister(s)
        s.close()
        self.open -= 1
        self.dropped += 1
        self.pending.append((time.monotonic() + random.uniform(0.1, 0.5), kind))

    def _run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            due = [p for p in self.pending if p[0] <= now]
            self.pending = [p for p in self.pending if p[0] > now]
            for _, kind in due[:200]:  # at most 200 connects per turn, like a steady stream
                self._connect(kind)
            self.pending += due[200:]
            for key, mask in self.sel.select(0.05):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                state = key.data
                kind = state[0]
                if mask & selectors.EVENT_WRITE and not state[1]:
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        self._drop(s, kind)
                        continue
                    state[1] = True
                    self.connected += 1
                    self.sel.modify(s, selectors.EVENT_READ, state)
                    if kind == "slow":
                        state[2] = now
                        try:
                            s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                        except OSError:
                            self._drop(s, kind)
                    continue
                if mask & selectors.EVENT_READ:
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(s, kind)
            for key in list(self.sel.get_map().values()):  # the slow ones: one more header line a second
                state = key.data
                if not state[1] and now - state[2] >= 1.0:  # still connecting: try again
                    self._drop(key.fileobj, state[0])  # type: ignore[arg-type]
                elif state[0] == "slow" and state[1] and now - state[2] >= 1.0:
                    state[2] = now
                    try:
                        key.fileobj.send(b"X-Slow: 1\r\n")  # type: ignore[union-attr]
                    except OSError:
                        self._drop(key.fileobj, "slow")  # type: ignore[arg-type]


def probe(url: str) -> tuple[int, float]:
    began = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError:
        status = 0
    return status, time.monotonic() - began


def sample(pid: int) -> tuple[int, int, int]:
    """Threads, open fds and RSS (KiB) of a process."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return threads, fds, rss


def start_with_fd_limit(root: Root, port: int, nofile: int = 256) -> Run:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = Run(root.env(TS_ENABLE_HEALTH_CHECK="true", TS_ENABLE_METRICS="true",
                       TS_LOCAL_ADDR_PORT=f"127.0.0.1:{port}"),
              prefix=["prlimit", f"--nofile={nofile}", "--"])
    run.wait_log("Startup complete, waiting for shutdown signal", timeout=10)
    return run


def test_idle_and_slow_clients_do_not_end_the_boot(root: Root) -> None:
    port = free_port()
    run = start_with_fd_limit(root, port)
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        assert probe(url)[0] == 200
        probes: list[tuple[int, float]] = []
        samples: list[tuple[int, int, int]] = []
        with Flood(port, idle=500, slow=500) as flood:
            end = time.monotonic() + FLOOD_SECONDS
            while time.monotonic() < end and run.proc.poll() is None:
                probes.append(probe(url))
                samples.append(sample(run.proc.pid))
                time.sleep(PROBE_EVERY)
            connected, dropped, max_open = flood.connected, flood.dropped, flood.max_open
        alive = run.proc.poll() is None
        after = probe(url)
        failed = [p for p in probes if p[0] != 200]
        slowest = max(t for _, t in probes)
        threads = max(s[0] for s in samples)
        fds = max(s[1] for s in samples)
        rss = max(s[2] for s in samples)
        figures = (f"{len(probes)} probes, {len(failed)} failed, slowest {slowest:.2f}s; containerboot: max "
                   f"{threads} threads, {fds} fds, {rss / 1024:.1f} MiB RSS; flood: {connected} connections made, "
                   f"{dropped} dropped by the server, {max_open} open at once")
        print(figures)
        assert alive, f"containerboot ended during the flood ({figures}):\n{run.output[-3000:]}"
        assert not failed, f"/healthz failed under the flood: {figures}"
        assert slowest < PROBE_TIMEOUT, figures
        assert threads <= MAX_THREADS, f"a thread per client? {figures}"
        assert after[0] == 200, f"/healthz after the flood: {after}"
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait_exit(30) == 0, run.output[-3000:]
    finally:
        run.stop()


def raw_exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        if data:
            s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.0 200 OK"),
    (b"GET /healthz HTTP/1.0\n\n", b"HTTP/1.0 200 OK"),  # bare newlines, as before
    (b"HEAD /healthz HTTP/1.1\r\n\r\n", b"HTTP/1.0 200 OK"),
    (b"BREW /healthz HTTP/1.1\r\n\r\n", b"HTTP/1.0 501"),
    (b"garbage\r\n\r\n", b"HTTP/1.0 400"),  # as Go's server answers it (no HTTP/0.9 bare body)
    (b"GET /healthz HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n", b"HTTP/1.0 431"),
    (b"GET /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.0 200 OK"),
])
def test_odd_requests_get_an_answer(root: Root, request_bytes: bytes, expected: bytes) -> None:
    port = free_port()
    run = start_with_fd_limit(root, port)
    try:
        out = raw_exchange(port, request_bytes)
        assert out.startswith(expected), out[:300]
        assert run.proc.poll() is None
    finally:
        run.stop()


def test_silent_client_is_dropped_after_the_request_timeout(root: Root) -> None:
    from containerboot.httpserver import REQUEST_TIMEOUT

    port = free_port()
    run = start_with_fd_limit(root, port)
    try:
        began = time.monotonic()
        assert raw_exchange(port, b"GET /healthz HTTP/1.1\r\n", wait=REQUEST_TIMEOUT + 10) == b""
        took = time.monotonic() - began
        assert REQUEST_TIMEOUT - 0.5 <= took <= REQUEST_TIMEOUT + 2, took
    finally:
        run.stop()


def test_health_server_alone_under_an_fd_limit(root: Root) -> None:
    """The deprecated health-only server shares the code; also check our own fds stay far from the limit
    when 300 clients hold connections open at once."""
    port = free_port()
    run = start_with_fd_limit(root, port, nofile=128)
    try:
        socks: list[socket.socket] = []
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        time.sleep(1)
        status, took = probe(f"http://127.0.0.1:{port}/healthz")
        threads, fds, _ = sample(run.proc.pid)
        for s in socks:
            s.close()
        assert status == 200 and took < PROBE_TIMEOUT, (status, took)
        assert fds < 100 and threads <= MAX_THREADS, (fds, threads)
        assert run.proc.poll() is None
    finally:
        run.stop()




def test_slow_tailscaled_behind_metrics_does_not_block_healthz(root: Root) -> None:
    """/metrics waits on tailscaled; with tailscaled slow, a burst of scrapes takes the few workers and
    the rest get 503 at once, while /healthz (answered without waiting on anybody) stays prompt."""
    port = free_port()
    run = start_with_fd_limit(root, port)
    root.api.delays["/localapi/v0/usermetrics"] = 4.0
    results: list[int] = []
    lock = threading.Lock()

    def scrape() -> None:
        status, _ = probe_timeout(f"http://127.0.0.1:{port}/metrics", 8.0)
        with lock:
            results.append(status)

    try:
        scrapers = [threading.Thread(target=scrape) for _ in range(40)]
        for t in scrapers:
            t.start()
        time.sleep(0.5)
        probes = [probe(f"http://127.0.0.1:{port}/healthz") for _ in range(5)]
        threads = sample(run.proc.pid)[0]
        for t in scrapers:
            t.join(15)
        print(f"/metrics statuses: {sorted(results)}; /healthz meanwhile: {probes}; {threads} threads")
        assert all(status == 200 and took < 1.0 for status, took in probes), probes
        assert threads <= MAX_THREADS, threads
        assert 503 in results and 200 in results and set(results) <= {200, 503, 0}, results
        assert run.proc.poll() is None
    finally:
        run.stop()


def probe_timeout(url: str, timeout: float) -> tuple[int, float]:
    began = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read()
            return resp.status, time.monotonic() - began
    except urllib.error.HTTPError as exc:
        return exc.code, time.monotonic() - began
    except OSError:
        return 0, time.monotonic() - began


CLIENTS = """
import socket, sys, time
sys.stdin.readline()
held = []
for _ in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"GET /healthz HTTP/1.1\\r\\n")  # past TCP_DEFER_ACCEPT, never finished
    held.append(s)
print("connected", flush=True)
sys.stdin.readline()
"""


def test_running_out_of_fds_drops_connections_not_the_server() -> None:
    """The server in this process with an fd limit just above what it has open: accept() fails with
    EMFILE, the pending connection is taken with the reserve fd and closed, and serving goes on."""
    import subprocess
    import sys

    from containerboot import health
    from containerboot.httpserver import Server
    from containerboot.settings import load

    state = health.Health(load({}))
    state.set(True)
    server = Server(("127.0.0.1", 0), socket.AF_INET, health._handler(state, None, ""),
                           slow=lambda _: False, max_connections=1000)
    port = server.server_address[1]
    clients = subprocess.Popen([sys.executable, "-c", CLIENTS, str(port), "60"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert clients.stdin is not None and clients.stdout is not None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_with_free_fds(10), hard))
        clients.stdin.write("go\n")
        clients.stdin.flush()
        assert clients.stdout.readline().strip() == "connected"
        assert wait_for(lambda: server.stats["shed"] > 0, 5), server.stats
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        clients.stdin.write("done\n")
        clients.stdin.flush()
        clients.wait(10)
    try:
        status, took = probe(f"http://127.0.0.1:{port}/healthz")
        print(f"after EMFILE: {server.stats}; /healthz {status} in {took * 1000:.0f} ms")
        assert status == 200
    finally:
        server.shutdown()
        server.server_close()


def limit_with_free_fds(free: int) -> int:
    """The fd limit below which exactly `free` descriptor numbers are unused in this process."""
    used = {int(fd) for fd in os.listdir("/proc/self/fd")}
    limit = 0
    while free > 0 or limit in used:
        if limit not in used:
            free -= 1
        limit += 1
    return limit
