"""The HTTP server behind the local endpoints (health.py): bounded connections, time and threads.

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

Apart from health.py because none of this depends on what is served: the server takes a handler (a
request in, the whole answer out) and a rule for which paths wait on something (`slow`), and the
endpoints' meaning stays in health.py.
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
from containerboot.tailscale import http1

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

Handler = Callable[[http1.Request], bytes]  # one request -> its whole answer


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

    The interface boot/loop.py uses: `addr_port`, `shutdown()`, `server_close()`."""

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

