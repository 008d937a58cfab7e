"""tailscaled's LocalAPI: HTTP over its unix socket, including the IPN bus stream."""

from __future__ import annotations

import codecs
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from containerboot.settings import CAPABILITY_VERSION
from containerboot.tailscale import http1

HOST = "local-tailscaled.sock"
TIMEOUT = 10.0  # a tailscaled that accepts and never answers costs at most this per call
WATCH_OPEN_TIMEOUT = 5.0  # connect and response headers of the bus stream; reads after that wait for news

Guard = Callable[[], AbstractContextManager[None]]


class LocalAPIError(RuntimeError):
    pass


class Watch(Protocol):
    """An open IPN bus stream: iterating blocks for the next notification and raises LocalAPIError when
    the stream fails; close() may be called from another thread and ends the iteration."""

    def __iter__(self) -> Iterator[Mapping[str, object]]: ...

    def close(self) -> None: ...


class TailscaledAPI(Protocol):
    """What the boot asks tailscaled (LocalAPI; a fake in the loop's tests). Failures are LocalAPIError."""

    socket_path: str  # for the loops that hold connections of their own (cert share, advertisement)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float | None = TIMEOUT) -> tuple[int, dict[str, str], bytes]:
        """status, headers and body of one call, whatever the status."""
        ...

    def json(self, method: str, path: str, payload: object = None, headers: dict[str, str] | None = None,
             timeout: float = TIMEOUT) -> object:
        """The decoded answer of a 2xx response (None for an empty body)."""
        ...

    def watch(self, mask: int, timeout: float = WATCH_OPEN_TIMEOUT) -> Watch: ...


def _open(path: str, timeout: float | None, method: str, target: str, headers: dict[str, str],
          body: bytes | None = None) -> tuple[socket.socket, http1.Response]:
    """Connect, send, read the response head; the socket is closed on any failure."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        return sock, http1.request(sock, method, target, HOST, headers, body)
    except BaseException:
        sock.close()
        raise


class LocalAPI:
    """`guard` wraps every call made from the main thread (the boot uses it to let a shutdown signal
    abort a call that blocks); calls from other threads (the metrics endpoint) are bounded by timeouts only."""

    def __init__(self, socket_path: str, guard: Guard = contextlib.nullcontext) -> None:
        self.socket_path = socket_path
        self.guard = guard

    def _guarded(self) -> AbstractContextManager[None]:
        main = threading.current_thread() is threading.main_thread()
        return self.guard() if main else contextlib.nullcontext()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float | None = TIMEOUT) -> tuple[int, dict[str, str], bytes]:
        with self._guarded():
            return self._request(method, path, body, headers, timeout)

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None,
                 timeout: float | None) -> tuple[int, dict[str, str], bytes]:
        sock: socket.socket | None = None
        try:
            sock, resp = _open(self.socket_path, timeout, method, path,
                               {"Tailscale-Cap": str(CAPABILITY_VERSION), **(headers or {})}, body)
            try:
                return resp.status, resp.headers, resp.read()
            finally:
                resp.close()
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise LocalAPIError(f"{method} {path}: tailscaled did not answer within {timeout:g}s") from exc
            raise LocalAPIError(f"{method} {path}: {exc}") from exc
        finally:
            if sock is not None:
                sock.close()

    def json(self, method: str, path: str, payload: object = None, headers: dict[str, str] | None = None,
             timeout: float = TIMEOUT) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json", **(headers or {})},
                                       timeout)
        if status // 100 != 2:
            raise LocalAPIError(f"{method} {path}: {status} {data.decode(errors='replace').strip()}")
        return json.loads(data) if data.strip() else None

    def watch(self, mask: int, timeout: float = WATCH_OPEN_TIMEOUT) -> BusWatch:
        with self._guarded():
            return BusWatch(self.socket_path, mask, timeout)


class BusWatch:
    """`GET /localapi/v0/watch-ipn-bus?mask=N`: a stream of JSON notifications, one object each."""

    def __init__(self, socket_path: str, mask: int, timeout: float = WATCH_OPEN_TIMEOUT) -> None:
        try:
            self._sock, self._resp = _open(socket_path, timeout, "GET", f"/localapi/v0/watch-ipn-bus?mask={mask}",
                                           {"Tailscale-Cap": str(CAPABILITY_VERSION)})
            # Open: from here a read waits for tailscaled's next notification, however long that takes; the
            # reader is a thread of its own, so the boot's deadline and signals do not depend on it.
            self._sock.settimeout(None)
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise LocalAPIError(f"watch-ipn-bus: tailscaled did not answer within {timeout:g}s") from exc
            raise LocalAPIError(f"watch-ipn-bus: {exc}") from exc
        if self._resp.status != 200:
            try:
                body = self._resp.read().decode(errors="replace").strip()
            except OSError:
                body = ""
            self.close()
            raise LocalAPIError(f"watch-ipn-bus: {self._resp.status} {body}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8")()  # a character may straddle two reads
        buf = ""
        while True:
            try:
                chunk = self._resp.read1(65536)
            except Exception as exc:  # noqa: BLE001 - close() from another thread surfaces as anything
                raise LocalAPIError(f"reading the IPN bus: {exc}") from exc
            if not chunk:
                raise LocalAPIError("the IPN bus stream ended (tailscaled went away)")
            buf += utf8.decode(chunk)
            while True:
                buf = buf.lstrip()
                if not buf:
                    break
                try:
                    obj, end = decoder.raw_decode(buf)
                except json.JSONDecodeError:
                    break  # an object split across reads: wait for the rest
                buf = buf[end:]
                if isinstance(obj, dict):
                    yield obj

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._resp.close()
        self._sock.close()
