"""Benchmark: a /metrics scrape of an egress ProxyGroup replica holding 1,000 services, this containerboot
(its own families, then tailscaled's) against upstream's Go containerboot (tailscaled's only), in the same
lab as bench_egress.py (real kernel rules, the tests' fake tailscaled/LocalAPI, a real kube-apiserver).

After the 1,000 services are synced, 300 scrapes over one keep-alive-less HTTP/1.1 connection each, from
inside the replica's namespace; prints the median and 90th percentile per implementation and their ratio,
and the size of the exposition. Ours also asks tailscaled for its status (control connection, key expiry)
on each scrape: that round trip is in the figure.

Run as root: `.venv/bin/python bench/bench_metrics.py [--backend nftables]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_egress import ROOT, replica, sync  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.lab.kubeapi import KubeAPI  # noqa: E402
from tests.lab.kubeapi import have_binaries as have_kube  # noqa: E402
from tests.lab.netns import IP  # noqa: E402

SCRAPES = 300
SCRAPER = r"""
import http.client, json, sys, time
times, size = [], 0
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", 9002, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    times.append(time.perf_counter() - start)
    assert resp.status == 200, (resp.status, body[:200])
    size = len(body)
print(json.dumps({"times": times, "size": size, "head": body[:60].decode(errors="replace")}))
"""


def scrape(ns: str) -> dict[str, object]:
    out = subprocess.run([IP, "netns", "exec", ns, sys.executable, "-c", SCRAPER, str(SCRAPES)], check=True,
                         capture_output=True, text=True).stdout
    return dict(json.loads(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="nftables")
    parser.add_argument("--services", type=int, default=1000)
    args = parser.parse_args()
    if not have_kube():
        sys.exit("kube-apiserver and etcd are missing: run scripts/build-go.sh")
    api = KubeAPI()
    results: dict[str, dict[str, object]] = {}
    try:
        for impl in ("upstream", "ours"):
            with replica(api, impl, args.backend, TS_ENABLE_METRICS="true") as r:
                sync(r, args.services, 2, args.backend)
                results[impl] = scrape(r.ns)
    finally:
        api.close()

    def ms(impl: str, q: float) -> float:
        times = sorted(results[impl]["times"])  # type: ignore[arg-type]
        return 1000 * (statistics.median(times) if q == 0.5 else times[int(q * len(times)) - 1])

    print(f"/metrics scrape of a replica with {args.services} egress services ({args.backend}), {SCRAPES} scrapes "
          "each, new connection per scrape")
    print(f"{'':24} {'upstream (Go)':>14} {'ours (Python)':>14} {'ratio':>7}")
    for q, label in ((0.5, "median"), (0.9, "90th percentile")):
        up, us = ms("upstream", q), ms("ours", q)
        print(f"{label:24} {up:>11.2f} ms {us:>11.2f} ms {us / up:>7.2f}")
    print(f"{'exposition size':24} {results['upstream']['size']:>11} B  {results['ours']['size']:>11} B")
    print(f"target {'met' if ms('ours', 0.5) < 5 else 'MISSED'}: ours under 5 ms a scrape "
          f"(median {ms('ours', 0.5):.2f} ms)")


if __name__ == "__main__":
    main()
