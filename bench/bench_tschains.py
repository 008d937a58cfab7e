"""Benchmark: one read of tailscaled's own chains (firewall/tschains.py), the check added to the 2-second drift
check, beside that drift check's read of our own rules (`Driver.installed()`), per backend, in a fresh network
namespace holding tailscaled's chains as its linuxfw makes them (real kernel rules, both families) and our
rules for one TS_DEST_IP proxy. With `--foreign N`, N more rules of somebody else's in the filter table (a
container on the host's network beside a busy firewall): the legacy reader reads and parses that table whole.

Prints the median and 90th percentile of each over 2,000 reads, and the ratio of the chain read to the drift
check's read. Run as root: `.venv/bin/python bench/bench_tschains.py [--foreign 1000]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READS = 2000
IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "ip"

# tailscaled's chains in the shape linuxfw gives them (util/linuxfw: AddBase, AddChains, AddSNATRule).
LEGACY = """
{x} -N ts-input
{x} -A ts-input -i lo -s {me} -j ACCEPT
{x} -A ts-input ! -i tailscale0 -s {range} -j DROP
{x} -N ts-forward
{x} -A ts-forward -i tailscale0 -j MARK --set-xmark 0x40000/0xff0000
{x} -A ts-forward -m mark --mark 0x40000/0xff0000 -j ACCEPT
{x} -A ts-forward ! -o tailscale0 -s {range} -j DROP
{x} -A ts-forward -o tailscale0 -j ACCEPT
{x} -A INPUT -j ts-input
{x} -A FORWARD -j ts-forward
{x} -t nat -N ts-postrouting
{x} -t nat -A ts-postrouting -m mark --mark 0x40000/0xff0000 -j MASQUERADE
{x} -t nat -A POSTROUTING -j ts-postrouting
"""
NFT = """
add table {f} filter
add chain {f} filter input {{ type filter hook input priority 0; }}
add chain {f} filter forward {{ type filter hook forward priority 0; }}
add chain {f} filter ts-input
add chain {f} filter ts-forward
add rule {f} filter ts-input iifname "lo" {f} saddr {me} accept
add rule {f} filter ts-input iifname != "tailscale0" {f} saddr {range} drop
add rule {f} filter ts-forward iifname "tailscale0" meta mark set mark and 0xff00ffff xor 0x40000
add rule {f} filter ts-forward meta mark and 0xff0000 == 0x40000 accept
add rule {f} filter ts-forward oifname != "tailscale0" {f} saddr {range} drop
add rule {f} filter ts-forward oifname "tailscale0" accept
add rule {f} filter input jump ts-input
add rule {f} filter forward jump ts-forward
add table {f} nat
add chain {f} nat postrouting {{ type nat hook postrouting priority 100; }}
add chain {f} nat ts-postrouting
add rule {f} nat ts-postrouting meta mark and 0xff0000 == 0x40000 masquerade
add rule {f} nat postrouting jump ts-postrouting
"""
FAMILIES = {4: {"me": "100.64.0.7", "range": "100.64.0.0/10", "legacy": "iptables-legacy", "nft": "ip"},
            6: {"me": "fd7a:115c:a1e0::7", "range": "fd7a:115c:a1e0::/48", "legacy": "ip6tables-legacy",
                "nft": "ip6"}}

MEASURE = r"""
import json, statistics, sys, time
from ipaddress import ip_address
from containerboot import proxy
from containerboot.settings import load
from firewall.detect import Detection, make_driver
from firewall.tschains import reader

backend, reads = sys.argv[1], int(sys.argv[2])
detection = Detection(backend, ("bench",), (4, 6), nft_path="binding" if backend == "nftables" else None)
driver = make_driver(detection)
plan, _ = proxy.plan(load({"TS_USERSPACE": "false", "TS_DEST_IP": "198.18.2.2"}),
                     proxy.Inputs((ip_address("100.64.0.7"), ip_address("fd7a:115c:a1e0::7"))))
driver.apply(plan)
chains = reader(backend, (4, 6))
assert all(n > 0 for n in chains.read().values()), chains.read()
out = {}
for name, call in (("chains", chains.read), ("drift", driver.installed)):
    times = []
    for _ in range(reads):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    out[name] = {"median": statistics.median(times), "p90": times[int(len(times) * 0.9)]}
driver.flush()
print(json.dumps(out))
"""


def run(ns: str, *argv: str, stdin: str | None = None) -> str:
    return subprocess.run([IP, "netns", "exec", ns, *argv], input=stdin, check=True, capture_output=True,
                          text=True).stdout


def one(backend: str, foreign: int) -> dict[str, dict[str, float]]:
    ns = f"cbbench-ts-{uuid.uuid4().hex[:6]}"
    subprocess.run([IP, "netns", "add", ns], check=True)
    try:
        for fam, v in FAMILIES.items():
            if backend == "iptables":
                for line in LEGACY.format(x=v["legacy"], me=v["me"], range=v["range"]).strip().splitlines():
                    run(ns, *line.split())
                if foreign:
                    rules = "".join(f"-A FORWARD -s 198.19.{i // 250}.{i % 250 + 1}/32 -p tcp --dport {1000 + i} "
                                    "-j ACCEPT\n" for i in range(foreign)) if fam == 4 else ""
                    if rules:
                        run(ns, "iptables-legacy-restore", "--noflush", stdin=f"*filter\n{rules}COMMIT\n")
            else:
                run(ns, "nft", "-f", "-", stdin=NFT.format(f=v["nft"], me=v["me"], range=v["range"]))
                if foreign and fam == 4:
                    rules = "".join(f"add rule ip filter forward ip saddr 198.19.{i // 250}.{i % 250 + 1} tcp dport "
                                    f"{1000 + i} accept\n" for i in range(foreign))
                    run(ns, "nft", "-f", "-", stdin=rules)
        python = str(ROOT / ".venv" / "bin" / "python")
        out = run(ns, python if Path(python).exists() else sys.executable, "-c",
                  f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + MEASURE, backend, str(READS))
        return dict(json.loads(out))
    finally:
        subprocess.run([IP, "netns", "del", ns], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--foreign", type=int, default=0, metavar="N", help="foreign rules in the filter table")
    args = parser.parse_args()
    print(f"tailscaled's chains read vs the drift check's read of ours, {READS} reads each, "
          f"{args.foreign} foreign filter rules")
    for backend in ("nftables", "iptables"):
        r = one(backend, args.foreign)
        c, d = r["chains"], r["drift"]
        print(f"  {backend:9} chains: median {c['median'] * 1e6:7.1f} us, p90 {c['p90'] * 1e6:7.1f} us | "
              f"drift check: median {d['median'] * 1e6:7.1f} us, p90 {d['p90'] * 1e6:7.1f} us | "
              f"ratio {c['median'] / d['median']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
