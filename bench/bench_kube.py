"""Benchmark: boot with the Kubernetes state store, this containerboot against upstream's Go containerboot,
on the same lab (headscale + tailscaled in namespaces, a real kube-apiserver + etcd), alternating runs.

Each run is a proxy Pod as the operator makes it: TS_KUBE_SECRET, the proxies' service account, tailscaled
with --state=kube:. Ready means what the operator waits for: `device_fqdn` and `device_ips` in the Secret
(written only once the rules are live) and /healthz 200. Also printed: import time and RSS of the
Kubernetes client (containerboot.kube.client) beside the bare interpreter.
Run as root: `make bench`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_boot import peak_rss_mib  # noqa: E402
from tests.lab.fakes import Run  # noqa: E402
from tests.lab.kubeapi import KubeAPI  # noqa: E402
from tests.lab.kubeapi import have_binaries as have_kube  # noqa: E402
from tests.lab.kubepod import KubePod  # noqa: E402
from tests.lab.netns import IP  # noqa: E402
from tests.lab.tailnet import Tailnet, have_binaries  # noqa: E402

HEALTHY = ("import sys, urllib.request\n"
           "try:\n    sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9002/healthz', timeout=1).status == 200"
           " else 1)\nexcept Exception:\n    sys.exit(1)\n")

# VmHWM, not ru_maxrss: the latter counts the forking parent's pages too.
IMPORT = ("import time\nt = time.perf_counter()\n{stmt}\ndt = time.perf_counter() - t\n"
          "hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM'))\n"
          "print(dt * 1000, int(hwm.split()[1]) / 1024)")


def one_run(net: Tailnet, api: KubeAPI, impl: str, n: int) -> dict[str, float]:
    ns, _ = net.site(f"k{n}", f"198.18.0.{n}", n)
    pod = KubePod(net, api, api.create_namespace("bench"), ns, f"k{n}-0")
    backend = f"198.18.{n}.2"
    env = net.containerboot_env(f"k{n}", TS_USERSPACE="false", TS_DEST_IP=backend, TS_ENABLE_HEALTH_CHECK="true",
                                TS_LOCAL_ADDR_PORT="127.0.0.1:9002", TS_LOG_FORMAT="json" if impl == "ours" else "text",
                                **pod.env)
    exe = net.bins["containerboot-upstream"] if impl == "upstream" else str(ROOT / ".venv/bin/containerboot")
    start = time.monotonic()
    run = Run(env, argv=net.private_run(ns, [exe], pod.setup))
    try:
        deadline = start + 120
        while time.monotonic() < deadline:
            data = pod.secret()
            if "device_fqdn" in data and "device_ips" in data and subprocess.run(
                    [IP, "netns", "exec", ns, sys.executable, "-c", HEALTHY]).returncode == 0:
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("not ready within 120 s")
        ready = time.monotonic() - start
        rss = peak_rss_mib(run.proc.pid)
    except Exception:
        print(f"{impl} run failed; its output:\n" + run.output[-3000:], file=sys.stderr)
        raise
    finally:
        run.stop()
        pod.close()
    if "-v" in sys.argv:
        began = f"{time.time() - (time.monotonic() - start):.3f}"
        print(f"--- {impl} (started {began})\n" + run.output, file=sys.stderr)
    return {"ready": ready, "rss": rss}


def import_cost(stmt: str, runs: int = 5) -> tuple[float, float]:
    """Median import time (ms) and peak RSS (MiB) of `stmt` in a fresh interpreter."""
    samples = []
    for _ in range(runs):
        out = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", IMPORT.format(stmt=stmt)], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout.split()
        samples.append((float(out[0]), float(out[1])))
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-v", action="store_true", help="print each run's output")
    args = parser.parse_args()
    if not have_binaries() or not have_kube():
        sys.exit("tailscale, headscale, etcd or kube-apiserver binaries are missing: run scripts/build-go.sh")
    net = Tailnet()
    results: dict[str, list[dict[str, float]]] = {"upstream": [], "ours": []}
    try:
        with KubeAPI() as api:
            net.start_control()
            n = 40
            for _ in range(args.runs):
                for impl in ("upstream", "ours"):
                    results[impl].append(one_run(net, api, impl, n))
                    n += 1
    finally:
        net.close()

    def med(impl: str, key: str) -> float:
        return statistics.median(r[key] for r in results[impl])

    print(f"proxy boot with the Kubernetes state Secret (real kube-apiserver, tailscaled --state=kube:), median of "
          f"{args.runs} runs each, alternating")
    print(f"{'':34} {'upstream (Go)':>14} {'ours (Python)':>14} {'ratio':>7}")
    for key, label, unit in (("ready", "start -> device_fqdn + health 200", "s"),
                             ("rss", "peak RSS, containerboot", "MiB")):
        up, us = med("upstream", key), med("ours", key)
        print(f"{label:34} {up:>12.2f}{unit:>2} {us:>12.2f}{unit:>2} {us / up:>7.2f}")
    ratio = med("ours", "ready") / med("upstream", "ready")
    print(f"target {'met' if ratio <= 1.0 else 'MISSED'}: readiness ratio ours/upstream <= 1.0 ({ratio:.2f})")
    base_ms, base_rss = import_cost("pass")
    kube_ms, kube_rss = import_cost("import containerboot.kube.client")
    print(f"Kubernetes client import (containerboot.kube.client, with settings and ssl): {kube_ms - base_ms:.0f} ms, "
          f"+{kube_rss - base_rss:.1f} MiB peak RSS over a bare interpreter ({base_rss:.1f} MiB)")


if __name__ == "__main__":
    main()
