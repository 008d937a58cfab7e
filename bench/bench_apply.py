"""Benchmark: driver apply times against the backends' own loaders, side by side in one run.

For N ingress mappings (tailnet address -> backend address) it measures, each in a fresh network
namespace: `apply` through the nftables driver and through the iptables driver, `nft -f` loading
the same ruleset as text, and `iptables-legacy-restore` loading the same rules; then, at the
largest N, the time for an `apply` that changes one mapping. Run as root: `make bench`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from firewall.iptables import CHAINS, PRE, render  # noqa: E402
from firewall.model import Dnat, Plan  # noqa: E402


def mappings(n: int, changed: bool = False) -> Plan:
    base_ts, base_be = int(ipaddress.ip_address("100.64.0.1")), int(ipaddress.ip_address("198.18.0.1"))
    rules = [Dnat(ipaddress.IPv4Address(base_ts + i), (ipaddress.IPv4Address(base_be + i),)) for i in range(n)]
    if changed:
        rules[0] = Dnat(rules[0].match, (ipaddress.IPv4Address(base_be + n + 1),))
    return Plan.of(*rules)


def nft_text(plan: Plan) -> str:
    elems = ", ".join(f"{r.match} : {r.to[0]}" for r in plan.sorted() if isinstance(r, Dnat))
    return ("table ip containerboot {\n"
            f"  map ingress {{ type ipv4_addr : ipv4_addr; elements = {{ {elems} }} }}\n"
            "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
            "    dnat to ip daddr map @ingress\n  }\n"
            "  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n"
            "  chain forward { type filter hook forward priority mangle; policy accept; }\n}\n")


def restore_text(plan: Plan) -> str:
    lines = ["*nat", f":{PRE} - [0:0]", f"-A {CHAINS[PRE][1]} -j {PRE}"]
    lines += [str(s) for s in render(plan, 4)]
    return "\n".join(lines + ["COMMIT", ""])


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(kind: str, n: int) -> dict[str, float]:
    """Runs inside a fresh namespace; prints what it measured."""
    plan = mappings(n)
    if kind == "nftables":
        from firewall.nftables import NftablesDriver, open_libnft

        driver = NftablesDriver(open_libnft()[0])
        changed = mappings(n, changed=True)
        out = {"apply": timed(lambda: driver.apply(plan))}
        out["change_one"] = timed(lambda: driver.apply(changed))
        assert driver.installed() == changed
        return out
    if kind == "iptables":
        from firewall.iptables import IptablesDriver

        ipt = IptablesDriver()
        changed = mappings(n, changed=True)
        out = {"apply": timed(lambda: ipt.apply(plan))}
        out["change_one"] = timed(lambda: ipt.apply(changed))
        return out
    with tempfile.NamedTemporaryFile("w", suffix=".rules") as f:
        f.write(nft_text(plan) if kind == "nft -f" else restore_text(plan))
        f.flush()
        argv = ["nft", "-f", f.name] if kind == "nft -f" else ["iptables-legacy-restore", "--noflush", f.name]
        return {"apply": timed(lambda: subprocess.run(argv, check=True))}


def measure(kind: str, n: int, repeat: int) -> dict[str, float]:
    runs = []
    for i in range(repeat):
        ns = f"cbbench{os.getpid()}-{i}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--worker", kind, str(n)],
                                  check=True, capture_output=True, text=True)
            runs.append(json.loads(proc.stdout))
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2)
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = ("nftables", "nft -f", "iptables", "iptables-legacy-restore")
    results = {(k, n): measure(k, n, args.repeat) for n in sizes for k in kinds}
    ms = 1000.0
    print(f"apply of N ingress mappings, median of {args.repeat} runs, each in a fresh network namespace (ms)")
    print(f"{'N':>7} {'nftables':>10} {'nft -f':>10} {'ratio':>6} {'iptables':>10} {'legacy-restore':>15} {'ratio':>7}")
    for n in sizes:
        nft, nftf = results[("nftables", n)]["apply"], results[("nft -f", n)]["apply"]
        ipt, rest = results[("iptables", n)]["apply"], results[("iptables-legacy-restore", n)]["apply"]
        print(f"{n:>7} {nft * ms:>10.1f} {nftf * ms:>10.1f} {nft / nftf:>6.2f} {ipt * ms:>10.1f} {rest * ms:>15.1f}"
              f" {ipt / rest:>7.1f}")
    top = sizes[-1]
    print(f"change one mapping at {top}: nftables {results[('nftables', top)]['change_one'] * ms:.1f} ms, "
          f"iptables {results[('iptables', top)]['change_one'] * ms:.1f} ms")
    checks = []
    if 10000 in sizes:
        ratio = results[("nftables", 10000)]["apply"] / results[("nft -f", 10000)]["apply"]
        checks.append(("nftables apply within 2x of nft -f at 10,000", ratio <= 2.0, f"{ratio:.2f}x"))
        change = results[("nftables", 10000)]["change_one"] * ms
        checks.append(("one-mapping change at 10,000 under 20 ms (nftables)", change < 20, f"{change:.1f} ms"))
    if 1000 in sizes:
        ipt = results[("iptables", 1000)]["apply"]
        checks.append(("iptables 1,000 mappings under 1 s", ipt < 1.0, f"{ipt * ms:.0f} ms"))
    for name, ok, value in checks:
        print(f"target {'met' if ok else 'MISSED'}: {name}: {value}")


if __name__ == "__main__":
    main()
