"""What the foreign-rules tests (tests/foreign/) share: the rulesets and their counters, where the driver runs,
the services to apply, and reading `iptables-legacy-save -c` back into "ours" and "everyone else's".

The driver step is a `Target`'s `containerboot`: `LocalTarget` runs the `containerboot` CLI of this checkout in
a namespace of the test; `ContainerTarget` runs an image's own containerboot (the linux/386 one: its 32-bit
Python writes the tables in the i386 layout, which the kernel translates) in a container of its own, whose
network namespace `ip netns attach` names. Everything else, loading and reading the tables, runs this machine's
iptables-legacy tools in the target's namespace.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from firewall.iptables import CHAINS, render
from firewall.model import Dnat, MssClamp, Plan, PortMap, Rule, Snat
from tests.conftest import ROOT, containerboot_exe
from tests.lab.images import container_pid, docker
from tests.lab.netns import IP, Lab

DATA = ROOT / "tests/foreign/data"  # the rulesets; their sources in SOURCES.md there
SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
RESTORE = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}
IPT = {4: "iptables-legacy", 6: "ip6tables-legacy"}
TAILNET = {4: "100.64.0.1", 6: "fd7a:115c:a1e0::1"}  # the node's tailnet addresses given to apply
KUBE_API = "198.18.0.1"  # KUBERNETES_SERVICE_HOST, which the services' configs require; never contacted
COUNTERS = re.compile(r"^\[(\d+):(\d+)\] ")
OUR_JUMP = re.compile(r"^\[\d+:\d+\] -A (PREROUTING|POSTROUTING|FORWARD) -j (CONTAINERBOOT-[A-Z]+)$")


# ---- the rulesets ------------------------------------------------------------------------------------------


def dataset(name: str) -> str:
    return (DATA / name).read_text()


def counters(k: int) -> str:
    """Non-zero counters for the k-th counted line of a ruleset (k from 1): one in five above 4 GiB in both
    fields (the first is [1:4294967297], packets 1 and bytes 2^32 + 1), one in seven with a byte count of 2^40 and
    more, the rest small."""
    if k % 5 == 1:
        return f"[{k if k == 1 else 2**32 + k}:{2**32 + k}]"
    if k % 7 == 0:
        return f"[{k}:{2**40 + 3 * k}]"
    return f"[{k + 1}:{60 * (k + 1)}]"


def with_counters(text: str) -> str:
    """A stored ruleset (iptables-save without counters) with counters on every policy and rule."""
    out, k = [], 0
    for line in text.splitlines():
        if line.startswith(":") and line.split()[1] != "-":
            k += 1
            line = re.sub(r"\[\d+:\d+\]$", counters(k), line)
        elif line.startswith("-A "):
            k += 1
            line = f"{counters(k)} {line}"
        out.append(line)
    return "\n".join(out) + "\n"


# ---- where the driver runs ---------------------------------------------------------------------------------

# Parameters of the `target` fixture (tests/foreign/conftest.py), for `indirect` parametrisation: this
# checkout's containerboot on this machine, or the linux/386 image's in a container (needs a Docker engine).
LOCAL = "amd64"
ON_386 = pytest.param("386", marks=pytest.mark.docker, id="386")
TARGETS = [LOCAL, ON_386]


class Target(Protocol):
    ns: str  # a network namespace `ip netns exec` knows

    def write(self, name: str, data: str) -> str:
        """Put a config file where containerboot can read it; returns its path as containerboot sees it."""

    def containerboot(self, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """Run containerboot with these arguments and environment in the namespace."""


def put(files: Path, name: str, data: str) -> Path:
    """A config file for the driver step, under `files`."""
    path = files / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    return path


@dataclass
class LocalTarget:
    """This checkout's containerboot, run in a namespace of the lab."""

    lab: Lab
    ns: str
    files: Path

    def write(self, name: str, data: str) -> str:
        return str(put(self.files, name, data))

    def containerboot(self, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return self.lab.run(self.ns, containerboot_exe(), *args, env={"PATH": os.environ["PATH"], **env},
                            check=False, timeout=60)


MOUNT = "/foreign"  # where a ContainerTarget's config files are, in its container


@dataclass
class ContainerTarget:
    """An image's own containerboot, run with `docker exec` in a container that does nothing else; config files
    in `files`, mounted at MOUNT; the container's network namespace attached as `ns`."""

    container: str
    ns: str
    files: Path

    def write(self, name: str, data: str) -> str:
        put(self.files, name, data)
        return f"{MOUNT}/{name}"

    def containerboot(self, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        return docker("exec", *env_args, self.container, "containerboot", *args, check=False, timeout=120)

    def python(self, code: str) -> str:
        """Run `code` with the image's python3 and containerboot's modules (as its containerboot runs them)."""
        lib = "import sys; sys.path.insert(0, '/opt/containerboot/lib')\n"
        return docker("exec", self.container, "python3", "-c", lib + code, timeout=60).stdout.strip()


@contextmanager
def container_target(image: str, platform: str, name: str, files: Path) -> Iterator[ContainerTarget]:
    """A container of `image` (of `platform`) with no network but its own loopback, allowed to write netfilter
    tables (NET_ADMIN, NET_RAW) and idle (`sleep infinity`); its namespace attached as `name` for `ip netns
    exec`. Both are removed on exit (the attachment first: it is only a name, the container holds the
    namespace)."""
    files.mkdir(parents=True, exist_ok=True)
    try:
        docker("run", "-d", "--name", name, "--platform", platform, "--network", "none", "--cap-add", "NET_ADMIN",
               "--cap-add", "NET_RAW", "-v", f"{files}:{MOUNT}", "--entrypoint", "sleep", image, "infinity")
        subprocess.run([IP, "netns", "attach", name, str(container_pid(name))], check=True, capture_output=True,
                       text=True, timeout=30)
        yield ContainerTarget(name, name, files)
    finally:
        subprocess.run([IP, "netns", "delete", name], capture_output=True, timeout=30)
        docker("rm", "-f", "-v", name, check=False)


def tool(target: Target, *argv: str) -> str:
    """One of this machine's netfilter tools in the target's namespace; its output, or AssertionError."""
    proc = subprocess.run(["ip", "netns", "exec", target.ns, *argv], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def load(target: Target, fam: int, text: str, scratch: Path) -> list[str]:
    """Load a ruleset with its counters (iptables-legacy-restore -c); returns the save that follows, which must
    print it exactly as given (the stored rulesets are iptables-save's own output)."""
    path = scratch / f"load-{fam}.rules"
    path.write_text(text)
    tool(target, RESTORE[fam], "-c", str(path))
    saved = save(target, fam)
    given = text.splitlines()
    assert blocks(saved) == blocks(given), "the ruleset did not load as given:\n" + diff(given, saved)
    return saved


def save(target: Target, fam: int) -> list[str]:
    """iptables-save -c without its comment lines (the date)."""
    return [ln for ln in tool(target, SAVE[fam], "-c").splitlines() if not ln.startswith("#")]


# ---- what a save holds -------------------------------------------------------------------------------------


def blocks(lines: list[str]) -> dict[str, list[str]]:
    """The lines of each table, "*name" to COMMIT."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines:
        if line.startswith("*"):
            current = out.setdefault(line[1:], [])
        current.append(line)
    return out


@dataclass
class Ours:
    """What a save shows of containerboot's: its chains' declarations, rules (without counters) and jumps."""

    declared: list[tuple[str, str]] = field(default_factory=list)  # (table, chain)
    rules: dict[str, list[str]] = field(default_factory=dict)  # chain -> rules as iptables-save prints them
    jumps: list[tuple[str, str, str, int]] = field(default_factory=list)  # (table, base, chain, rule index in base)


def split(lines: list[str]) -> tuple[list[str], Ours]:
    """Everyone else's lines, and ours: our chains, their rules, and jumps to them of exactly our form. Any other
    line that names one of our chains (a jump someone else wrote) stays with the foreign lines."""
    foreign: list[str] = []
    ours = Ours()
    table, index = "", Counter[str]()
    for line in lines:
        if line.startswith("*"):
            table, index = line[1:], Counter()
        if line.startswith(":CONTAINERBOOT-") and line.split()[1] == "-":
            ours.declared.append((table, line[1:].split()[0]))
            continue
        body = COUNTERS.sub("", line)
        chain = body.split()[1] if body.startswith("-A ") else ""
        if chain.startswith("CONTAINERBOOT-"):
            ours.rules.setdefault(chain, []).append(body)
            continue
        jump = OUR_JUMP.match(line)
        if jump and jump.group(2) in CHAINS:
            ours.jumps.append((table, jump.group(1), jump.group(2), index[chain]))
            index[chain] += 1
            continue
        if chain:
            index[chain] += 1
        foreign.append(line)
    return foreign, ours


def planned(plan: Plan | None, fam: int) -> dict[str, list[str]]:
    """Our chains' rules for a plan, as iptables-save prints them ({}: no chains at all)."""
    if plan is None or not plan.only(fam).rules:
        return {}
    out: dict[str, list[str]] = {chain: [] for chain in CHAINS}  # all three, even when one has no rules
    for spec in render(plan, fam):
        out.setdefault(spec.chain, []).append(str(spec))
    return out


def check_ours(ours: Ours, plan: Plan | None, fam: int, on_top: bool = True) -> list[str]:
    """Problems with our chains: each one declared once in its table, reached by exactly one jump from its base
    chain (its first rule when `on_top`), holding exactly the planned rules; nothing at all without a plan."""
    want = planned(plan, fam)
    problems = []
    if sorted(ours.declared) != sorted((CHAINS[c][0], c) for c in want):
        problems.append(f"our chains declared: {sorted(ours.declared)}; planned: {sorted(want)}")
    if sorted((t, b, c) for t, b, c, _ in ours.jumps) != sorted((*CHAINS[c], c) for c in want):
        problems.append(f"jumps to our chains (table, base, chain, position): {ours.jumps}; expected one from each "
                        "base chain")
    if on_top and any(i != 0 for *_, i in ours.jumps):
        problems.append(f"a jump to our chains is not the first rule of its base chain: {ours.jumps}")
    for chain in sorted(set(want) | set(ours.rules)):
        got, expected = ours.rules.get(chain, []), want.get(chain, [])
        if got != expected:
            problems.append(f"{chain}: {len(got)} rules, {len(expected)} planned\n" + diff(expected, got))
    return problems


def compare(before: list[str], now: list[str], policies: bool = True) -> str:
    """How the foreign part of a save differs from a save taken before: per table that existed before, its lines
    (counters included; policy counters only when `policies`), and tables created since must hold nothing but
    their built-in chains with policy ACCEPT. "" when nothing differs."""
    old, new = blocks(before), blocks(now)
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            out.append(f"table {name} is gone")
            continue
        a, b = old.get(name), new[name]
        if a is None:
            extra = [ln for ln in b[1:-1] if not re.fullmatch(r":[A-Z]+ ACCEPT \[0:0\]", ln)]
            if extra:
                out.append(f"table {name} (created by the driver) holds more than built-in chains:\n"
                           + "\n".join(extra))
            continue
        if not policies:
            a, b = [_policy(ln) for ln in a], [_policy(ln) for ln in b]
        if a != b:
            out.append(f"table {name}:\n" + diff(a, b))
    return "\n".join(out)


def _policy(line: str) -> str:
    return re.sub(r" \[\d+:\d+\]$", "", line) if line.startswith(":") else line


def diff(a: list[str], b: list[str], limit: int = 80) -> str:
    lines = list(difflib.unified_diff(a, b, "before", "after", lineterm="", n=1))
    more = f"\n... {len(lines) - limit} more diff lines" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


# ---- what the driver applies -------------------------------------------------------------------------------


A = ipaddress.ip_address


@dataclass(frozen=True)
class Services:
    """A ProxyGroup replica's egress and ingress services (hundreds of mappings in each family) and an ingress
    proxy's TS_DEST_IP, as files and variables; `round` 1 differs from 0 in about half of them (services gone,
    targets and ports moved, new ones), 2 and 3 again."""

    round: int = 0
    egress_count: int = 120
    ingress_count: int = 150

    def egress(self) -> dict[str, Any]:
        r, out = self.round, {}
        for i in range(self.egress_count + 40 * (r % 2)):
            if r and i % 3 == r % 3:
                continue  # gone in this round
            fam = 4 if i % 2 == 0 else 6
            host = i + 1 + (1000 * r if i % 5 == 0 else 0)  # every fifth target moves from round to round
            ip = f"100.80.{host // 250}.{host % 250 + 1}" if fam == 4 else f"fd7a:115c:a1e0:ab12::{host:x}"
            port = 20000 + 2 * i
            ports = [{"protocol": "TCP", "matchPort": port, "targetPort": 8000 + r * (i % 7 == 0) + i % 11},
                     {"protocol": "udp", "matchPort": port + 1, "targetPort": 53}]
            out[f"svc-{i:03d}"] = {"tailnetTarget": {"ip": ip}, "ports": ports if i % 4 else ports[:1]}
        return out

    def ingress(self) -> dict[str, Any]:
        r, out = self.round, {}
        for i in range(self.ingress_count - 30 * (r % 2)):
            k = i + 7 * r  # the services' addresses shift from round to round
            out[f"svc:ing-{i:03d}"] = {
                "IPv4Mapping": {"TailscaleServiceIP": f"100.100.{k // 250}.{k % 250 + 1}",
                                "ClusterIP": f"10.96.{k // 250}.{k % 250 + 1}"},
                "IPv6Mapping": {"TailscaleServiceIP": f"fd7a:115c:a1e0::a:{k:x}", "ClusterIP": f"fd00:10:96::{k:x}"}}
        return out

    def dest_ip(self) -> str:
        return f"10.0.0.{5 + self.round}"

    def plan(self) -> Plan:
        """The rules these services make (containerboot/rules.py), written out independently."""
        rules: list[Rule] = [Dnat(A(TAILNET[4]), (A(self.dest_ip()),)), MssClamp(4)]
        for svc in self.egress().values():
            target = A(svc["tailnetTarget"]["ip"])
            for p in svc["ports"]:
                rules.append(PortMap(p["protocol"].lower(), p["matchPort"], target, p["targetPort"]))
            rules += [Snat(target, A(TAILNET[target.version])), MssClamp(target.version)]
        for svc in self.ingress().values():
            for key in ("IPv4Mapping", "IPv6Mapping"):
                m = svc[key]
                rules += [Dnat(A(m["TailscaleServiceIP"]), (A(m["ClusterIP"]),)), MssClamp(A(m["ClusterIP"]).version)]
        return Plan(frozenset(rules))

    def env(self, target: Target, lockfile: str) -> dict[str, str]:
        egress = target.write(f"round-{self.round}/egress/egress-services", json.dumps(self.egress()))
        ingress = target.write(f"round-{self.round}/ingress.json", json.dumps(self.ingress()))
        return {**driver_env(lockfile), "TS_DEST_IP": self.dest_ip(), "KUBERNETES_SERVICE_HOST": KUBE_API,
                "TS_KUBE_SECRET": "foreign-rules", "TS_EGRESS_PROXIES_CONFIG_PATH": os.path.dirname(egress),
                "TS_INGRESS_PROXIES_CONFIG_PATH": ingress}


def driver_env(lockfile: str) -> dict[str, str]:
    return {"TS_USERSPACE": "false", "TS_DEBUG_FIREWALL_MODE": "iptables", "XTABLES_LOCKFILE": lockfile}


def try_apply(target: Target, services: Services, lockfile: str) -> subprocess.CompletedProcess[str]:
    return target.containerboot("apply", "--tailnet-ip", TAILNET[4], "--tailnet-ip", TAILNET[6],
                                env=services.env(target, lockfile))


def apply(target: Target, services: Services, lockfile: str) -> str:
    proc = try_apply(target, services, lockfile)
    assert proc.returncode == 0, f"containerboot apply (round {services.round}): exit {proc.returncode}\n" \
                                 f"{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def flush(target: Target, lockfile: str) -> str:
    proc = target.containerboot("flush", env=driver_env(lockfile))
    assert proc.returncode == 0, f"containerboot flush: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr
