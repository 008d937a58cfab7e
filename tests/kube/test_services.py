"""ProxyGroup egress and ingress services against a real kube-apiserver: the status each replica writes
into its state Secret (`egress-services`, `ingress-config.json`), compared with what upstream's Go
containerboot writes for the same config and netmap, and followed through config changes; the pre-stop
drain hook. containerboot runs with the fake tailscaled/LocalAPI and fake netfilter (the rules themselves
are checked in the kernel by tests/e2e/test_services.py and at plan level by tests/unit/test_egress.py)."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.fakes import SECRET, Root, Run, kubelet_publish, netmap, peer, temp_root
from tests.lab.kubeapi import PROXIES_ROLE_RULES, KubeAPI
from tests.lab.kubepod import Pod, make_pod, upstream
from tests.lab.ports import free_port
from tests.lab.wait import wait_for

pytestmark = pytest.mark.kube

POD_V4 = "10.1.0.5"

EGRESS: dict[str, Any] = {
    "by-ip": {"tailnetTarget": {"ip": "100.64.0.9", "fqdn": ""},
              "ports": [{"protocol": "tcp", "matchPort": 8080, "targetPort": 80},
                        {"protocol": "udp", "matchPort": 5353, "targetPort": 53}]},
    "by-name": {"tailnetTarget": {"ip": "", "fqdn": "web.test.ts.net"},
                "ports": [{"protocol": "tcp", "matchPort": 8443, "targetPort": 443}],
                "healthCheckEndpoint": "http://127.0.0.1:1/healthz"},
    "tailscale-service": {"tailnetTarget": {"ip": "", "fqdn": "svc-db.test.ts.net"},
                          "ports": [{"protocol": "tcp", "matchPort": 5432, "targetPort": 5432}]},
    "not-there": {"tailnetTarget": {"ip": "", "fqdn": "gone.test.ts.net"},
                  "ports": [{"protocol": "tcp", "matchPort": 9000, "targetPort": 9000}]},
}
INGRESS: dict[str, Any] = {
    "svc:web": {"IPv4Mapping": {"TailscaleServiceIP": "100.100.0.1", "ClusterIP": "10.96.0.10"},
                "IPv6Mapping": {"TailscaleServiceIP": "fd7a:115c:a1e0::a", "ClusterIP": "fd00::10"}},
}


def tailnet(web: str = "100.64.0.7") -> dict[str, Any]:
    """A netmap with a peer named web, and a Tailscale Service (a DNS extra record whose address a peer
    carries as an AllowedIP), as tailscaled's InitialStatus shows them."""
    n = netmap(["100.64.0.1", "fd7a:115c:a1e0::1"], peers=[peer(7, "web.test.ts.net.", web, "fd7a:115c:a1e0::7"),
                                                          peer(8, "host.test.ts.net.", "100.64.0.8")])
    st = n["InitialStatus"]
    for p in st["Peer"].values():
        p["AllowedIPs"] = [f"{a}/32" if "." in a else f"{a}/128" for a in p["TailscaleIPs"]]
        if p["NodeID"] == 8:
            p["AllowedIPs"].append("100.100.2.2/32")
    st["ExtraRecords"] = [{"Name": "svc-db.test.ts.net.", "Value": "100.100.2.2"}]
    return n


def publish(directory: Path, files: dict[str, str], generation: int) -> None:
    directory.mkdir(exist_ok=True)
    kubelet_publish(directory, files, generation)


def service_env(root: Root, egress: dict[str, Any] | None, ingress: dict[str, Any] | None) -> dict[str, str]:
    env = {"TS_USERSPACE": "false", "TS_AUTHKEY": SECRET, "POD_IPS": POD_V4,
           "TS_LOCAL_ADDR_PORT": f"127.0.0.1:{free_port()}"}
    if egress is not None:
        publish(root.d / "egress", {"egress-services": json.dumps(egress), "hep-pings": "2"}, 1)
        env["TS_EGRESS_PROXIES_CONFIG_PATH"] = str(root.d / "egress")
    if ingress is not None:
        publish(root.d / "ingress", {"ingress-config.json": json.dumps(ingress)}, 1)
        env["TS_INGRESS_PROXIES_CONFIG_PATH"] = str(root.d / "ingress" / "ingress-config.json")
    return env


def normalized(raw: str | None) -> Any:
    """A status with its port lists sorted (upstream writes a Go map's keys: in random order)."""
    doc = json.loads(raw) if raw else None
    for svc in ((doc or {}).get("services") or {}).values():
        svc["ports"] = sorted(svc["ports"], key=lambda p: (p["protocol"], p["matchPort"], p["targetPort"]))
    return doc


def wait_status(pod: Pod, name: str, key: str, check: Callable[[Any], bool], timeout: float = 15) -> Any:
    def got() -> Any:
        doc = normalized((pod.secret(name) or {}).get(key))
        return doc if doc is not None and check(doc) else None
    doc = wait_for(got, timeout, 0.1)
    assert doc is not None, f"{key} never satisfied the check: {(pod.secret(name) or {}).get(key)}"
    return doc


