"""Benchmark: driver apply times against the backends' own loaders, side by side in one run.

For N ingress mappings (tailnet address -> backend address) it measures, each in a fresh network
namespace: `apply` through the nftables driver and through the iptables driver, `nft -f` loading
the same ruleset as text, and `iptables-legacy-restore` loading the same rules; then, at the
largest N, an `apply` that changes one mapping, and the drift check (`installed()`) with 10,000
rules of someone else's in the namespace: when nothing changed (what runs every 2 s for the life
of the container, as CPU time of this process and its children) and right after a change.
Drivers are created and ready (`installed()` once) before the clock starts, as in the boot, where
they exist long before the first netmap; the drivers' first read is printed on its own.

The port-map scenario does the same for N egress service ports (PortMap: protocol and port not from
tailscale0 -> target address and port, the Kubernetes operator's ProxyGroup egress services), against
`nft -f` and `iptables-legacy-restore` of the same rules, with a one-mapping change at the largest N.
Run as root: `make bench`; `--scenario portmap --portmap-sizes 1000 --repeat 1` for a quick run.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from firewall.iptables import CHAINS, PRE, render  # noqa: E402
from firewall.model import Dnat, Plan, PortMap  # noqa: E402

FOREIGN = 10_000  # someone else's rules in the namespace during the drift checks
IDLE_CALLS, IDLE_SECONDS = 200, 10.0  # as many drift checks as fit, up to these
CHECK_PERIOD = 2.0  # the boot's drift check interval (containerboot/boot/keeper.py DRIFT_CHECK_SECONDS)


def mappings(n: int, changed: bool = False) -> Plan:
    base_ts, base_be = int(ipaddress.ip_address("100.64.0.1")), int(ipaddress.ip_address("198.18.0.1"))
    rules = [Dnat(ipaddress.IPv4Address(base_ts + i), (ipaddress.IPv4Address(base_be + i),)) for i in range(n)]
    if changed:
        rules[0] = Dnat(rules[0].match, (ipaddress.IPv4Address(base_be + n + 1),))
    return Plan.of(*rules)


def port_mappings(n: int, changed: bool = False) -> Plan:
    """N egress service ports: TCP and UDP in turn, ports from 1, each to a target address and port of its own."""
    base = int(ipaddress.ip_address("100.64.0.1"))
    rules = [PortMap("tcp" if i % 2 == 0 else "udp", 1 + i // 2, ipaddress.IPv4Address(base + i), 1000 + i % 50000)
             for i in range(n)]
    if changed:
        first = rules[0]
        rules[0] = PortMap(first.proto, first.port, ipaddress.IPv4Address(base + n + 1), first.to_port)
    return Plan.of(*rules)


def port_nft_text(plan: Plan) -> str:
    """The same table as the nftables driver makes for PortMaps alone (ingress map empty), sizes included."""
    from firewall.nftables import map_sizes

    sizes = map_sizes(plan)
    maps, lookups = "", ""
    for proto in ("tcp", "udp"):
        ports = sorted((r for r in plan.rules if isinstance(r, PortMap) and r.proto == proto), key=lambda r: r.port)
        if not ports:
            continue
        addr, port = f"portmap_{proto}_addr", f"portmap_{proto}_port"
        addrs = ", ".join(f"{r.port} : {r.to}" for r in ports)
        to_ports = ", ".join(f"{r.port} : {r.to_port}" for r in ports)
        maps += (f"  map {addr} {{ type inet_service : ipv4_addr; size {sizes[addr]}; elements = {{ {addrs} }} }}\n"
                 f"  map {port} {{ type inet_service : inet_service; size {sizes[port]}; "
                 f"elements = {{ {to_ports} }} }}\n")
        lookups += f'    iifname != "tailscale0" dnat to {proto} dport map @{addr} : {proto} dport map @{port}\n'
    return ("table ip containerboot {\n"
            f"  map ingress {{ type ipv4_addr : ipv4_addr; size {sizes['ingress']}; }}\n{maps}"
            "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
            f"    dnat to ip daddr map @ingress\n{lookups}  }}\n"
            "  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n"
            "  chain forward { type filter hook forward priority mangle; policy accept; }\n}\n")


def nft_text(plan: Plan) -> str:
    """The same table as the driver's, map size included (where the driver declares one)."""
    try:
        from firewall.nftables import map_size

        size = f"size {map_size(len(plan.rules))}; "
    except ImportError:  # a driver from before map sizes: the same table as it makes
        size = ""
    elems = ", ".join(f"{r.match} : {r.to[0]}" for r in plan.sorted() if isinstance(r, Dnat))
    return ("table ip containerboot {\n"
            f"  map ingress {{ type ipv4_addr : ipv4_addr; {size}elements = {{ {elems} }} }}\n"
            "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
            "    dnat to ip daddr map @ingress\n  }\n"
            "  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n"
            "  chain forward { type filter hook forward priority mangle; policy accept; }\n}\n")


