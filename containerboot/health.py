"""The local HTTP endpoints (/healthz, /metrics, /debug/) and the `healthcheck` client.

The server is one selector thread per listening address, so an idle or slow client costs a
socket and a few hundred bytes, never a thread:
- a connection is accepted only once its client has sent something (TCP_DEFER_ACCEPT), and its
  request is read at once, so a client that connects and says nothing costs us nothing;
- at most MAX_CONNECTIONS connections (fewer when the fd limit is low); a new one beyond that
  pushes out the oldest connection that has not finished sending its request, so a probe that
  sends its request at once still gets in while slow clients hold the other slots;
- a request (head and body) must arrive within REQUEST_TIMEOUT of the connection and its answer
  be taken within WRITE_TIMEOUT; heads are limited to MAX_HEAD bytes, bodies to MAX_BODY;
- /healthz and error answers are made on the selector thread (no blocking call); /metrics and
  /debug/ wait on tailscaled, so they go to a few worker threads, and when those are saturated
  the request gets 503 instead of a queue without end;
- running out of file descriptors (EMFILE) closes the connection that cannot be served and
  pauses accepting for a moment; it never ends the program.
Requests are parsed and answered by containerboot/tailscale/http1.py (HTTP/1.0, one request per connection):
http.server would bring http.client, email and ssl, about 5 MiB resident in every pod.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import re
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from containerboot import log
from containerboot.settings import Settings, parse_addr_port
from containerboot.tailscale import http1
from containerboot.tailscale.localapi import LocalAPI, LocalAPIError, TailscaledAPI

NO_IPS = b"node currently has no tailscale IPs\n"
PRESHUTDOWN_PATH = "/internal-egress-services-preshutdown"  # kubetypes.EgessServicesPreshutdownEP

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 10.0  # from accept to the whole request (head and body)
WRITE_TIMEOUT = 10.0  # for the client to take the answer
WORK_TIMEOUT = 60.0  # a worker's answer later than this is dropped (its own timeouts are 10 s and 30 s)
MAX_HEAD = 65536
MAX_BODY = 1 << 20  # /debug/ only; other paths ignore a body
WORKERS = 4
WORK_BACKLOG = 8  # requests waiting for a worker before new ones get 503
ACCEPT_BATCH = 16  # accepts per loop turn, so a new connection is read before it could be pushed out
SHED_PAUSE = 0.1  # seconds without accepting after EMFILE
NOTE_EVERY = 60.0


class Health:
    """Healthy means the node currently has at least one tailnet address (upstream's rule)."""

    def __init__(self, s: Settings) -> None:
        self._healthy = False
        self._lock = threading.Lock()
        v4 = next((ip for ip in s.pod_ips if ip.version == 4), None)
        v6 = next((ip for ip in s.pod_ips if ip.version == 6), None)
        self.headers = {k: str(v) for k, v in (("Pod-IPv4", v4), ("Pod-IPv6", v6)) if v}

    def set(self, healthy: bool) -> None:
        with self._lock:
            changed, self._healthy = self._healthy != healthy, healthy
        if changed:
            log.info(f"Setting healthy {str(healthy).lower()}")

    @property
    def healthy(self) -> bool:
        with self._lock:
            return self._healthy


Preshutdown = Callable[[], tuple[int, bytes]]


Handler = Callable[[http1.Request], bytes]


def _handler(health: Health | None, metrics: TailscaledAPI | None, debug: str,
             preshutdown: Preshutdown | None = None) -> Handler:
    def handle(req: http1.Request) -> bytes:
        def send(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
            return http1.response(status, body, headers, head_only=req.method == "HEAD")

        path = req.path
        if path.startswith("/debug/") and metrics is not None:
            return send(*_debug(req, debug))
        known = {"/healthz": health is not None, "/metrics": metrics is not None,
                 PRESHUTDOWN_PATH: preshutdown is not None}
        if not known.get(path):
            return send(404, b"404 page not found\n")
        if req.method not in ("GET", "HEAD"):
            return send(405, b"Method Not Allowed\n")
        if path == PRESHUTDOWN_PATH and preshutdown is not None:
            return send(*preshutdown())  # on a worker thread: it waits for cluster traffic to stop
        if path == "/healthz" and health is not None:
            return send(200, b"ok", health.headers) if health.healthy else send(503, NO_IPS)
        assert metrics is not None
        try:
            status, headers, body = metrics.request("GET", "/localapi/v0/usermetrics", timeout=10)
        except LocalAPIError as exc:
            return send(500, f"failed to proxy request: {exc}\n".encode())
        hop = {"content-length", "transfer-encoding", "connection", "date"}
        return send(status, body, {k: v for k, v in headers.items() if k.lower() not in hop})

    return handle


def _debug(req: http1.Request, debug: str) -> tuple[int, bytes, dict[str, str]]:
    if not debug:
        return 404, b"debug endpoint not configured\n", {}
    import urllib.request  # only with TS_DEBUG_ADDR_PORT: it brings ssl and email (about 4 MiB)

    forward = urllib.request.Request(f"http://{debug}{req.target}", method=req.method, data=req.body or None)
    try:
        with urllib.request.urlopen(forward, timeout=30) as resp:
            return resp.status, resp.read(), {"Content-Type": resp.headers.get("Content-Type", "")}
    except OSError as exc:
        return 502, f"failed to proxy request: {exc}\n".encode(), {}


def _plain(status: int, reason: str, body: str) -> bytes:
    data = body.encode()
    return (f"HTTP/1.0 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


OVERLOADED = _plain(503, "Service Unavailable", "too many requests in progress, try again\n")
HEAD_TOO_LARGE = _plain(431, "Request Header Fields Too Large", "request header too large\n")
BODY_TOO_LARGE = _plain(413, "Request Entity Too Large", "request body too large\n")
BROKEN = _plain(500, "Internal Server Error", "internal error\n")

_HEAD_END = re.compile(rb"\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*([0-9]{1,12})[ \t]*\r?$")

READING, WORKING, WRITING = "reading", "working", "writing"


class _Conn:
    __slots__ = ("sock", "addr", "buf", "out", "deadline", "state", "closed")

    def __init__(self, sock: socket.socket, addr: Any, now: float) -> None:
        self.sock = sock
        self.addr = addr
        self.buf = bytearray()
        self.out = memoryview(b"")
        self.deadline = now + REQUEST_TIMEOUT
        self.state = READING
        self.closed = False


class _Pool:
    """At most `size` daemon threads, started as work needs them; `submit` refuses beyond the backlog."""

    def __init__(self, size: int, backlog: int) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._size, self._limit = size, size + backlog
        self._threads = self._pending = 0

    def submit(self, job: Callable[[], None]) -> bool:
        with self._lock:
            if self._pending >= self._limit:
                return False
            self._pending += 1
            grow = self._threads < self._size and self._pending > self._threads
            if grow:
                self._threads += 1
        if grow:
            try:
                threading.Thread(target=self._work, name="http-worker", daemon=True).start()
            except RuntimeError:  # no thread to be had: the ones running will take it, if any
                with self._lock:
                    self._threads -= 1
                    if self._threads == 0:
                        self._pending -= 1
                        return False
        self._jobs.put(job)
        return True

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # noqa: BLE001, S110 - the job reports its own result; a worker must not die
                pass
            finally:
                with self._lock:
                    self._pending -= 1

    def close(self) -> None:
        with self._lock:
            n = self._threads
        for _ in range(n):
            self._jobs.put(None)


def connection_cap(limit: int = MAX_CONNECTIONS) -> int:
    """MAX_CONNECTIONS, or a quarter of the fd limit when that is lower (at least 8)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return limit if soft == resource.RLIM_INFINITY else max(8, min(limit, soft // 4))


class Server:
    """An HTTP server on one address with bounded connections, time and threads (see the module doc).

    The interface boot.py uses: `addr_port`, `shutdown()`, `server_close()`."""

    def __init__(self, address: tuple[str, int], family: int, handler: Handler,
                 slow: Callable[[str], bool], max_connections: int | None = None, name: str = "http",
                 addr_port: str = "") -> None:
        self.addr_port = addr_port  # as configured: upstream's log lines name the address so ("[::]:9002")
        self._handler = handler
        self._slow = slow
        self.max_connections = max_connections or connection_cap()
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "TCP_DEFER_ACCEPT"):  # accept() only once a client has sent something
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, int(REQUEST_TIMEOUT))
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)  # as Go listens: deferred (silent) clients wait in the kernel
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self.server_address: tuple[Any, ...] = sock.getsockname()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._sel.register(sock, selectors.EVENT_READ, self)
        self._accepting = True
        self._resume_at = 0.0
        self._reserve = self._open_reserve()
        self._conns: dict[int, _Conn] = {}  # by fd, oldest first
        self._done: queue.SimpleQueue[tuple[_Conn, bytes]] = queue.SimpleQueue()
        self._pool = _Pool(WORKERS, WORK_BACKLOG)
        self._closing = False
        self._noted: dict[str, float] = {}
        self.stats = {"accepted": 0, "evicted": 0, "timed_out": 0, "shed": 0, "overloaded": 0}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---- lifecycle -----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        self._closing = True
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def server_close(self) -> None:
        self.shutdown()
        self._pool.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full (a wake-up is already pending) or closed
            pass

    # ---- the loop ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._closing:
                try:
                    self._turn()
                except Exception as exc:  # noqa: BLE001 - the endpoint must outlive any one bad turn
                    self._note("error", f"health/metrics endpoint: unexpected {type(exc).__name__}: {exc}")
                    time.sleep(0.05)
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._sel.close()
            self._listener.close()

    def _turn(self) -> None:
        now = time.monotonic()
        if not self._accepting and now >= self._resume_at:
            self._sel.register(self._listener, selectors.EVENT_READ, self)
            self._accepting = True
        deadlines = [c.deadline for c in self._conns.values()]
        wait = min([1.0, *(d - now for d in deadlines)] + ([] if self._accepting else [self._resume_at - now]))
        accept = False
        for key, mask in self._sel.select(max(0.0, wait)):
            if key.data is None:
                self._drain_wake()
            elif key.data is self:
                accept = True
            else:
                conn: _Conn = key.data
                if mask & selectors.EVENT_READ:
                    self._guard(conn, self._read)
                if mask & selectors.EVENT_WRITE and not conn.closed:
                    self._guard(conn, self._write)
        while True:
            try:
                conn, data = self._done.get_nowait()
            except queue.Empty:
                break
            if not conn.closed:
                self._guard(conn, functools.partial(self._reply, data=data))
        if accept and self._accepting:
            self._accept()
        self._expire(time.monotonic())

    def _guard(self, conn: _Conn, step: Callable[[_Conn], None]) -> None:
        try:
            step(conn)
        except Exception as exc:  # noqa: BLE001 - one connection's trouble ends that connection only
            self._note("conn", f"health/metrics endpoint: closing a connection: {type(exc).__name__}: {exc}")
            self._close(conn)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    # ---- connections ---------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._shed(exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    self._note("accept", f"health/metrics endpoint: accept: {exc}")
                    self._pause()
                return
            self.stats["accepted"] += 1
            try:
                sock.setblocking(False)
                if len(self._conns) >= self.max_connections and not self._evict():
                    sock.close()
                    continue
                conn = _Conn(sock, addr, time.monotonic())
                self._sel.register(sock, selectors.EVENT_READ, conn)
                self._conns[sock.fileno()] = conn
            except OSError:  # e.g. ENOMEM from epoll: this one is not served
                sock.close()
                continue
            self._guard(conn, self._read)  # a probe's request is usually there already: answer it now

    def _evict(self) -> bool:
        """Close the oldest connection still sending its request (or, failing that, still being
        answered); False when every slot is waiting on a worker."""
        for states in ((READING,), (WRITING,)):
            victim = next((c for c in self._conns.values() if c.state in states), None)
            if victim is not None:
                self.stats["evicted"] += 1
                self._note("full", f"health/metrics endpoint: {len(self._conns)} connections open (the limit); "
                                   "closing the oldest unfinished ones to make room")
                self._close(victim)
                return True
        return False

    def _shed(self, exc: OSError) -> None:
        """Out of fds: take one pending connection with the reserve fd and close it, then pause."""
        self.stats["shed"] += 1
        self._note("emfile", f"health/metrics endpoint: {exc.strerror}; dropping connections for a moment")
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            try:
                sock, _ = self._listener.accept()
                sock.close()
            except OSError:
                pass
            self._reserve = self._open_reserve()
        self._pause()

    def _pause(self) -> None:
        if self._accepting:
            self._sel.unregister(self._listener)
            self._accepting = False
        self._resume_at = time.monotonic() + SHED_PAUSE

    @staticmethod
    def _open_reserve() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.buf = bytearray()

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self.stats["timed_out"] += 1
            self._close(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._close(conn)
        if not data:
            return self._close(conn)
        if conn.state != READING:
            return
        conn.buf += data
        m = _HEAD_END.search(conn.buf)
        if m is None:
            if len(conn.buf) > MAX_HEAD:
                self._reply(conn, HEAD_TOO_LARGE)
            return
        head = bytes(conn.buf[:m.end()])
        line = head.split(b"\n", 1)[0].split()
        path = line[1].split(b"?", 1)[0].decode("latin-1") if len(line) > 1 else ""
        slow = self._slow(path)
        need = m.end()
        if slow and path.startswith("/debug/"):
            cl = _CONTENT_LENGTH.search(head)
            length = int(cl.group(1)) if cl else 0
            if length > MAX_BODY:
                return self._reply(conn, BODY_TOO_LARGE)
            need += length
            if len(conn.buf) < need:
                return
        request = bytes(conn.buf[:need])
        conn.buf = bytearray()
        if not slow:
            return self._reply(conn, self._answer(request, conn.addr))
        conn.state = WORKING
        conn.deadline = time.monotonic() + WORK_TIMEOUT
        self._sel.unregister(conn.sock)  # nothing to read until answered (a half-close is no reason to stop)

        def job() -> None:
            self._done.put((conn, self._answer(request, conn.addr)))
            self._wake()

        if not self._pool.submit(job):
            self.stats["overloaded"] += 1
            self._reply(conn, OVERLOADED)

    def _reply(self, conn: _Conn, data: bytes) -> None:
        registered = conn.state == READING
        conn.state = WRITING
        conn.out = memoryview(data)
        conn.deadline = time.monotonic() + WRITE_TIMEOUT
        self._write(conn)
        if conn.closed:
            return
        if registered:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        else:
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)

    def _write(self, conn: _Conn) -> None:
        if conn.state != WRITING:
            return
        try:
            while conn.out:
                sent = conn.sock.send(conn.out)
                conn.out = conn.out[sent:]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._close(conn)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._close(conn)

    def _answer(self, request: bytes, addr: Any) -> bytes:
        """The handler's whole answer to one request, made in memory."""
        try:
            return self._handler(http1.parse_request(request))
        except http1.BadRequest as exc:
            return http1.response(exc.status, f"{exc}\n".encode())
        except Exception:  # noqa: BLE001 - a handler bug: a 500, not a dead server
            return BROKEN

    def _note(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._noted.get(key, -NOTE_EVERY) >= NOTE_EVERY:
            self._noted[key] = now
            log.warning(message)


def serve(addr_port: str, health: Health | None, metrics: TailscaledAPI | None, debug: str,
          preshutdown: Preshutdown | None = None) -> Server:
    ip, port = parse_addr_port(addr_port)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET

    def slow(path: str) -> bool:  # answers that wait (on tailscaled, on cluster traffic) go to a worker
        if path == PRESHUTDOWN_PATH:
            return preshutdown is not None
        return metrics is not None and (path == "/metrics" or (path.startswith("/debug/") and bool(debug)))

    return Server((str(ip), port), family, _handler(health, metrics, debug, preshutdown), slow,
                  name=f"http-{addr_port}", addr_port=addr_port)


def start(s: Settings, health: Health, api: TailscaledAPI, preshutdown: Preshutdown | None = None) -> list[Server]:
    """Upstream's servers: the deprecated health-only one, then the local one (which also serves the egress
    services' pre-stop hook when TS_EGRESS_PROXIES_CONFIG_PATH is set)."""
    servers = []
    if s.healthcheck_addr_port:
        servers.append(serve(s.healthcheck_addr_port, health, None, ""))
        log.info(f"Running healthcheck endpoint at {s.healthcheck_addr_port}/healthz")
    if not s.egress_proxies_config_path:
        preshutdown = None
    if s.enable_metrics or s.enable_health_check or preshutdown is not None:
        servers.append(serve(s.local_addr_port, health if s.enable_health_check else None,
                             api if s.enable_metrics else None, s.debug_addr_port, preshutdown))
        if s.enable_metrics:
            log.info(f"Running metrics endpoint at {s.local_addr_port}/metrics")
        if s.enable_health_check:
            log.info(f"Running healthcheck endpoint at {s.local_addr_port}/healthz")
        if preshutdown is not None:
            log.info(f"Running egress preshutdown hook at {s.local_addr_port}{PRESHUTDOWN_PATH}")
    return servers


def health_url(s: Settings) -> str:
    addr = s.healthcheck_addr_port or (s.local_addr_port if s.enable_health_check else "")
    if not addr:
        return ""
    ip, port = parse_addr_port(addr)
    # "[::]" listens on both families; a container often has no IPv6 at all (Docker's default), so ask
    # over IPv4 loopback, which that listener accepts too.
    host = {"0.0.0.0": "127.0.0.1", "::": "127.0.0.1"}.get(str(ip), str(ip))
    return f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"


def check(s: Settings) -> int:
    """For a Docker HEALTHCHECK: 0 when healthy. Uses /healthz when it is enabled, else asks
    tailscaled directly (Running with a tailnet address), so it works with no endpoint enabled."""
    url = health_url(s)
    if url:
        import http.client  # the healthcheck command only; urllib.request imports it anyway
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                print(f"healthy: {url} answered {resp.status}")
                return 0 if resp.status == 200 else 1
        except (OSError, http.client.HTTPException) as exc:
            print(f"unhealthy: {url}: {exc}")
            return 1
    try:
        status = LocalAPI(s.socket).json("GET", "/localapi/v0/status")
    except (LocalAPIError, ValueError) as exc:
        print(f"unhealthy: tailscaled LocalAPI at {s.socket}: {exc}")
        return 1
    state, ips = status.get("BackendState"), status.get("TailscaleIPs") or []
    print(f"{'healthy' if state == 'Running' and ips else 'unhealthy'}: {state}, addresses {ips}")
    return 0 if state == "Running" and ips else 1