def services(doc: Any) -> dict[str, Any]:
    return dict(doc.get("services") or {})


def test_status_matches_upstreams_and_follows_changes(kubeapi: KubeAPI) -> None:
    results: dict[str, list[Any]] = {}
    for who in ("upstream", "ours"):
        with temp_root() as r:
            name = f"ts-{who}"
            p = make_pod(kubeapi, kubeapi.create_namespace(), r, PROXIES_ROLE_RULES, secret={}, name=name)
            p.env["TS_KUBE_SECRET"] = name
            r.api.notify(tailnet())
            env = service_env(r, EGRESS, INGRESS)
            run = Run(r.env(**p.env, **env), argv=[upstream()] if who == "upstream" else None)
            try:
                first = wait_status(p, name, "egress-services", lambda d: set(services(d)) == set(EGRESS))
                ingress1 = wait_status(p, name, "ingress-config.json", lambda d: "configs" in d)
                # A config change: one service leaves, one changes its ports, one arrives; the ingress
                # service loses its IPv6 mapping.
                egress2 = {k: v for k, v in EGRESS.items() if k != "not-there"}
                egress2["by-ip"] = {**EGRESS["by-ip"], "ports": [{"protocol": "tcp", "matchPort": 8081,
                                                                  "targetPort": 81}]}
                egress2["new"] = {"tailnetTarget": {"ip": "fd7a:115c:a1e0::99", "fqdn": ""},
                                  "ports": [{"protocol": "tcp", "matchPort": 7000, "targetPort": 7}]}
                publish(r.d / "egress", {"egress-services": json.dumps(egress2), "hep-pings": "2"}, 2)
                want = set(egress2)
                second = wait_status(p, name, "egress-services", lambda d, want=want: set(services(d)) == want)
                ingress2 = {"svc:web": {"IPv4Mapping": INGRESS["svc:web"]["IPv4Mapping"]}}
                publish(r.d / "ingress", {"ingress-config.json": json.dumps(ingress2)}, 2)
                ingress_second = wait_status(p, name, "ingress-config.json",
                                             lambda d: "IPv6Mapping" not in d["configs"]["svc:web"])
                # Byte for byte where upstream's output is deterministic (encoding/json sorts map keys; only
                # a service's port list comes from an unordered Go map).
                raw_ingress = (p.secret(name) or {})["ingress-config.json"]
                results[who] = [first, ingress1, second, ingress_second, raw_ingress]
            finally:
                code = run.stop()
                assert SECRET not in run.output
            assert code == 0, run.output
    assert results["ours"] == results["upstream"], json.dumps(results, indent=1)
    first = results["ours"][0]
    assert first["podIPv4"] == POD_V4 and "podIPv6" not in first
    assert services(first)["by-name"]["tailnetTargetIPs"] == ["100.64.0.7", "fd7a:115c:a1e0::7"]
    assert services(first)["tailscale-service"]["tailnetTargetIPs"] == ["100.100.2.2"]
    assert services(first)["not-there"]["tailnetTargetIPs"] is None


def test_target_move_and_bad_update(pod: Pod, start: Callable[..., Run]) -> None:
    pod.root.api.notify(tailnet())
    run = start(pod, **service_env(pod.root, EGRESS, None))
    wait_status(pod, "ts-proxy-0", "egress-services",
                lambda d: services(d).get("by-name", {}).get("tailnetTargetIPs") == ["100.64.0.7",
                                                                                      "fd7a:115c:a1e0::7"])
    # The peer behind the name gets a new address: followed without a config change.
    pod.root.api.notify(tailnet(web="100.64.0.77"))
    wait_status(pod, "ts-proxy-0", "egress-services",
                lambda d: services(d)["by-name"]["tailnetTargetIPs"] == ["100.64.0.77", "fd7a:115c:a1e0::7"])
    # A bad update: one line naming the setting and the problem; the last good config stays in force.
    bad = dict(EGRESS, broken={"tailnetTarget": {"ip": "300.1.1.1"}, "ports": []})
    publish(pod.root.d / "egress", {"egress-services": json.dumps(bad)}, 2)
    line = run.wait_contains("TS_EGRESS_PROXIES_CONFIG_PATH", timeout=10)
    assert '"broken"' in line and "300.1.1.1" in line and "keeping the 4 egress services in force" in line, line
    time.sleep(0.5)
    assert run.proc.poll() is None
    assert set(services(normalized(pod.secret()["egress-services"]))) == set(EGRESS)
    # A config above 1 MiB (here padded with whitespace) is read whole, as `containerboot plan` reads it;
    # one above 16 MiB is said to be too large, in one line, and the services stay.
    grown = dict(EGRESS, grown={"tailnetTarget": {"ip": "100.64.0.8"},
                                "ports": [{"protocol": "tcp", "matchPort": 9000, "targetPort": 90}]})
    publish(pod.root.d / "egress", {"egress-services": json.dumps(grown) + " " * (3 << 19)}, 3)
    wait_status(pod, "ts-proxy-0", "egress-services", lambda d: "grown" in services(d))
    publish(pod.root.d / "egress", {"egress-services": json.dumps(EGRESS) + " " * (17 << 20)}, 4)
    line = run.wait_contains("larger than 16 MiB", timeout=10)
    assert "TS_EGRESS_PROXIES_CONFIG_PATH" in line and "keeping the 5 egress services in force" in line, line
    time.sleep(1)
    assert run.output.count("larger than 16 MiB") == 1  # not again at each re-read (every 10 s or on a change)
    # Every service leaves: upstream's empty status ("services": null) for this Pod.
    publish(pod.root.d / "egress", {"egress-services": "{}"}, 5)
    wait_status(pod, "ts-proxy-0", "egress-services", lambda d: d.get("services") is None)


class HEP:
    """A cluster Service's health check endpoint as seen from the replica: answers with our Pod IP header
    while kube-proxy still routes to us, without it once we are out of the endpoints."""

    def __init__(self) -> None:
        self.ours = True
        self.hits = 0
        hep = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                hep.hits += 1
                self.send_response(200)
                self.send_header("Pod-IPv4", POD_V4 if hep.ours else "10.1.0.6")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/healthz"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hep() -> Iterator[HEP]:
    h = HEP()
    yield h
    h.close()


def prestop_started(pod: Pod, start: Callable[..., Run], hep: HEP) -> tuple[Run, str, dict[str, Any]]:
    cfg = {"web": {**EGRESS["by-ip"], "healthCheckEndpoint": hep.url}}
    pod.root.api.notify(tailnet())
    env = service_env(pod.root, cfg, None)
    run = start(pod, TS_ENABLE_HEALTH_CHECK="true", TS_TEST_ONLY_EGRESS_SLEEP="0.2", **env)
    wait_status(pod, "ts-proxy-0", "egress-services", lambda d: "web" in services(d))
    url = f"http://{env['TS_LOCAL_ADDR_PORT']}/internal-egress-services-preshutdown"
    answer: dict[str, Any] = {}

    def ask() -> None:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                answer.update(status=resp.status, body=resp.read())
        except OSError as exc:
            answer.update(error=exc)
        answer["seconds"] = time.monotonic() - t0

    threading.Thread(target=ask, daemon=True).start()
    return run, url, answer


def test_prestop_blocks_while_traffic_arrives(pod: Pod, start: Callable[..., Run], hep: HEP) -> None:
    run, _, answer = prestop_started(pod, start, hep)
    run.wait_contains("is still routed through this Pod, waiting", timeout=10)
    time.sleep(1.5)
    assert not answer, "answered while the health check endpoint still reached this Pod"
    hits = hep.hits
    assert hits >= 4, hits  # hep-pings (2) every 0.2 s
    hep.ours = False  # the operator took us out of the Service's endpoints
    assert wait_for(lambda: answer, 10), "no answer after traffic stopped"
    assert answer.get("status") == 200, answer
    run.wait_contains("is no longer routed through this Pod")
    # After the drain, the long wait (10 x the short one) for the other nodes' kube-proxies.
    assert answer["seconds"] >= 2.0 + 1.5
    # The health endpoint carries upstream's header for the HEP.
    with urllib.request.urlopen(f"http://{run_env_addr(run)}/healthz", timeout=5) as resp:
        assert resp.headers["Pod-IPv4"] == POD_V4


def run_env_addr(run: Run) -> str:
    line = run.wait_contains("Running egress preshutdown hook at ")
    return line.split(" at ", 1)[1].split("/", 1)[0]


def test_sigterm_during_prestop(pod: Pod, start: Callable[..., Run], hep: HEP) -> None:
    run, _, answer = prestop_started(pod, start, hep)
    run.wait_contains("is still routed through this Pod, waiting", timeout=10)
    t0 = time.monotonic()
    run.proc.terminate()
    code = run.wait_exit(15)
    took = time.monotonic() - t0
    assert code == 0, run.output
    assert took < 8, f"SIGTERM during the pre-stop drain took {took:.1f}s"
    assert "Received SIGTERM, shutting down" in run.output


def test_prestop_without_config_is_safe_at_once(pod: Pod, start: Callable[..., Run]) -> None:
    pod.root.api.notify(tailnet())
    env = service_env(pod.root, None, None)
    (pod.root.d / "egress").mkdir()
    env["TS_EGRESS_PROXIES_CONFIG_PATH"] = str(pod.root.d / "egress")
    run = start(pod, **env)
    run.wait_log("Startup complete, waiting for shutdown signal", timeout=10)
    url = f"http://{env['TS_LOCAL_ADDR_PORT']}/internal-egress-services-preshutdown"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert (resp.status, resp.read()) == (200, b"safe to terminate")
    assert "egress-services" not in (pod.secret() or {}), "no service was ever configured: nothing to write"
