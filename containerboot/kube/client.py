"""Kubernetes: a small API client, standard library only.

Keys and timing follow upstream's `kube/kubeclient`: the projected service account token re-read every
30 minutes and after a 401, every call bounded, transient failures retried. The state Secret the proxy
writes through it, and the decisions about what to write, are in secret.py.

Why not a client library: measured on this project's machine (Python 3.11, same venv), importing
`lightkube` costs 23 MiB of RSS and ~0.5 s, the official `kubernetes` client 35 MiB and ~1 s, while
`ssl` + `http.client` cost 11 MiB and ~0.15 s, and the proxy needs a handful of calls. (http.client itself is
not used either: containerboot/tailscale/http1.py over an ssl socket spares its email package.)
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from containerboot.settings import Settings
from containerboot.tailscale import http1

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_SERVER = "kubernetes.default.svc"
FIELD_MANAGER = "tailscale-container"
TOKEN_REREAD_SECONDS = 30 * 60  # upstream re-reads the projected token every 30 minutes, and after a 401
REQUEST_TIMEOUT = 5.0  # each connect, send and read; a hung API server costs at most this per attempt
ATTEMPTS = 3  # transient failures (connection errors, 429, 5xx) are retried this often in all
MAX_BODY = 4 << 20  # a Secret is at most 1 MiB; anything far larger is not an answer we want


class KubeError(RuntimeError):
    """An API call that failed: `code` is the HTTP status (0: no answer), the text one line."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(" ".join(message.split()))
        self.code = code

    @property
    def not_found(self) -> bool:
        return self.code == 404



