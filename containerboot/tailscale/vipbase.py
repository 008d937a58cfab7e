"""What cert share (vipcerts.py) and advertisement (vipadvertise.py) both use: LocalAPI calls that stop()
can cut off, the Services of a serve config, and durations as their log lines print them.

A module of its own so that the two halves of Tailscale Services import it, not each other or the shell
(vipservices.py).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Mapping
from typing import Any

from containerboot import log
from containerboot.settings import CAPABILITY_VERSION
from containerboot.tailscale import http1
from containerboot.tailscale.localapi import HOST, LocalAPIError


def serve_services(cfg: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A serve config's Services by name ("svc:name"); empty when it has none or they are not a map."""
    services = (cfg or {}).get("Services")
    return services if isinstance(services, dict) else {}


def duration(seconds: float) -> str:
    """Seconds as Go prints a time.Duration (1m0s, 1h40m0s, 24h0m0s; 300ms and 1.5s below a minute)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:.3f}".rstrip("0") + "s"
    return log.go_duration(seconds)


# ---- LocalAPI calls that stop() can end --------------------------------------------------------------


class Calls:
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
