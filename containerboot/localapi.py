"""tailscaled's LocalAPI: HTTP over its unix socket, including the IPN bus stream."""

from __future__ import annotations

import codecs
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

from containerboot.settings import CAPABILITY_VERSION

HOST = "local-tailscaled.sock"


class LocalAPIError(RuntimeError):
    pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__(HOST, timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class LocalAPI:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float | None = 30) -> tuple[int, dict[str, str], bytes]:
        conn = _UnixConnection(self.socket_path, timeout)
        try:
            conn.request(method, path, body=body,
                         headers={"Tailscale-Cap": str(CAPABILITY_VERSION), **(headers or {})})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise LocalAPIError(f"{method} {path}: {exc}") from exc
        finally:
            conn.close()

    def json(self, method: str, path: str, payload: Any = None, headers: dict[str, str] | None = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        if status // 100 != 2:
            raise LocalAPIError(f"{method} {path}: {status} {data.decode(errors='replace').strip()}")
        return json.loads(data) if data.strip() else None

    def watch(self, mask: int) -> BusWatch:
        return BusWatch(self.socket_path, mask)


class BusWatch:
    """`GET /localapi/v0/watch-ipn-bus?mask=N`: a stream of JSON notifications, one object each."""

    def __init__(self, socket_path: str, mask: int) -> None:
        self._conn = _UnixConnection(socket_path, None)
        try:
            self._conn.request("GET", f"/localapi/v0/watch-ipn-bus?mask={mask}",
                               headers={"Tailscale-Cap": str(CAPABILITY_VERSION)})
            self._resp = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise LocalAPIError(f"watch-ipn-bus: {exc}") from exc
        if self._resp.status != 200:
            body = self._resp.read().decode(errors="replace").strip()
            self._conn.close()
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
            if self._conn.sock:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()
