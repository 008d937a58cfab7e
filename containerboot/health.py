"""The local HTTP endpoints (/healthz, /metrics, /debug/, the egress services' pre-stop hook) and the
`healthcheck` client.

What each endpoint answers, which of them an address serves (`start`), and the node's health state
they report. They run on the bounded server in httpserver.py (its design is described there).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from containerboot import log
from containerboot.httpserver import Handler, Server
from containerboot.metrics import Metrics
from containerboot.settings import Settings, parse_addr_port
from containerboot.tailscale import http1
from containerboot.tailscale.localapi import LocalAPI, LocalAPIError, TailscaledAPI

NO_IPS = b"node currently has no tailscale IPs\n"
PRESHUTDOWN_PATH = "/internal-egress-services-preshutdown"  # kubetypes.EgessServicesPreshutdownEP


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


def _handler(health: Health | None, metrics: TailscaledAPI | None, debug: str,
             preshutdown: Preshutdown | None = None, own: Metrics | None = None) -> Handler:
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
        ours = _own_metrics(own, metrics) if own is not None else b""
        try:
            status, headers, body = metrics.request("GET", "/localapi/v0/usermetrics", timeout=10)
        except LocalAPIError as exc:
            if ours:  # ours say most when tailscaled does not answer: still served, with why theirs are not
                return send(200, ours + f"# tailscaled's metrics unavailable: {exc}\n".encode(), {"Content-Type": TEXT})
            return send(500, f"failed to proxy request: {exc}\n".encode())
        hop = {"content-length", "transfer-encoding", "connection", "date"}
        return send(status, ours + body if status == 200 else body,
                    {k: v for k, v in headers.items() if k.lower() not in hop})

    return handle


TEXT = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format


def _own_metrics(own: Metrics, api: TailscaledAPI) -> bytes:
    """containerboot's families, with the control connection and key expiry as tailscaled says them now."""
    try:
        own.observe_status(api.json("GET", "/localapi/v0/status?peers=false", timeout=5))
    except (LocalAPIError, ValueError):
        own.observe_status(None)
    return own.render()


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


def serve(addr_port: str, health: Health | None, metrics: TailscaledAPI | None, debug: str,
          preshutdown: Preshutdown | None = None, own: Metrics | None = None) -> Server:
    ip, port = parse_addr_port(addr_port)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET

    def slow(path: str) -> bool:  # answers that wait (on tailscaled, on cluster traffic) go to a worker
        if path == PRESHUTDOWN_PATH:
            return preshutdown is not None
        return metrics is not None and (path == "/metrics" or (path.startswith("/debug/") and bool(debug)))

    return Server((str(ip), port), family, _handler(health, metrics, debug, preshutdown, own), slow,
                  name=f"http-{addr_port}", addr_port=addr_port)


def start(s: Settings, health: Health, api: TailscaledAPI, preshutdown: Preshutdown | None = None,
          own: Metrics | None = None) -> list[Server]:
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
                             api if s.enable_metrics else None, s.debug_addr_port, preshutdown, own))
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