def restore_text(plan: Plan) -> str:
    lines = ["*nat", f":{PRE} - [0:0]", f"-A {CHAINS[PRE][1]} -j {PRE}"]
    lines += [str(s) for s in render(plan, 4)]
    return "\n".join(lines + ["COMMIT", ""])


def add_foreign(kind: str) -> None:
    """FOREIGN rules of someone else's: in the legacy nat table we read (iptables), or a table of its own."""
    if kind == "iptables":
        rules = [f"-A FOREIGN -s 198.19.{i // 250}.{i % 250 + 1}/32 -p tcp --dport {1000 + i % 5000} -j RETURN"
                 for i in range(FOREIGN)]
        text = "\n".join(["*nat", ":FOREIGN - [0:0]", "-A PREROUTING -j FOREIGN", *rules, "COMMIT", ""])
        subprocess.run(["iptables-legacy-restore", "--noflush"], input=text, text=True, check=True)
    else:
        rules = [f"add rule ip foreign input ip saddr 198.19.{i // 250}.{i % 250 + 1} tcp dport {1000 + i % 5000} "
                 "return" for i in range(FOREIGN)]
        text = "\n".join(["add table ip foreign",
                          "add chain ip foreign input { type filter hook input priority 0; policy accept; }",
                          *rules, ""])
        subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def children_ns() -> int:
    """CPU time of the children waited for so far (a driver that forks a child per call)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


def worker(kind: str, n: int, checks: bool, scenario: str = "ingress") -> dict[str, float]:
    """Runs inside a fresh namespace; prints what it measured."""
    make = port_mappings if scenario == "portmap" else mappings
    plan, changed = make(n), make(n, changed=True)
    if kind in ("nftables", "iptables"):
        if kind == "nftables":
            from firewall.nftables import NftablesDriver, open_libnft

            driver: Any = NftablesDriver(open_libnft()[0])
        else:
            from firewall.iptables import IptablesDriver

            driver = IptablesDriver()
        out = {"ready": timed(driver.installed)}
        out["apply"] = timed(lambda: driver.apply(plan))
        out["change_one"] = timed(lambda: driver.apply(changed))
        assert driver.installed() == changed
        # And back, then once more: the first change after a full load pays for libnftables dropping the cache
        # of that load (20,000 port map elements: about 8 ms); the changes that follow do not.
        out["change_back"] = timed(lambda: driver.apply(plan))
        out["change_again"] = timed(lambda: driver.apply(changed))
        assert driver.installed() == changed
        if checks:
            add_foreign(kind)
            out["first_check"] = timed(lambda: driver.installed() == changed)  # a change: read in full
            assert driver.installed() == changed
            if scenario == "portmap":
                return out  # the idle check is the same whatever the rules are (measured with the ingress rules)
            cpu0, wall0 = [time.process_time_ns(), children_ns()], time.perf_counter()
            calls = 0
            while calls < IDLE_CALLS and time.perf_counter() - wall0 < IDLE_SECONDS:
                assert driver.installed() == changed  # as the boot's check compares it with what it applied
                calls += 1
            cpu1, wall1 = [time.process_time_ns(), children_ns()], time.perf_counter()
            out["idle_calls"] = calls
            out["idle_wall"] = (wall1 - wall0) / calls
            out["idle_cpu"] = (sum(cpu1) - sum(cpu0)) / 1e9 / calls
        return out
    with tempfile.NamedTemporaryFile("w", suffix=".rules") as f:
        if kind == "nft -f":
            f.write(port_nft_text(plan) if scenario == "portmap" else nft_text(plan))
        else:
            f.write(restore_text(plan))
        f.flush()
        argv = ["nft", "-f", f.name] if kind == "nft -f" else ["iptables-legacy-restore", "--noflush", f.name]
        return {"apply": timed(lambda: subprocess.run(argv, check=True))}


IMAGE = ""  # --image: the workers run in this image, each in a container of its own, instead of here


def measure(kind: str, n: int, repeat: int, checks: bool, scenario: str = "ingress") -> dict[str, float]:
    runs = []
    args = ["--worker", kind, str(n), *(["--checks"] if checks else []), "--scenario", scenario]
    for i in range(repeat):
        if IMAGE:
            # The image's own interpreter, iptables-legacy-restore and nft (another platform's, e.g. the
            # linux/386 image run natively here), this checkout's code; a container's network namespace is
            # as fresh as one made with `ip netns add`.
            argv = ["docker", "run", "--rm", "--network", "none", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
                    "-v", f"{ROOT}:/src:ro", "--entrypoint", "python3", IMAGE, "/src/bench/bench_apply.py", *args]
            proc = subprocess.run(argv, check=True, capture_output=True, text=True)
            runs.append(json.loads(proc.stdout))
            continue
        ns = f"cbbench{os.getpid()}-{i}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            argv = [sys.executable, __file__, *args]
            proc = subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True, text=True)
            runs.append(json.loads(proc.stdout))
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    import statistics  # here: the image's trimmed standard library has no decimal, which statistics imports

    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2)
    parser.add_argument("--checks", action="store_true")
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenario", choices=["all", "ingress", "portmap"], default="all")
    parser.add_argument("--portmap-sizes", default="1000,10000")
    parser.add_argument("--image", default="", help="run the workers in this image (e.g. the linux/386 one)")
    args = parser.parse_args()
    global IMAGE
    IMAGE = args.image
    if IMAGE and not args.worker:
        platform = subprocess.run(["docker", "image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", IMAGE],
                                  check=True, capture_output=True, text=True).stdout.strip()
        print(f"workers in {IMAGE} ({platform})")
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.checks, args.scenario)))
        return
    if args.scenario in ("all", "ingress"):
        ingress(args)
    if args.scenario in ("all", "portmap"):
        portmap(args)


KINDS = ("nftables", "nft -f", "iptables", "iptables-legacy-restore")


def portmap(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.portmap_sizes.split(",")]
    top = sizes[-1]
    results = {(k, n): measure(k, n, args.repeat, n == top, "portmap") for n in sizes for k in KINDS}
    ms = 1000.0
    print(f"apply of N egress service ports (PortMap), median of {args.repeat} runs, each in a fresh network "
          "namespace (ms)")
    print(f"{'N':>7} {'nftables':>10} {'nft -f':>10} {'ratio':>6} {'iptables':>10} {'legacy-restore':>15} {'ratio':>7}")
    for n in sizes:
        nft, nftf = results[("nftables", n)]["apply"], results[("nft -f", n)]["apply"]
        ipt, rest = results[("iptables", n)]["apply"], results[("iptables-legacy-restore", n)]["apply"]
        print(f"{n:>7} {nft * ms:>10.1f} {nftf * ms:>10.1f} {nft / nftf:>6.2f} {ipt * ms:>10.1f} {rest * ms:>15.1f}"
              f" {ipt / rest:>7.2f}")
    nft, ipt = results[("nftables", top)], results[("iptables", top)]
    for key, what in (("change_one", "first after the full load"), ("change_back", "back"),
                      ("change_again", "and again")):
        print(f"change one port mapping (new target address) at {top}, {what}: nftables {nft[key] * ms:.1f} ms, "
              f"iptables {ipt[key] * ms:.1f} ms")
    print(f"drift check with {top} port mappings and {FOREIGN} foreign rules, first after a change: "
          f"nftables {nft['first_check'] * ms:.1f} ms, iptables {ipt['first_check'] * ms:.1f} ms")


def ingress(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    top = sizes[-1]
    results = {(k, n): measure(k, n, args.repeat, n == top) for n in sizes for k in KINDS}
    ms = 1000.0
    print(f"apply of N ingress mappings, median of {args.repeat} runs, each in a fresh network namespace (ms)")
    print(f"{'N':>7} {'nftables':>10} {'nft -f':>10} {'ratio':>6} {'iptables':>10} {'legacy-restore':>15} {'ratio':>7}")
    for n in sizes:
        nft, nftf = results[("nftables", n)]["apply"], results[("nft -f", n)]["apply"]
        ipt, rest = results[("iptables", n)]["apply"], results[("iptables-legacy-restore", n)]["apply"]
        print(f"{n:>7} {nft * ms:>10.1f} {nftf * ms:>10.1f} {nft / nftf:>6.2f} {ipt * ms:>10.1f} {rest * ms:>15.1f}"
              f" {ipt / rest:>7.2f}")
    nft, ipt = results[("nftables", top)], results[("iptables", top)]
    print(f"change one mapping at {top}: nftables {nft['change_one'] * ms:.1f} ms, "
          f"iptables {ipt['change_one'] * ms:.1f} ms")
    print(f"drift check with {top} mappings and {FOREIGN} foreign rules, first after a change: "
          f"nftables {nft['first_check'] * ms:.1f} ms, iptables {ipt['first_check'] * ms:.1f} ms")
    for name, r in (("nftables", nft), ("iptables", ipt)):
        share = r["idle_cpu"] / CHECK_PERIOD * 100
        print(f"idle drift check ({name}, nothing changed, {r['idle_calls']:.0f} calls): "
              f"{r['idle_wall'] * ms:.2f} ms wall, {r['idle_cpu'] * ms:.3f} ms CPU (this process and its "
              f"children) = {share:.3f}% of one core at one check per {CHECK_PERIOD:g} s")
    print(f"iptables driver ready (first read): {ipt['ready'] * ms:.1f} ms; "
          f"nftables driver ready: {nft['ready'] * ms:.1f} ms")
    checks = []
    for n in (1000, 10000):
        if n in sizes:
            ratio = results[("iptables", n)]["apply"] / results[("iptables-legacy-restore", n)]["apply"]
            checks.append((f"iptables apply of {n:,} within 3x of iptables-legacy-restore", ratio <= 3.0,
                           f"{ratio:.2f}x"))
    if 10000 in sizes:
        ratio = results[("nftables", 10000)]["apply"] / results[("nft -f", 10000)]["apply"]
        checks.append(("nftables apply of 10,000 at most 1.0x of nft -f", ratio <= 1.0, f"{ratio:.2f}x"))
        change = results[("nftables", 10000)]["change_one"] * ms
        checks.append(("one-mapping change at 10,000 under 15 ms (nftables)", change < 15, f"{change:.1f} ms"))
        change = results[("iptables", 10000)]["change_one"] * ms
        checks.append(("one-mapping change at 10,000 under 100 ms (iptables)", change < 100, f"{change:.1f} ms"))
    for name, r in (("nftables", nft), ("iptables", ipt)):
        share = r["idle_cpu"] / CHECK_PERIOD * 100
        checks.append((f"idle drift check under 1% of one core ({name})", share < 1.0, f"{share:.3f}%"))
    for name, ok, value in checks:
        print(f"target {'met' if ok else 'MISSED'}: {name}: {value}")


if __name__ == "__main__":
    main()
