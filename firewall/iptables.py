"""iptables driver over python-iptables (legacy xtables, the kernel's ip_tables/ip6_tables).

Owned chains, each reached by one jump inserted at the top of its base chain:
  nat    PREROUTING  -> CONTAINERBOOT-PREROUTING   DNATs (ingress, round robin, egress)
  nat    POSTROUTING -> CONTAINERBOOT-POSTROUTING  SNATs
  mangle FORWARD     -> CONTAINERBOOT-FORWARD      MSS clamp both ways on the tunnel

An apply rewrites the owned chains and commits each table once (one IPT_SO_SET_REPLACE per table).

libxtables registers an extension only for the family current when its shared object is first
loaded, so one process cannot build IPv4 and IPv6 NAT rules (python-iptables reports "can't find
target DNAT" for the second family). Every kernel operation therefore runs in a forked child, one
per family, that reports back through a pipe; this process itself only imports the library.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from firewall.detect import KUBE_HINTS
from firewall.model import (
    Dnat,
    DnatNonTailnet,
    FirewallBusy,
    FirewallError,
    Foreign,
    MssClamp,
    Plan,
    Rule,
    Snat,
)

PRE, POST, FWD = "CONTAINERBOOT-PREROUTING", "CONTAINERBOOT-POSTROUTING", "CONTAINERBOOT-FORWARD"
# owned chain -> (table, base chain)
CHAINS = {PRE: ("nat", "PREROUTING"), POST: ("nat", "POSTROUTING"), FWD: ("mangle", "FORWARD")}
PROBE = "CONTAINERBOOT-PROBE"
NAMES_FILE = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}
LOCK_WAIT = 5.0  # how long a change waits for the xtables lock before giving up (and retrying later)

Params = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Spec:
    """One iptables rule in an owned chain, as plain data (what python-iptables reads and writes)."""

    chain: str
    target: str
    params: Params = ()
    dst: str | None = None
    iif: str | None = None  # "!name" inverts, as in python-iptables
    oif: str | None = None
    proto: str | None = None
    matches: tuple[tuple[str, Params], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Spec:
        def params(items: list[list[Any]]) -> Params:
            return tuple((k, tuple(v)) for k, v in items)

        return cls(**{**d, "params": params(d["params"]),
                      "matches": tuple((n, params(p)) for n, p in d["matches"])})

    def __str__(self) -> str:
        parts = [f"-A {self.chain}"]
        parts += [f"-d {self.dst}"] if self.dst else []
        parts += [f"-i {self.iif}"] if self.iif else []
        parts += [f"-o {self.oif}"] if self.oif else []
        parts += [f"-p {self.proto}"] if self.proto else []
        for name, params in self.matches:
            parts.append(f"-m {name} " + " ".join(f"--{k} {' '.join(v)}".strip() for k, v in params))
        parts.append(f"-j {self.target} " + " ".join(f"--{k} {' '.join(v)}".strip() for k, v in self.params))
        return " ".join(parts).strip()


def _p(**kw: str | tuple[str, ...]) -> Params:
    return tuple(sorted((k.replace("_", "-"), (v,) if isinstance(v, str) else v) for k, v in kw.items()))


_SYN = (("tcp", _p(tcp_flags=("SYN,RST", "SYN"))),)


def specs(rule: Rule) -> list[Spec]:
    """The iptables rules that render `rule`, in chain order (pure)."""
    match rule:
        case Dnat():
            m, to = str(rule.match), rule.to
            # Round robin as upstream's load balancer: "every n" for the last target down to 2, then the first.
            lb = [Spec(PRE, "DNAT", _p(to_destination=str(to[n - 1])), dst=m,
                       matches=(("statistic", _p(mode="nth", every=str(n), packet="0")),))
                  for n in range(len(to), 1, -1)]
            return [*lb, Spec(PRE, "DNAT", _p(to_destination=str(to[0])), dst=m)]
        case DnatNonTailnet():
            return [Spec(PRE, "DNAT", _p(to_destination=str(rule.to)), iif="!" + rule.iface)]
        case Snat():
            return [Spec(POST, "SNAT", _p(to_source=str(rule.to)), dst=str(rule.dst))]
        case MssClamp():
            clamp = _p(clamp_mss_to_pmtu=())
            return [Spec(FWD, "TCPMSS", clamp, oif=rule.iface, proto="tcp", matches=_SYN),
                    Spec(FWD, "TCPMSS", clamp, iif=rule.iface, proto="tcp", matches=_SYN)]
    return []


def render(plan: Plan, fam: int) -> list[Spec]:
    return [s for rule in plan.sorted(fam) for s in specs(rule)]


def _addr(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]")) if text else None
    except ValueError:
        return None


def _param(spec: Spec, key: str) -> str | None:
    values = dict(spec.params).get(key, ())
    return values[0] if len(values) == 1 else None


def _guess(fam: int, chain: list[Spec], i: int) -> tuple[Rule, int] | None:
    """The model rule that starts at chain[i], and how many specs it spans."""
    s = chain[i]
    if s.chain == PRE and s.target == "DNAT":
        to = _addr(_param(s, "to-destination"))
        if s.iif and s.iif.startswith("!") and to:
            return DnatNonTailnet(to, s.iif[1:]), 1
        match = _addr(s.dst)
        if not (to and match):
            return None
        every = dict(dict(s.matches).get("statistic", ())).get("every")
        n = int(every[0]) if every and every[0].isdigit() else 1
        group = chain[i:i + n]
        targets = [_addr(_param(g, "to-destination")) for g in group]
        if len(group) != n or not all(targets):
            return None
        ordered = [targets[-1], *reversed(targets[:-1])]
        return Dnat(match, tuple(t for t in ordered if t)), n
    if s.chain == POST and s.target == "SNAT":
        dst, src = _addr(s.dst), _addr(_param(s, "to-source"))
        return (Snat(dst, src), 1) if dst and src else None
    if s.chain == FWD and s.target == "TCPMSS" and s.oif:
        return MssClamp(fam, s.oif), 2
    return None


def parse(fam: int, chain_specs: Iterable[Spec]) -> set[Rule]:
    """Model rules from the specs found in the owned chains; anything else becomes `Foreign`."""
    found: set[Rule] = set()
    by_chain: dict[str, list[Spec]] = {}
    for s in chain_specs:
        by_chain.setdefault(s.chain, []).append(s)
    for chain in by_chain.values():
        i = 0
        while i < len(chain):
            guess = _guess(fam, chain, i)
            if guess is not None:
                rule, n = guess
                if rule.family == fam and specs(rule) == chain[i:i + n]:
                    found.add(rule)
                    i += n
                    continue
            found.add(Foreign(fam, str(chain[i])))
            i += 1
    return found


# ---- kernel access (in forked children) ------------------------------------------------------------


def legacy_tables(fam: int) -> set[str]:
    """Legacy tables instantiated in this network namespace (reading this file creates none)."""
    try:
        with open(NAMES_FILE[fam]) as f:
            return set(f.read().split())
    except OSError:
        return set()


def in_child(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a forked child and return its JSON-able result (or raise its error here)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's stack
        try:
            os.close(r)
            try:
                payload = {"ok": fn()}
            except Exception as exc:  # noqa: BLE001 - carried to the parent as text
                payload = {"error": f"{type(exc).__name__}: {exc}", "busy": isinstance(exc, FirewallBusy)}
            data = json.dumps(payload).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    try:
        with os.fdopen(r, "rb") as f:
            while chunk := f.read(1 << 16):
                chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    except BaseException:
        # Interrupted (a shutdown signal raised into a blocked read): the child must not outlive the call.
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        raise
    if not chunks:
        raise FirewallError(f"iptables worker died (wait status {status})")
    result = json.loads(b"".join(chunks))
    if "error" in result:
        error = FirewallBusy if result.get("busy") else FirewallError
        raise error(f"iptables (legacy): {result['error']}")
    return result["ok"]


def _iptc(fam: int, tables: Iterable[str] = ()) -> tuple[Any, Any, Any]:
    """python-iptables classes for `fam`, allowed to open only the tables that exist or are `tables`.

    (To tell a chain target from an extension, python-iptables opens every table, and opening a
    legacy table creates it in the kernel; its answer cache keeps it from opening the others.)"""
    import iptc

    table_cls = iptc.Table if fam == 4 else iptc.Table6
    allowed = legacy_tables(fam) | set(tables)
    for name in table_cls.ALL:
        table_cls.existing_table_names[name] = name in allowed
    return (table_cls, iptc.Rule if fam == 4 else iptc.Rule6, iptc.Chain)


def _read_spec(chain: str, rule: Any) -> Spec:
    def net(text: str | None) -> str | None:
        """python-iptables gives "a/mask"; ours are single addresses, "any" is no match at all."""
        if not text:
            return None
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return text
        if network.prefixlen == 0:
            return None
        return str(network.network_address) if network.num_addresses == 1 else str(network)

    def params(ext: Any) -> Params:
        return tuple(sorted((k, tuple(v)) for k, v in ext.get_all_parameters().items()))

    dst = net(rule.dst)
    proto = rule.protocol if rule.protocol not in (None, "ip", "ipv6", "all", "0") else None
    return Spec(chain, rule.target.name if rule.target else "", params(rule.target) if rule.target else (),
                dst, rule.in_interface, rule.out_interface, proto,
                tuple((m.name, params(m)) for m in rule.matches))


def _build(rule_cls: Any, spec: Spec) -> Any:
    r = rule_cls()
    if spec.dst:
        r.dst = spec.dst
    if spec.iif:
        r.in_interface = spec.iif
    if spec.oif:
        r.out_interface = spec.oif
    if spec.proto:
        r.protocol = spec.proto
    for name, params in spec.matches:
        m = r.create_match(name)
        for k, v in params:
            m.set_parameter(k, list(v) if len(v) > 1 else (v[0] if v else ""))
    t = r.create_target(spec.target)
    for k, v in spec.params:
        t.set_parameter(k, list(v) if len(v) > 1 else (v[0] if v else ""))
    return r


def _jumps(chain: Any, target: str) -> list[Any]:
    return [r for r in chain.rules if r.target and r.target.name == target]


@contextlib.contextmanager
def xtables_lock(wait: float = LOCK_WAIT) -> Iterator[None]:
    """The lock the iptables tools take with --wait (tailscaled's do), so that our read-modify-commit
    of a table and theirs do not interleave. libiptc itself takes none. Unlike `iptables --wait`, the
    wait is bounded: a lock held for ever must not hold the boot for ever (FirewallBusy: retry later)."""
    path = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        yield  # no writable /run: nothing else can be holding it either
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FirewallBusy(f"another process has held the xtables lock {path} for more than "
                                       f"{wait:g}s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _write(fam: int, wanted: list[dict[str, Any]], wait: float = LOCK_WAIT) -> None:
    """Child: make the owned chains hold exactly `wanted` (or remove them all when it is empty)."""
    with xtables_lock(wait):
        _write_locked(fam, wanted)


def _write_locked(fam: int, wanted: list[dict[str, Any]]) -> None:
    want = [Spec.from_json(w) for w in wanted]
    table_cls, rule_cls, chain_cls = _iptc(fam, ("nat", "mangle") if want else ())
    rules = [(s.chain, _build(rule_cls, s)) for s in want]  # parse everything before touching the kernel
    present = legacy_tables(fam)
    for table_name in ("nat", "mangle"):
        owned = [c for c, (t, _) in CHAINS.items() if t == table_name]
        if not want and table_name not in present:
            continue  # nothing to remove, and opening the table would create it
        table = table_cls(table_name)
        table.autocommit = False
        table.refresh()
        for own in owned:
            base = chain_cls(table, CHAINS[own][1])
            needed = bool(want)
            jumps = _jumps(base, own)
            for extra in jumps[1 if needed else 0:]:
                base.delete_rule(extra)
            if table.is_chain(own):
                chain_cls(table, own).flush()
            if not needed:
                if table.is_chain(own):
                    table.delete_chain(own)
                continue
            if not table.is_chain(own):
                table.create_chain(own)
            chain = chain_cls(table, own)
            for c, r in rules:
                if c == own:
                    chain.append_rule(r)
            if not jumps:
                jump = _build(rule_cls, Spec(own, own))
                base.insert_rule(jump, 0)
        table.commit()
        table.refresh()


def _read(fam: int) -> list[dict[str, Any]]:
    """Child: the specs in owned chains that are reachable from their base chain."""
    table_cls, _, chain_cls = _iptc(fam)
    out: list[Spec] = []
    present = legacy_tables(fam)
    for own, (table_name, base) in CHAINS.items():
        if table_name not in present:
            continue
        table = table_cls(table_name)
        table.refresh()
        if not table.is_chain(own):
            continue
        jumps = len(_jumps(chain_cls(table, base), own))
        if jumps == 0:
            continue
        if jumps > 1:
            out.append(Spec(base, own, (("duplicate jumps", (str(jumps),)),)))
        out += [_read_spec(own, r) for r in chain_cls(table, own).rules]
    return [s.to_json() for s in out]


def _probe(fam: int) -> None:
    """Child: create and delete an owned chain in `nat` (fails without ip_tables NAT)."""
    with xtables_lock():
        _probe_locked(fam)


def _probe_locked(fam: int) -> None:
    table_cls, _, _ = _iptc(fam, ("nat",))
    table = table_cls("nat")
    table.autocommit = False
    table.refresh()
    if table.is_chain(PROBE):
        table.delete_chain(PROBE)
    table.create_chain(PROBE)
    table.commit()
    table.refresh()
    table.delete_chain(PROBE)
    table.commit()


def _census(fam: int) -> dict[str, Any]:
    """Child: rules (not ours) and kube-proxy hint chains in the legacy tables that already exist."""
    table_cls, _, chain_cls = _iptc(fam)
    rules, hints = 0, []
    for name in sorted(legacy_tables(fam)):
        table = table_cls(name)
        table.refresh()
        for chain in table.chains:
            if chain.name in KUBE_HINTS:
                hints.append(f"{name}/{chain.name}")
            if chain.name in CHAINS or chain.name == PROBE:
                continue
            rules += sum(1 for r in chain.rules if not (r.target and r.target.name in CHAINS))
    return {"rules": rules, "hints": hints}


def census(fam: int) -> dict[str, Any]:
    if not legacy_tables(fam):
        return {"rules": 0, "hints": []}
    result: dict[str, Any] = in_child(lambda: _census(fam))
    return result


class IptablesDriver:
    name = "iptables"

    def __init__(self, families: Iterable[int] = (4, 6)) -> None:
        import iptc  # noqa: F401 - load the library here so that children never import

        self.families = tuple(sorted(set(families)))
        self.lock_wait = LOCK_WAIT  # a shutdown lowers it: the rules go if they can go quickly

    def apply(self, plan: Plan, full: bool = True) -> None:
        """Always rewrites the owned chains whole (`full` is accepted for the common interface)."""
        extra = plan.families() - set(self.families)
        if extra:
            raise FirewallError(f"iptables: no usable IPv{min(extra)} NAT (ip6_tables) in this kernel")
        for fam in self.families:
            wanted = [s.to_json() for s in render(plan, fam)]
            in_child(lambda fam=fam, wanted=wanted: _write(fam, wanted, self.lock_wait))  # type: ignore[misc]

    def flush(self) -> None:
        for fam in self.families:
            in_child(lambda fam=fam: _write(fam, [], self.lock_wait))  # type: ignore[misc]

    def installed(self) -> Plan:
        rules: set[Rule] = set()
        for fam in self.families:
            if legacy_tables(fam) & {"nat", "mangle"}:
                raw = in_child(lambda fam=fam: _read(fam))  # type: ignore[misc]
                rules |= parse(fam, [Spec.from_json(d) for d in raw])
        return Plan.read_back(rules)

    def probe(self, fam: int) -> None:
        in_child(lambda: _probe(fam))