def decode_data(name: str, data: Any) -> dict[str, bytes]:
    """A Secret's `data` (base64 values) as bytes; a value that is not base64 is an error naming the key."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KubeError(f"Secret {json.dumps(name)}: data is not an object")
    out: dict[str, bytes] = {}
    for key, value in data.items():
        try:
            out[str(key)] = base64.b64decode(value if isinstance(value, str) else "", validate=True)
        except (binascii.Error, ValueError):
            shown = json.dumps(str(key))[:80]
            raise KubeError(f"Secret {json.dumps(name)}: data key {shown} is not valid base64") from None
    return out


def server_address(s: Settings, env: Mapping[str, str]) -> tuple[str, int]:
    """Where the API server is: the in-cluster name, or, like upstream under a test root or with
    TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV=true, KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT_HTTPS."""
    if s.root == "/" and not s.kube_api_from_env:
        return DEFAULT_SERVER, 443
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port_text = env.get("KUBERNETES_SERVICE_PORT_HTTPS") or env.get("KUBERNETES_SERVICE_PORT") or "443"
    try:
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise KubeError(f"KUBERNETES_SERVICE_PORT_HTTPS={json.dumps(port_text[:40])} is not a port number") from None
    return host, port


# ---- the client -------------------------------------------------------------------------------------


def _segment(text: str) -> str:
    """A path segment, percent-encoded as urllib.parse.quote(text, safe="") would (names are DNS labels,
    so this rarely does anything; urllib.parse costs 0.6 MiB on the boot path)."""
    return "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "-._~") else f"%{b:02X}"
                   for b in text.encode())


class Client:
    """Bearer-token HTTPS to the API server, one kept-alive connection, every call bounded in time."""

    def __init__(self, sa_dir: str, host: str, port: int, stop: Callable[[], bool] = lambda: False,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.sa_dir = sa_dir
        self.host, self.port = host, port
        self.stop = stop
        self.timeout = timeout
        self.namespace = self._read("namespace").decode().strip()
        import ssl  # only a Pod with a state Secret pays for TLS (about 4 MiB)

        try:
            self.tls = ssl.create_default_context(cadata=self._read("ca.crt").decode(errors="replace"))
        except ssl.SSLError as exc:
            raise KubeError(f"error creating kube client: {os.path.join(sa_dir, 'ca.crt')} holds no usable CA "
                            f"certificate: {exc.reason or exc}") from None
        self._token = ""
        self._token_read = 0.0
        self.deadline: float | None = None  # while set (the boot deadline), no call runs past it
        self._conn: socket.socket | None = None  # the kept-alive TLS connection
        self._lock = threading.Lock()  # the serve watcher and the main loop may share the client

    def _read(self, name: str) -> bytes:
        path = os.path.join(self.sa_dir, name)
        try:
            with open(path, "rb") as f:
                return f.read(1 << 20)
        except OSError as exc:
            raise KubeError(f"error creating kube client: reading {path}: {exc.strerror}") from None

    def token(self, force: bool = False) -> str:
        if force or not self._token or time.monotonic() - self._token_read > TOKEN_REREAD_SECONDS:
            path = os.path.join(self.sa_dir, "token")
            try:
                with open(path, "rb") as f:
                    self._token = f.read(64 << 10).decode(errors="replace").strip()
            except OSError as exc:
                raise KubeError(f"reading the service account token {path}: {exc.strerror}") from None
            self._token_read = time.monotonic()
        return self._token

    @property
    def _host_header(self) -> str:
        try:
            v6 = ipaddress.ip_address(self.host).version == 6
        except ValueError:
            v6 = False
        return f"[{self.host}]:{self.port}" if v6 else f"{self.host}:{self.port}"

    def _connection(self, timeout: float) -> socket.socket:
        if self._conn is None:
            raw = socket.create_connection((self.host, self.port), timeout=timeout)
            # A request larger than one TLS record (16 KiB: the status of 100 egress services) is two
            # writes; with Nagle the second may wait for the server's delayed ACK (up to 40 ms). Go's
            # clients set TCP_NODELAY as well.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                # server_hostname may be an address: TLS then checks the certificate's IP SAN.
                self._conn = self.tls.wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _once(self, method: str, path: str, body: bytes | None, content_type: str,
              token: str, timeout: float) -> tuple[int, str, bytes]:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json",
                   "User-Agent": "containerboot"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            conn = self._connection(timeout)
            conn.settimeout(timeout)
            resp = http1.request(conn, method, path, self._host_header, headers, body, keep_alive=True)
            data = resp.read(MAX_BODY)
            resp.close()
        except BaseException:  # a timeout, a reset, or a signal raised into us: the connection is unusable
            self._drop()
            raise
        if resp.will_close:
            self._drop()
        return resp.status, resp.reason, data

    def request(self, method: str, path: str, payload: Any = None,
                content_type: str = "application/json", deadline: float | None = None) -> Any:
        """One API call: the decoded JSON answer, or KubeError with the Status message on one line.
        Each attempt is bounded by the client's timeout and, if given, by `deadline` (time.monotonic)."""
        body = None if payload is None else json.dumps(payload).encode()
        last = ""
        retried_401 = False
        attempt = 0
        with self._lock:
            if deadline is None:
                deadline = self.deadline
            while attempt < ATTEMPTS:
                if attempt and self.stop():
                    raise KubeError(f"{method} {path}: interrupted by a shutdown signal")
                timeout = self.timeout
                if deadline is not None:
                    timeout = min(timeout, deadline - time.monotonic())
                    if timeout <= 0:
                        raise KubeError(f"{method} {path}: {last + '; ' if last else ''}out of time (the boot or "
                                        "shutdown deadline passed)")
                attempt += 1
                try:
                    status, reason, data = self._once(method, path, body, content_type, self.token(), timeout)
                except OSError as exc:  # http1.HTTPError and ssl.SSLError are OSErrors too
                    last = (f"no answer from https://{self.host}:{self.port} within {timeout:g}s"
                            if isinstance(exc, (TimeoutError, socket.timeout)) else f"{type(exc).__name__}: {exc}")
                    self._pause(attempt)
                    continue
                if 200 <= status < 300:
                    try:
                        return json.loads(data) if data.strip() else None
                    except ValueError:
                        raise KubeError(f"{method} {path}: the answer is not JSON") from None
                message = _status_message(status, reason, data)
                if status == 401 and not retried_401:
                    # The kubelet rotates projected tokens; read the file again before giving up.
                    retried_401 = True
                    attempt -= 1
                    self.token(force=True)
                    continue
                if status == 429 or status >= 500:
                    last = f"{status} {message}"
                    self._pause(attempt)
                    continue
                raise KubeError(message, status)
        raise KubeError(f"{method} {path}: {last} (gave up after {ATTEMPTS} attempts)",
                        int(last.split()[0]) if last[:3].isdigit() else 0)

    def _pause(self, attempt: int) -> None:
        if attempt >= ATTEMPTS:
            return
        end = time.monotonic() + 0.5 * attempt
        while time.monotonic() < end and not self.stop():
            time.sleep(0.05)

    # ---- calls the proxy makes ---------------------------------------------------------------------

    def _secret_path(self, name: str) -> str:
        return f"/api/v1/namespaces/{_segment(self.namespace)}/secrets/{_segment(name)}"

    def allowed(self, verb: str, resource: str, name: str = "", namespace: str = "",
                deadline: float | None = None) -> bool:
        """A SelfSubjectAccessReview: may this service account `verb` the core `resource` (named, or any)
        in `namespace` (default: the service account's own)?"""
        attrs = {"namespace": namespace or self.namespace, "verb": verb, "resource": resource}
        if name:
            attrs["name"] = name
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attrs}}
        answer = self.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review,
                              deadline=deadline)
        return bool(isinstance(answer, dict) and (answer.get("status") or {}).get("allowed"))

    def get_secret(self, name: str, deadline: float | None = None) -> dict[str, bytes]:
        answer = self.request("GET", self._secret_path(name), deadline=deadline)
        return decode_data(name, answer.get("data") if isinstance(answer, dict) else None)

    def patch_secret(self, name: str, data: Mapping[str, bytes | None]) -> None:
        """Strategic merge patch of `data` (None deletes a key), as field manager tailscale-container."""
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": self.namespace},
                "data": {k: None if v is None else base64.b64encode(v).decode() for k, v in data.items()}}
        self.request("PATCH", f"{self._secret_path(name)}?fieldManager={FIELD_MANAGER}", body,
                     "application/strategic-merge-patch+json")

    def json_patch_secret(self, name: str, ops: list[dict[str, Any]]) -> None:
        self.request("PATCH", self._secret_path(name), ops, "application/json-patch+json")

    # Core v1 Events (podevents.py writes them): read one, create one, JSON-patch one.

    def _events_path(self, namespace: str, name: str = "") -> str:
        path = f"/api/v1/namespaces/{_segment(namespace)}/events"
        return f"{path}/{_segment(name)}" if name else path

    def get_event(self, namespace: str, name: str, deadline: float | None = None) -> dict[str, Any]:
        """The Event as the server has it; KubeError (code 404) when there is none."""
        answer = self.request("GET", self._events_path(namespace, name), deadline=deadline)
        if not isinstance(answer, dict):
            raise KubeError(f"Event {json.dumps(name)}: the answer is not an object")
        return answer

    def create_event(self, namespace: str, event: Mapping[str, Any], deadline: float | None = None) -> None:
        self.request("POST", self._events_path(namespace), event, deadline=deadline)

    def patch_event(self, namespace: str, name: str, ops: list[dict[str, Any]],
                    deadline: float | None = None) -> None:
        self.request("PATCH", self._events_path(namespace, name), ops, "application/json-patch+json",
                     deadline=deadline)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def interrupt(self) -> None:
        """Cut a call in flight on another thread short, without waiting for the lock it holds: the
        kept-alive connection is shut down under it, so its read fails at once (a retry is then refused
        when `stop` says so). Shuts the TCP socket itself down: ssl's shutdown() would also clear the
        TLS object that the other thread is reading through."""
        conn = self._conn
        if conn is not None:
            try:
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed or never connected: nothing is in flight on it

    def sibling(self) -> Client:
        """The same credentials and server on a connection of its own, for calls made at the same time."""
        other = copy.copy(self)
        other._conn = None
        other._lock = threading.Lock()
        return other


def _status_message(status: int, reason: str, data: bytes) -> str:
    """A k8s Status object's message; anything else as the HTTP status and the start of the body."""
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("message"), str) and doc["message"]:
        return str(doc["message"])
    text = data[:200].decode(errors="replace").strip()
    return f"{status} {reason}" + (f": {text}" if text else "")
