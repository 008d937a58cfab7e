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
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
    """DNAT rules (upstream: one per mapping) plus map elements (ours: one per mapping and map) in the kernel."""
    if backend == "nftables":
        out = subprocess.run([IP, "netns", "exec", ns, "nft", "-j", "list", "ruleset"], capture_output=True,
                             text=True).stdout
        count = 0
        for obj in json.loads(out or '{"nftables": []}')["nftables"]:
            if "rule" in obj and "dnat" in json.dumps(obj["rule"]["expr"]):
                count += 1
            elif "map" in obj:
                count += len(obj["map"].get("elem") or ())
        return count
    out = subprocess.run([IP, "netns", "exec", ns, "iptables-legacy-save", "-t", "nat"], capture_output=True,
                         text=True).stdout
    return sum(1 for ln in out.splitlines() if "DNAT" in ln)


@dataclass
class Replica:
    run: Run
    ns: str
    cfg: Path
    secret: Callable[[], dict[str, str]]


@contextlib.contextmanager
def replica(api: KubeAPI, impl: str, backend: str, **extra: str) -> Iterator[Replica]:
    """A started replica (Startup complete) with an empty egress-services config, in a fresh namespace;
    `extra` adds to its environment."""
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
        relays.append(subprocess.Popen(["socat", f"UNIX-LISTEN:{sock},fork,mode=600", f"TCP:127.0.0.1:{port},nodelay"]))
        while not sock.exists():
            time.sleep(0.01)
        # nodelay on both relays (the same for both implementations): the API server's own socket has it.
        relays.append(subprocess.Popen([IP, "netns", "exec", ns, "socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,"
                                        "reuseaddr,nodelay", f"UNIX-CONNECT:{sock}"]))
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
                        TS_LOCAL_ADDR_PORT="127.0.0.1:9002", PATH=path,
                        TS_LOG_FORMAT="json" if impl == "ours" else "text", **extra)
        exe = binaries()["containerboot-upstream"] if impl == "upstream" else str(ROOT / ".venv/bin/containerboot")
        run = Run(full, argv=[IP, "netns", "exec", ns, exe])
        run.wait_contains("Startup complete, waiting for shutdown signal", timeout=60)  # text or JSON
        time.sleep(0.5)  # both have started their egress proxies (upstream: a goroutine after that line)
        yield Replica(run, ns, cfg, lambda: api.get_secret(kns, "pg-0") or {})
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


def sync(r: Replica, n: int, generation: int, backend: str) -> float:
    """Seconds from publishing n services until the Secret's status lists them all."""
    start = time.monotonic()
    kubelet_publish(r.cfg, {"egress-services": json.dumps(config(n))}, generation)
    while True:
        raw = r.secret().get("egress-services")
        if raw and len(json.loads(raw).get("services") or {}) == n:
            took = time.monotonic() - start
            break
        if time.monotonic() - start > TIMEOUT:
            raise RuntimeError(f"no status for {n} services within {TIMEOUT:g} s")
        if r.run.proc.poll() is not None:
            raise RuntimeError(f"exited {r.run.proc.returncode}:\n{r.run.output[-3000:]}")
        time.sleep(0.02)
    rules = count_rules(r.ns, backend)
    if rules < 2 * n:
        raise RuntimeError(f"{rules} DNAT rules/elements for {n} services ({2 * n} mappings)")
    return took


def one_run(api: KubeAPI, impl: str, n: int, backend: str) -> float:
    with replica(api, impl, backend) as r:
        return sync(r, n, 2, backend)


def sample(pid: int) -> dict[str, int]:
    """Threads, open fds, RSS (KiB) of the process, and zombies among its children."""
    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    zombies = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, ppid = text.rsplit(")", 1)[1].split()[:2]
        zombies += state == "Z" and int(ppid) == pid
    return {"threads": int(fields["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_kib": int(fields["VmRSS"].split()[0]), "zombies": zombies}


def soak(api: KubeAPI, n: int, backend: str, seconds: float, every: float = 30.0) -> None:
    """Ours with n services for `seconds`: someone flushes the NAT rules every `every` seconds; the rules
    must come back each time, and threads, fds, RSS must not grow, nor zombies appear."""
    flush = ["nft", "flush", "ruleset"] if backend == "nftables" else ["iptables-legacy", "-t", "nat", "-F"]
    with replica(api, "ours", backend) as r:
        sync(r, n, 2, backend)
        pid = r.run.proc.pid
        first = sample(pid)
        print(f"soak start: {first}", flush=True)
        end = time.monotonic() + seconds
        worst: dict[str, int] = dict(first)
        flushes = 0
        while time.monotonic() < end:
            time.sleep(max(0.0, min(every, end - time.monotonic())))
            subprocess.run([IP, "netns", "exec", r.ns, *flush], check=True)
            flushes += 1
            t0 = time.monotonic()
            while count_rules(r.ns, backend) < 2 * n:
                if time.monotonic() - t0 > 15:
                    raise RuntimeError(f"rules not back 15 s after flush {flushes}")
                time.sleep(0.1)
            back = time.monotonic() - t0
            now = sample(pid)
            worst = {k: max(worst[k], now[k]) for k in now}
            print(f"flush {flushes}: rules back in {back:.1f} s; {now}", flush=True)
        last = sample(pid)
        print(f"soak {seconds:g} s, {n} services, {backend}, {flushes} flushes, rules back each time: start {first}, "
              f"end {last}, max {worst}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--backend", default="nftables", choices=["nftables", "iptables"])
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help="Instead: ours with 1,000 services for this long, a rule flush every 30 s")
    args = parser.parse_args()
    if os.geteuid() != 0 or not have_kube():
        print("bench_egress: needs root and the Go builds (scripts/build-go.sh)", file=sys.stderr)
        return 1
    with KubeAPI() as api:
        if args.soak:
            soak(api, 1000, args.backend, args.soak)
            return 0
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
