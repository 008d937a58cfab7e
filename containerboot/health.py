"""The local HTTP endpoints (/healthz, /metrics, /debug/) and the `healthcheck` client."""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from containerboot import log
from containerboot.localapi import LocalAPI, LocalAPIError
from containerboot.settings import Settings, parse_addr_port

NO_IPS = b"node currently has no tailscale IPs\n"


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:  # no reverse DNS lookup of the listen address
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()


def _handler(health: Health | None, metrics: LocalAPI | None, debug: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            if "Content-Type" not in (headers or {}):
                self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith("/debug/") and metrics is not None:
                return self._debug()
            known = {"/healthz": health is not None, "/metrics": metrics is not None}
            if not known.get(path):
                return self._send(404, b"404 page not found\n")
            if self.command not in ("GET", "HEAD"):
                return self._send(405, b"Method Not Allowed\n")
            if path == "/healthz" and health is not None:
                if health.healthy:
                    return self._send(200, b"ok", health.headers)
                return self._send(503, NO_IPS)
            assert metrics is not None
            try:
                status, headers, body = metrics.request("GET", "/localapi/v0/usermetrics", timeout=10)
            except LocalAPIError as exc:
                return self._send(500, f"failed to proxy request: {exc}\n".encode())
            headers.pop("Content-Length", None)
            headers.pop("Transfer-Encoding", None)
            self._send(status, body, headers)

        def _debug(self) -> None:
            if not debug:
                return self._send(404, b"debug endpoint not configured\n")
            length = int(self.headers.get("Content-Length") or 0)
            req = urllib.request.Request(f"http://{debug}{self.path}", method=self.command,
                                         data=self.rfile.read(length) if length else None)
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    self._send(resp.status, resp.read(), {"Content-Type": resp.headers.get("Content-Type", "")})
            except OSError as exc:
                self._send(502, f"failed to proxy request: {exc}\n".encode())

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _route  # noqa: N815

    return Handler


def serve(addr_port: str, health: Health | None, metrics: LocalAPI | None, debug: str) -> ThreadingHTTPServer:
    ip, port = parse_addr_port(addr_port)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    server: ThreadingHTTPServer = type("Server", (_Server,), {"address_family": family})(
        (str(ip), port), _handler(health, metrics, debug))
    threading.Thread(target=server.serve_forever, name=f"http-{addr_port}", daemon=True).start()
    return server


def start(s: Settings, health: Health, api: LocalAPI) -> list[ThreadingHTTPServer]:
    """Upstream's servers: the deprecated health-only one, then the local one."""
    servers = []
    if s.healthcheck_addr_port:
        servers.append(serve(s.healthcheck_addr_port, health, None, ""))
        log.info(f"Running healthcheck endpoint at {s.healthcheck_addr_port}/healthz")
    if s.enable_metrics or s.enable_health_check:
        servers.append(serve(s.local_addr_port, health if s.enable_health_check else None,
                             api if s.enable_metrics else None, s.debug_addr_port))
        if s.enable_metrics:
            log.info(f"Running metrics endpoint at {s.local_addr_port}/metrics")
        if s.enable_health_check:
            log.info(f"Running healthcheck endpoint at {s.local_addr_port}/healthz")
    return servers


def health_url(s: Settings) -> str:
    addr = s.healthcheck_addr_port or (s.local_addr_port if s.enable_health_check else "")
    if not addr:
        return ""
    ip, port = parse_addr_port(addr)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(str(ip), str(ip))
    return f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"


def check(s: Settings) -> int:
    """For a Docker HEALTHCHECK: 0 when healthy. Uses /healthz when it is enabled, else asks
    tailscaled directly (Running with a tailnet address), so it works with no endpoint enabled."""
    url = health_url(s)
    if url:
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
