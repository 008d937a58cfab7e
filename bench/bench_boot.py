"""Benchmark: this containerboot against upstream's Go containerboot (built from the same tailscale.com
version by scripts/build-go.sh), in the same lab with the same environment, alternating runs.

For each run: time from process start to ready (health 200 and the proxy's DNAT rule in the kernel),
time from an address change (control re-addresses the node) to the rules for the new address being
live, the peak RSS of the containerboot process (tailscaled not included), and the container's total:
the peak memory of a cgroup (v1 memory controller, memory.max_usage_in_bytes) holding containerboot and
every process it starts (tailscaled, the `tailscale up` CLI), as the container's cgroup would see it.
Both firewall backends are measured (TS_DEBUG_FIREWALL_MODE for both programs). Ours runs as the image
runs it (docker/containerboot-launcher: Debian's python3 -IS, the package on sys.path), not through the
development venv's entry point, whose site machinery adds about 2 MiB the image never loads.
For ours it also prints its own share: from the netmap arriving to the rules being live, as it logs it.
Run as root: `make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.fakes import Run  # noqa: E402
from tests.lab.netns import IP  # noqa: E402
from tests.lab.tailnet import Tailnet, have_binaries  # noqa: E402

# Runs inside the proxy namespace: prints the monotonic time at which some rule line holds all of `marks`
# (a DNAT to the backend; after an address change, one for the new address) in either backend, and,
# when asked, /healthz answers 200. Polls every 10 ms. (`iptables-legacy-save` without -t creates no table.)
POLLER = r"""
import subprocess, sys, time, urllib.request
marks, need_health = sys.argv[1].split(","), sys.argv[2] == "1"
def healthy():
    try:
        with urllib.request.urlopen("http://127.0.0.1:9002/healthz", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False
def rules():
    for argv in (["nft", "list", "ruleset"], ["iptables-legacy-save"]):
        out = subprocess.run(argv, capture_output=True, text=True).stdout
        if any(all(m in line for m in marks) for line in out.splitlines()):
            return True
    return False
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    if rules() and (not need_health or healthy()):
        print(time.monotonic(), flush=True)
        break
    time.sleep(0.01)
"""


def poll(ns: str, marker: str, need_health: bool) -> subprocess.Popen[str]:
    argv = [IP, "netns", "exec", ns, sys.executable, "-c", POLLER, marker, "1" if need_health else "0"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def done_at(poller: subprocess.Popen[str]) -> float:
    out, _ = poller.communicate(timeout=150)
    if not out.strip():
        raise RuntimeError("not ready within 120 s")
    return float(out.split()[0])


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
SETTLE = 3.0  # seconds after the address change before the memory is read
# What docker/containerboot-launcher runs in the image.
OURS = ["/usr/bin/python3", "-IS", "-c",
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.append('/usr/lib/python3/dist-packages'); "
        "from containerboot.cli import main; main()"]


def container_peak_mib(cgroup: Path) -> float:
    return int((cgroup / "memory.max_usage_in_bytes").read_text()) / (1 << 20)


def anon_by_process_mib(cgroup: Path, main_pid: int) -> dict[str, float]:
    """Anonymous memory (RssAnon) at rest, containerboot's and the rest's (tailscaled): file-backed
    pages (a Go binary's text, libpython) are charged to whichever cgroup first read them into the page
    cache, so the cgroup's figure is mostly these two."""
    out = {"anon_boot": 0.0, "anon_rest": 0.0}
    for pid in (cgroup / "cgroup.procs").read_text().split():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), 0)
        out["anon_boot" if int(pid) == main_pid else "anon_rest"] += kib / 1024
    return out


def container_parts_mib(cgroup: Path) -> dict[str, float]:
    """Where the container's memory is at rest (SETTLE after the last change): anonymous (rss), page cache, and the
    kernel's own peak (sockets, netfilter objects: cgroup v1 charges them too)."""
    stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
    kmem = cgroup / "memory.kmem.max_usage_in_bytes"
    return {"anon": int(stat["rss"]) / (1 << 20), "cache": int(stat["cache"]) / (1 << 20),
            "kmem": int(kmem.read_text()) / (1 << 20) if kmem.exists() else float("nan")}


