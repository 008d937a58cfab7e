"""Benchmark: egress-services sync of 100 and 1,000 services, this containerboot against upstream's Go
containerboot, in the same lab, alternating runs.

Each run is a ProxyGroup egress replica in a fresh network namespace with real kernel rules (nftables or
iptables-legacy, both implementations forced to the same backend), the fake tailscaled/LocalAPI of the
tests (a Running node with 100.64.0.1 and fd7a:115c:a1e0::1) and a real kube-apiserver reached through a
socat relay, as a Pod would reach it. The replica starts with an empty `egress-services` file; once it
reports `Startup complete`, kubelet's ..data swap publishes N services (each its own tailnet IP target,
a TCP and a UDP port). The time measured runs from that swap until the state Secret's `egress-services`
status lists all N services: both implementations write it only after their rules are in. The rule count
in the namespace is checked afterwards.

Run as root: `.venv/bin/python bench/bench_egress.py [--runs 3] [--sizes 100,1000] [--backend nftables]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.fakes import Root, Run, kubelet_publish, netmap  # noqa: E402
from tests.lab.kubeapi import PROXIES_ROLE_RULES, KubeAPI  # noqa: E402
from tests.lab.kubeapi import have_binaries as have_kube  # noqa: E402
from tests.lab.netns import IP, Lab  # noqa: E402
from tests.lab.tailnet import binaries  # noqa: E402

TIMEOUT = 600.0  # one sync; upstream's iptables path at 1,000 services is the slow one


def config(n: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for i in range(n):
        target = f"100.65.{i // 250}.{i % 250 + 1}"
        out[f"svc-{i:04}"] = {"tailnetTarget": {"ip": target, "fqdn": ""},
                              "ports": [{"protocol": "tcp", "matchPort": 10000 + i, "targetPort": 80},
                                        {"protocol": "udp", "matchPort": 10000 + i, "targetPort": 53}]}
    return out


def legacy_shim(d: Path) -> Path:
    """A PATH directory where `iptables` is iptables-legacy, so upstream writes the tables ours writes."""
    shim = d / "legacy"
    shim.mkdir()
    for name in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            (shim / f"{name}{suffix}").symlink_to(f"/usr/sbin/{name}-legacy{suffix}")
    return shim


def count_rules(ns: str, backend: str) -> int:
    if backend == "nftables":
        out = subprocess.run([IP, "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True, text=True).stdout
        return sum(1 for ln in out.splitlines() if "dnat" in ln or " : " in ln)
    out = subprocess.run([IP, "netns", "exec", ns, "iptables-legacy-save", "-t", "nat"], capture_output=True,
                         text=True).stdout
    return sum(1 for ln in out.splitlines() if "DNAT" in ln)


def one_run(api: KubeAPI, impl: str, n: int, backend: str) -> float:
    lab = Lab("eg")
    d = Path(tempfile.mkdtemp(prefix="cbe", dir="/tmp"))
    root = Root(d)
    relays: list[subprocess.Popen[bytes]] = []
    run: Run | None = None
    try:
        ns = lab.ns("pod")
        kns = api.create_namespace("bench")
        api.create_service_account(kns, "proxies")
        api.create_role(kns, "proxies", PROXIES_ROLE_RULES)
        api.bind_role(kns, "proxies", "proxies", "proxies")
        api.create_secret(kns, "pg-0", {})
        env = api.pod_files(d, kns, api.token(kns, "proxies"))
        port = env["KUBERNETES_SERVICE_PORT_HTTPS"]
        sock = d / "api.sock"
        relays.append(subprocess.Popen(["socat", f"UNIX-LISTEN:{sock},fork,mode=600", f"TCP:127.0.0.1:{port}"]))
        while not sock.exists():
            time.sleep(0.01)
        relays.append(subprocess.Popen([IP, "netns", "exec", ns, "socat",
                                        f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{sock}"]))
        deadline = time.monotonic() + 10
        while f"127.0.0.1:{port} " not in subprocess.run([IP, "netns", "exec", ns, "ss", "-Hltn"], capture_output=True,
                                                         text=True).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("the API relay in the namespace did not listen")
            time.sleep(0.02)
        for name in ("iptables", "ip6tables", "nft"):  # the real ones, not the tests' recorders
            (d / "usr/bin" / name).unlink()
        path = f"{d}/usr/bin:{os.environ['PATH']}"
        if backend == "iptables":
            path = f"{legacy_shim(d)}:{path}"
        cfg = d / "egress"
        cfg.mkdir()
        kubelet_publish(cfg, {"egress-services": ""}, 1)
        root.api.notify(netmap(["100.64.0.1", "fd7a:115c:a1e0::1"]))
        full = root.env(**env, TS_KUBE_SECRET="pg-0", POD_UID="uid-1", POD_NAME="pg-0", POD_IPS="10.1.0.5",
                        TS_USERSPACE="false", TS_AUTHKEY="tskey-auth-bench", TS_TEST_FAKE_NETFILTER="false",
                        TS_DEBUG_FIREWALL_MODE=backend, TS_EGRESS_PROXIES_CONFIG_PATH=str(cfg),
                        TS_LOCAL_ADDR_PORT="127.0.0.1:9002", PATH=path)
        exe = binaries()["containerboot-upstream"] if impl == "upstream" else str(ROOT / ".venv/bin/containerboot")
        run = Run(full, argv=[IP, "netns", "exec", ns, exe])
        run.wait_log("Startup complete, waiting for shutdown signal", timeout=60)
        time.sleep(0.5)  # both have started their egress proxies (upstream: a goroutine after that line)
        start = time.monotonic()
        kubelet_publish(cfg, {"egress-services": json.dumps(config(n))}, 2)
        while True:
            raw = (api.get_secret(kns, "pg-0") or {}).get("egress-services")
            if raw and len(json.loads(raw).get("services") or {}) == n:
                took = time.monotonic() - start
                break
            if time.monotonic() - start > TIMEOUT:
                raise RuntimeError(f"{impl}: no status for {n} services within {TIMEOUT:g} s")
            if run.proc.poll() is not None:
                raise RuntimeError(f"{impl} exited {run.proc.returncode}:\n{run.output[-3000:]}")
            time.sleep(0.02)
        rules = count_rules(ns, backend)
        if rules < 2 * n:
            raise RuntimeError(f"{impl}: {rules} DNAT rules/elements for {n} services ({2 * n} mappings)")
        return took
    except Exception:
        if run is not None:
            print(f"{impl} run failed; its output:\n" + run.output[-3000:], file=sys.stderr)
        raise
    finally:
        if run is not None:
            run.stop()
        for proc in relays:
            proc.terminate()
            proc.wait(5)
        root.close()
        lab.close()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--backend", default="nftables", choices=["nftables", "iptables"])
    args = parser.parse_args()
    if os.geteuid() != 0 or not have_kube():
        print("bench_egress: needs root and the Go builds (scripts/build-go.sh)", file=sys.stderr)
        return 1
    with KubeAPI() as api:
        for n in map(int, args.sizes.split(",")):
            times: dict[str, list[float]] = {"ours": [], "upstream": []}
            for _ in range(args.runs):
                for impl in ("ours", "upstream"):
                    times[impl].append(one_run(api, impl, n, args.backend))
            ours, up = statistics.median(times["ours"]), statistics.median(times["upstream"])
            print(f"egress-services sync, {n} services ({2 * n} mappings), {args.backend}, median of {args.runs}: "
                  f"ours {ours * 1000:.0f} ms, upstream {up * 1000:.0f} ms, ours/upstream {ours / up:.3f} "
                  f"(ours {', '.join(f'{t * 1000:.0f}' for t in times['ours'])}; "
                  f"upstream {', '.join(f'{t * 1000:.0f}' for t in times['upstream'])})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