def one_run(net: Tailnet, impl: str, backend_mode: str, n: int) -> dict[str, float]:
    ns, _ = net.site(f"b{n}", f"198.18.0.{n}", n)
    backend = f"198.18.{n}.2"
    env = net.containerboot_env(f"b{n}", TS_USERSPACE="false", TS_DEST_IP=backend, TS_ENABLE_HEALTH_CHECK="true",
                                TS_LOCAL_ADDR_PORT="127.0.0.1:9002", TS_LOG_FORMAT="json",
                                TS_DEBUG_FIREWALL_MODE=backend_mode)
    argv = [net.bins["containerboot-upstream"]] if impl == "upstream" else OURS
    cgroup = CGROUP_MEMORY / f"cbbench-{os.getpid()}-{n}"
    cgroup.mkdir()
    poller = poll(ns, backend, need_health=True)
    start = time.monotonic()
    # The shell joins the cgroup and then becomes `ip netns exec` and at last containerboot (one pid), so
    # everything containerboot starts is counted. (Inside the namespace /sys has no cgroup mounts.)
    join = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"']
    run = Run(env, argv=[*join, *net.private_run(ns, argv)])
    try:
        ready = done_at(poller) - start
        cli = [IP, "netns", "exec", ns, net.bins["tailscale"], f"--socket={env['TS_SOCKET']}", "status", "--json"]
        status = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True).stdout)
        old = next(a for a in status["Self"]["TailscaleIPs"] if "." in a)
        new = f"100.64.1.{n}"
        net.stop_control()
        with sqlite3.connect(net.dir / "db.sqlite") as db:
            db.execute("UPDATE nodes SET ipv4 = ? WHERE ipv4 = ?", (new, old))
        poller = poll(ns, f"{new},{backend}", need_health=False)
        net.start_control()
        changed = time.monotonic()
        moved = done_at(poller) - changed
        # The "at rest" figures are a proxy's life between changes: ours frees the libnftables context at
        # the first drift check (every 2 s) that finds nothing changed.
        time.sleep(SETTLE)
        rss = peak_rss_mib(run.proc.pid)
        total = container_peak_mib(cgroup)
        parts = {**container_parts_mib(cgroup), **anon_by_process_mib(cgroup, run.proc.pid)}
    except Exception:
        print(f"{impl} run failed; its output:\n" + run.output[-3000:], file=sys.stderr)
        raise
    finally:
        run.stop()
        remove_cgroup(cgroup)
    out = {"ready": ready, "moved": moved, "rss": rss, "total": total, **parts}
    if impl == "ours":
        shares = [json.loads(line).get("ms_after_netmap") for line in run.lines if '"ms_after_netmap"' in line]
        out["share_ms"] = max(s for s in shares if s is not None)
    return out


def remove_cgroup(cgroup: Path) -> None:
    """rmdir once its processes are gone (a stopped tailscaled may take a moment to be reaped)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            cgroup.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                print(f"could not remove {cgroup}", file=sys.stderr)
                return
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    # tailscaled's heap alone moves by several MiB from run to run (Go's collector): five runs each.
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backends", default="nftables,iptables",
                        help="comma-separated TS_DEBUG_FIREWALL_MODE values to measure")
    args = parser.parse_args()
    if not have_binaries():
        sys.exit("tailscaled, tailscale, upstream containerboot and headscale are missing: run scripts/build-go.sh")
    backends = [b for b in args.backends.split(",") if b]
    net = Tailnet()
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        net.start_control()
        n = 20
        for _ in range(args.runs):
            for mode in backends:
                for impl in ("upstream", "ours"):
                    results.setdefault((mode, impl), []).append(one_run(net, impl, mode, n))
                    n += 1
    finally:
        net.close()

    def med(mode: str, impl: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(mode, impl)])

    print(f"proxy boot on a real tailnet (headscale + tailscaled in namespaces), median of {args.runs} runs each, "
          "alternating")
    for mode in backends:
        print(f"\nTS_DEBUG_FIREWALL_MODE={mode}")
        print(f"{'':34} {'upstream (Go)':>14} {'ours (Python)':>14} {'ratio':>7}")
        for key, label, unit in (("ready", "start -> ready (rules, 200)", "s"),
                                 ("moved", "address change -> rules", "s"),
                                 ("rss", "peak RSS, containerboot", "MiB"),
                                 ("total", "peak, container (cgroup, all)", "MiB"),
                                 ("anon", "  at rest: anonymous", "MiB"),
                                 ("anon_boot", "    of it containerboot", "MiB"),
                                 ("anon_rest", "    of it tailscaled (and rest)", "MiB"),
                                 ("cache", "  at rest: page cache", "MiB"),
                                 ("kmem", "  kernel memory, peak", "MiB")):
            up, us = med(mode, "upstream", key), med(mode, "ours", key)
            print(f"{label:34} {up:>12.2f}{unit:>3} {us:>11.2f}{unit:>3} {us / up:>7.2f}")
        shares = [r["share_ms"] for r in results[(mode, "ours")]]
        print(f"ours: netmap -> rules live: median {statistics.median(shares):.1f} ms, max {max(shares):.1f} ms")
        # Issue 11's goal: containerboot's peak RSS at or below upstream's; the container's total is reported
        # beside it (the interpreter's heap is the difference: a bare `python3 -IS` holds 3.7 MiB anonymous).
        for key, label in (("ready", "readiness"), ("rss", "containerboot peak RSS")):
            ratio = med(mode, "ours", key) / med(mode, "upstream", key)
            print(f"target {'met' if ratio <= 1.0 else 'MISSED'}: {label} ratio ours/upstream <= 1.0 ({ratio:.2f})")
        container = med(mode, "ours", "total") / med(mode, "upstream", "total")
        print(f"reported: container peak ratio ours/upstream {container:.2f}")
        print(f"target {'met' if max(shares) < 50 else 'MISSED'}: our share under 50 ms (max {max(shares):.1f} ms)")

if __name__ == "__main__":
    main()
