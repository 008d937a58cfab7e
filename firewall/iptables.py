"""iptables driver: legacy xtables (the kernel's ip_tables/ip6_tables), written as the kernel holds it.

Owned chains, each reached by one jump inserted at the top of its base chain:
  nat    PREROUTING  -> CONTAINERBOOT-PREROUTING   DNATs (ingress, round robin, egress, egress services)
  nat    POSTROUTING -> CONTAINERBOOT-POSTROUTING  SNATs
  mangle FORWARD     -> CONTAINERBOOT-FORWARD      MSS clamp both ways on the tunnel

A plan becomes `Spec`s (one per iptables rule, printed the way iptables-save prints it), and each
Spec the kernel's entry bytes (`encode`). A `Server` per family (firewall/iptables_kernel.py, in this
process) splices them into the table and commits it (one IPT_SO_SET_REPLACE per table, as
iptables-legacy-restore does) and reads the owned chains back, as bytes that `decode` turns into
Specs again. python-iptables built each rule as a graph of ctypes objects through libxtables: about
170 µs a rule, 60x iptables-legacy-restore at 10,000 rules; and libxtables cannot hold both
families' extensions in one process, which is why it had to fork per call. (A worker interpreter per
family came next; the container's memory paid 12 MB for each: see iptables_kernel.py.)
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from firewall import xtables
from firewall.iptables_kernel import ReadBack, Server, Tables, kernel_errors
from firewall.model import (
    TUN,
    Dnat,
    DnatNonTailnet,
    FirewallBusy,
    FirewallError,
    Foreign,
    MssClamp,
    Plan,
    PortMap,
    Rule,
    Snat,
    addr_text,
    rule_order,
)

PRE, POST, FWD = "CONTAINERBOOT-PREROUTING", "CONTAINERBOOT-POSTROUTING", "CONTAINERBOOT-FORWARD"
# owned chain -> (table, base chain)
CHAINS = {PRE: ("nat", "PREROUTING"), POST: ("nat", "POSTROUTING"), FWD: ("mangle", "FORWARD")}
OWNED = {"nat": {PRE: "PREROUTING", POST: "POSTROUTING"}, "mangle": {FWD: "FORWARD"}}
PROBE = "CONTAINERBOOT-PROBE"
LOCK_WAIT = 5.0  # how long a change waits for the xtables lock before giving up (and retrying later)


@dataclass(frozen=True)
class Spec:
    """One iptables rule in an owned chain (only the shapes this program writes)."""

    chain: str
    target: str  # DNAT, SNAT or TCPMSS
    to: str = ""  # the DNAT or SNAT address
    dst: str = ""  # -d, one address
    iif: str = ""  # -i; "!" first inverts
    oif: str = ""  # -o
    syn: bool = False  # -p tcp -m tcp --tcp-flags SYN,RST SYN
    every: int = 0  # -m statistic --mode nth --every N --packet 0
    proto: str = ""  # with dport: -p tcp|udp -m tcp|udp --dport N
    dport: int = 0
    to_port: int = 0  # the DNAT's port (--to-destination address:port)

    def __str__(self) -> str:
        """As iptables-save prints it."""
        out = [f"-A {self.chain}"]
        if self.dst:
            out.append(f"-d {self.dst}/{128 if ':' in self.dst else 32}")
        if self.iif:
            out.append(f"! -i {self.iif[1:]}" if self.iif.startswith("!") else f"-i {self.iif}")
        if self.oif:
            out.append(f"-o {self.oif}")
        if self.syn:
            out.append("-p tcp -m tcp --tcp-flags SYN,RST SYN")
        if self.dport:
            out.append(f"-p {self.proto} -m {self.proto} --dport {self.dport}")
        if self.every:
            out.append(f"-m statistic --mode nth --every {self.every} --packet 0")
        out.append(f"-j {self.target}")
        to = self.to
        if self.to_port:
            to = f"[{to}]:{self.to_port}" if ":" in to else f"{to}:{self.to_port}"
        out.append({"DNAT": f"--to-destination {to}", "SNAT": f"--to-source {to}",
                    "TCPMSS": "--clamp-mss-to-pmtu"}.get(self.target, ""))
        return " ".join(out).strip()


def specs(rule: Rule) -> list[Spec]:
    """The iptables rules that render `rule`, in chain order (pure)."""
    match rule:
        case Dnat():
            m, to = addr_text(rule.match), rule.to
            # Round robin as upstream's load balancer: "every n" for the last target down to 2, then the first.
            lb = [Spec(PRE, "DNAT", addr_text(to[n - 1]), dst=m, every=n) for n in range(len(to), 1, -1)]
            return [*lb, Spec(PRE, "DNAT", addr_text(to[0]), dst=m)]
        case DnatNonTailnet():
            return [Spec(PRE, "DNAT", addr_text(rule.to), iif="!" + rule.iface)]
        case PortMap():
            return [Spec(PRE, "DNAT", addr_text(rule.to), iif="!" + rule.iface, proto=rule.proto, dport=rule.port,
                         to_port=rule.to_port)]
        case Snat():
            return [Spec(POST, "SNAT", addr_text(rule.to), dst=addr_text(rule.dst))]
        case MssClamp():
            return [Spec(FWD, "TCPMSS", oif=rule.iface, syn=True), Spec(FWD, "TCPMSS", iif=rule.iface, syn=True)]
    return []


def render(plan: Plan, fam: int) -> list[Spec]:
    return [s for rule in plan.sorted(fam) for s in specs(rule)]


# ---- Spec <-> the kernel's entry (pure) -----------------------------------------------------------------

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
FULL = {4: b"\xff" * 4, 6: b"\xff" * 16}
INV_VIA_IN, IP6T_F_PROTO, TCP, UDP = 0x01, 0x01, 6, 17
PROTO = {"tcp": TCP, "udp": UDP}
MAP_IPS, PROTO_SPECIFIED = 1, 2  # NF_NAT_RANGE_* flags: the range has addresses; it has ports too
# DNAT and SNAT of one address, by revision: 0 (IPv4 only) struct nf_nat_ipv4_multi_range_compat, 1 struct
# nf_nat_range (Linux 3.7), 2 struct nf_nat_range2 (Linux 4.19). iptables-save prints a rule only in the
# revision its iptables would write, the newest both it and the kernel have; for iptables 1.8 that is DNAT 2
# (0 or 1 where the kernel is older) and SNAT 0 (IPv4) or 1 (IPv6). We write the same.
NAT_RANGE = {0: struct.Struct("=II4s4sHH"), 1: struct.Struct("=I16s16sHH"), 2: struct.Struct("=I16s16sHHH")}
DNAT_REVISIONS = {4: [2, 0], 6: [2, 1]}  # asked of the kernel in this order
SNAT_REVISION = {4: 0, 6: 1}
TCP_MATCH = struct.Struct("=HHHHBBBB")  # struct xt_tcp: spts[2], dpts[2], option, flg_mask, flg_cmp, invflags
UDP_MATCH = struct.Struct("=HHHHB")  # struct xt_udp: spts[2], dpts[2], invflags
SYN_MATCH = xtables.ext("tcp", TCP_MATCH.pack(0, 0xFFFF, 0, 0xFFFF, 0, 0x06, 0x02, 0))


def port_match(proto: str, port: int) -> bytes:
    """-m tcp|udp --dport `port` (the ports in host order, as xt_tcp and xt_udp hold them)."""
    if proto == "tcp":
        return xtables.ext("tcp", TCP_MATCH.pack(0, 0xFFFF, port, port, 0, 0, 0, 0))
    return xtables.ext("udp", UDP_MATCH.pack(0, 0xFFFF, port, port, 0))
CLAMP = xtables.ext("TCPMSS", struct.pack("=H", 0xFFFF))  # XT_TCPMSS_CLAMP_PMTU


def _iface(name: str) -> tuple[bytes, bytes]:
    """(name, mask) as iptables stores `-i name`: the mask covers the name and its NUL."""
    raw = name.encode()
    return raw.ljust(16, b"\0"), (b"\xff" * (len(raw) + 1) if raw else b"").ljust(16, b"\0")


def encode(fam: int, spec: Spec, dnat: int = 2) -> bytes:
    """The kernel's entry for `spec`, with DNAT in revision `dnat`."""
    lay = xtables.LAYOUT[fam]
    zero = bytes(lay.addr_len)
    dst = socket.inet_pton(AF[fam], spec.dst) if spec.dst else zero
    iif, iif_mask = _iface(spec.iif.lstrip("!"))
    oif, oif_mask = _iface(spec.oif)
    inv = INV_VIA_IN if spec.iif.startswith("!") else 0
    proto = TCP if spec.syn else PROTO[spec.proto] if spec.dport else 0
    if fam == 4:
        ip = lay.ip.pack(zero, dst, zero, FULL[4] if spec.dst else zero, iif, oif, iif_mask, oif_mask, proto, 0, inv)
    else:
        flags = IP6T_F_PROTO if proto else 0
        ip = lay.ip.pack(zero, dst, zero, FULL[6] if spec.dst else zero, iif, oif, iif_mask, oif_mask, proto, 0,
                         flags, inv)
    matches = SYN_MATCH if spec.syn else b""
    if spec.dport:
        matches += port_match(spec.proto, spec.dport)
    if spec.every:
        matches += xtables.ext("statistic", struct.pack("=HHIIIQ", 1, 0, spec.every - 1, 0, 0, 0))
    if spec.target == "TCPMSS":
        target = CLAMP
    else:
        to = socket.inet_pton(AF[fam], spec.to)
        nat = dnat if spec.target == "DNAT" else SNAT_REVISION[fam]
        # One address, and one port where one is given (in network order, as struct nf_nat_range holds it).
        flags = MAP_IPS | (PROTO_SPECIFIED if spec.to_port else 0)
        port = socket.htons(spec.to_port)
        if nat == 0:  # one range (rangesize 1)
            data = NAT_RANGE[0].pack(1, flags, to, to, port, port)
        else:
            data = NAT_RANGE[nat].pack(flags, to, to, port, port, *(0,) * (nat - 1))
        target = xtables.ext(spec.target, data, revision=nat)
    return lay.entry(ip, matches, target)


class DnatEntries:
    """encode() of single-target DNATs, the rules there are thousands of, by splicing the two addresses
    into a template: 0.5 µs a rule instead of 4 (tests hold it equal to encode)."""

    def __init__(self, fam: int, dnat: int) -> None:
        lay = xtables.LAYOUT[fam]
        self.n = n = lay.addr_len
        sample = "::1" if fam == 6 else "0.0.0.1"
        t = encode(fam, Spec(PRE, "DNAT", sample, dst=sample), dnat)
        self.to = to = lay.size + xtables.HDR + (8 if dnat == 0 else 4)  # after (rangesize and) flags
        self.to2 = to2 = to + (n if dnat == 0 else 16)  # the range's upper end, the same address
        self.parts = (t[:n], t[2 * n:to], t[to + n:to2], t[to2 + n:])
        self.size = len(t)
        self.address = ipaddress.IPv6Address if fam == 6 else ipaddress.IPv4Address

    def __call__(self, rule: Dnat) -> bytes:
        a, b, c, d = self.parts
        to = rule.to[0].packed
        return b"".join((a, rule.match.packed, b, to, c, to, d))

    def parse(self, entry: bytes) -> Dnat | None:
        """The single-target DNAT `entry` encodes, when it is one (decode() and parse() do the rest)."""
        a, b, c, d = self.parts
        n, to, to2 = self.n, self.to, self.to2
        if len(entry) != self.size or entry[:n] != a or entry[2 * n:to] != b or entry[to + n:to2] != c \
                or entry[to2 + n:] != d or entry[to:to + n] != entry[to2:to2 + n]:
            return None
        return Dnat(self.address(entry[n:2 * n]), (self.address(entry[to:to + n]),))


class PortEntries:
    """encode() of PortMaps of one protocol not from one interface, the other rule there are thousands of:
    the port, address and port spliced into a template, each twice (a range of one), as DnatEntries does
    (tests hold it equal to encode)."""

    def __init__(self, fam: int, dnat: int, proto: str, iface: str) -> None:
        lay = xtables.LAYOUT[fam]
        self.n = n = lay.addr_len
        self.proto, self.iface = proto, iface
        sample = "::1" if fam == 6 else "0.0.0.1"
        t = encode(fam, Spec(PRE, "DNAT", sample, iif="!" + iface, proto=proto, dport=1, to_port=1), dnat)
        dport = lay.size + xtables.HDR + 4  # the match's dpts[2], after spts[2]
        to = lay.size + len(port_match(proto, 1)) + xtables.HDR + (8 if dnat == 0 else 4)
        to2 = to + (n if dnat == 0 else 16)
        port = to2 + (n if dnat == 0 else 16)  # min_proto, max_proto
        self.at = (dport, to, to2, port)
        self.parts = (t[:dport], t[dport + 4:to], t[to + n:to2], t[to2 + n:port], t[port + 4:])
        self.size = len(t)
        self.address = ipaddress.IPv6Address if fam == 6 else ipaddress.IPv4Address
        self.ports = struct.Struct("=HH")  # dpts: host order
        self.nat_ports = struct.Struct("!HH")  # min_proto, max_proto: network order

    def __call__(self, rule: PortMap) -> bytes:
        a, b, c, d, e = self.parts
        to = rule.to.packed
        return b"".join((a, self.ports.pack(rule.port, rule.port), b, to, c, to, d,
                         self.nat_ports.pack(rule.to_port, rule.to_port), e))

    def parse(self, entry: bytes) -> PortMap | None:
        """The PortMap `entry` encodes, when it is one with this template's protocol and interface."""
        a, b, c, d, e = self.parts
        n, (dport, to, to2, port) = self.n, self.at
        if len(entry) != self.size or entry[:dport] != a or entry[dport + 4:to] != b or entry[to + n:to2] != c \
                or entry[to2 + n:port] != d or entry[port + 4:] != e or entry[to:to + n] != entry[to2:to2 + n]:
            return None
        p1, p2 = self.ports.unpack_from(entry, dport)
        t1, t2 = self.nat_ports.unpack_from(entry, port)
        if p1 != p2 or t1 != t2 or not p1 or not t1:
            return None
        return PortMap(self.proto, p1, self.address(entry[to:to + n]), t1, self.iface)


def chain_entries(plan: Plan, fam: int, dnat: int = 2) -> dict[str, list[bytes]]:
    """The entries of each owned chain for the rules of `fam`, in chain order (what render() and encode()
    give, without building a Spec for each single-target DNAT or PortMap)."""
    out: dict[str, list[bytes]] = {chain: [] for chain in CHAINS}
    rules = plan.only(fam).rules
    fast, pre = DnatEntries(fam, dnat), out[PRE]
    dnats = [r for r in rules if isinstance(r, Dnat)]
    for dnat_rule in sorted(dnats, key=lambda r: int(r.match)):
        if len(dnat_rule.to) == 1:
            pre.append(fast(dnat_rule))
        else:
            pre.extend(encode(fam, spec, dnat) for spec in specs(dnat_rule))
    for rule in sorted((r for r in rules if not isinstance(r, Dnat | PortMap)), key=rule_order):
        for spec in specs(rule):
            out[spec.chain].append(encode(fam, spec, dnat))
    # PortMaps last in PREROUTING: after every other DNAT in the model's order (rule_order).
    ports: dict[tuple[str, str], PortEntries] = {}
    for pm in sorted((r for r in rules if type(r) is PortMap), key=lambda r: (r.proto, r.port)):
        template = ports.get((pm.proto, pm.iface))
        if template is None:
            template = ports[(pm.proto, pm.iface)] = PortEntries(fam, dnat, pm.proto, pm.iface)
        pre.append(template(pm))
    return out


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _name(entry: bytes, at: int) -> tuple[str, int]:
    """A match's or target's name and revision."""
    return _cstr(entry[at + 2:at + 31]), entry[at + 31]


def decode(fam: int, chain: str, entry: bytes) -> Spec | None:
    """The Spec that encodes to exactly `entry`, or None (an entry this program does not write)."""
    try:
        spec, nat = _guess_spec(fam, chain, entry)
        return spec if spec is not None and encode(fam, spec, nat) == entry else None
    except (struct.error, OSError, ValueError, KeyError, IndexError):
        return None


def _guess_spec(fam: int, chain: str, entry: bytes) -> tuple[Spec | None, int]:
    """The Spec `entry` would be if it is one of ours, and its DNAT revision; decode() checks by encoding."""
    lay = xtables.LAYOUT[fam]
    fields = lay.ip.unpack_from(entry)
    dst, iif, oif, inv = fields[1], fields[4], fields[5], fields[-1]
    target_at = struct.unpack_from("=H", entry, lay.offsets_at)[0]
    target, revision = _name(entry, target_at)
    syn, every, proto, dport, at = False, 0, "", 0, lay.size
    while at < target_at:
        name, _ = _name(entry, at)
        if name in ("tcp", "udp"):
            _, _, dport_min, _, *rest = (TCP_MATCH if name == "tcp" else UDP_MATCH).unpack_from(entry, at + xtables.HDR)
            syn = name == "tcp" and rest[1] != 0  # a flag mask: --tcp-flags
            if dport_min:
                proto, dport = name, dport_min
        elif name == "statistic":
            every = struct.unpack_from("=I", entry, at + xtables.HDR + 4)[0] + 1
        at += struct.unpack_from("=H", entry, at)[0] or len(entry)
    to, to_port = "", 0
    if target in ("DNAT", "SNAT"):
        flags_at = target_at + xtables.HDR + (4 if revision == 0 else 0)  # after rangesize
        at = flags_at + 4
        to = socket.inet_ntop(AF[fam], entry[at:at + lay.addr_len])
        if struct.unpack_from("=I", entry, flags_at)[0] & PROTO_SPECIFIED:  # the port after both addresses
            to_port = socket.ntohs(struct.unpack_from("=H", entry, at + 2 * (4 if revision == 0 else 16))[0])
    elif target != "TCPMSS":
        return None, 0
    spec = Spec(chain, target, to, socket.inet_ntop(AF[fam], dst) if any(dst) else "",
                ("!" if inv & INV_VIA_IN else "") + _cstr(iif), _cstr(oif), syn, every, proto, dport, to_port)
    return spec, revision if target == "DNAT" else 2


def describe(fam: int, chain: str, entry: bytes) -> str:
    """Some words for an entry that is not ours: its matches and target."""
    lay = xtables.LAYOUT[fam]
    target_at = struct.unpack_from("=H", entry, lay.offsets_at)[0]
    names, at = [], lay.size
    while at < target_at:
        names.append(f"-m {_name(entry, at)[0]}")
        at += struct.unpack_from("=H", entry, at)[0] or len(entry)
    target = _name(entry, target_at)[0] if target_at + xtables.HDR <= len(entry) else "?"
    return " ".join([f"-A {chain}", *names, f"-j {target or 'a jump'}", f"({len(entry)} bytes)"])


# ---- reading back (pure) --------------------------------------------------------------------------------


def _addr(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text) if text else None
    except ValueError:
        return None


def _guess(fam: int, chain: list[Spec], i: int) -> tuple[Rule, int] | None:
    """The model rule that starts at chain[i], and how many specs it spans."""
    s = chain[i]
    if s.chain == PRE and s.target == "DNAT":
        to = _addr(s.to)
        if s.dport and s.iif.startswith("!") and to:
            return PortMap(s.proto, s.dport, to, s.to_port, s.iif[1:]), 1
        if s.iif.startswith("!") and to:
            return DnatNonTailnet(to, s.iif[1:]), 1
        match = _addr(s.dst)
        if not (to and match):
            return None
        n = s.every or 1
        group = chain[i:i + n]
        targets = [_addr(g.to) for g in group]
        if len(group) != n or not all(targets):
            return None
        ordered = [targets[-1], *reversed(targets[:-1])]
        return Dnat(match, tuple(t for t in ordered if t)), n
    if s.chain == POST and s.target == "SNAT":
        dst, src = _addr(s.dst), _addr(s.to)
        return (Snat(dst, src), 1) if dst and src else None
    if s.chain == FWD and s.target == "TCPMSS" and s.oif:
        return MssClamp(fam, s.oif), 2
    return None


def parse(fam: int, chain_specs: Iterable[Spec | Foreign]) -> set[Rule]:
    """Model rules from the specs found in the owned chains; anything else becomes `Foreign`."""
    found: set[Rule] = set()
    by_chain: dict[str, list[Spec]] = {}
    for s in chain_specs:
        if isinstance(s, Foreign):
            found.add(s)
        else:
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


def read_back(fam: int, chains: dict[str, tuple[int, list[bytes]]]) -> set[Rule]:
    """The rules in the owned chains a worker read (chain -> (jumps from its base chain, entries)).

    A single-target DNAT, or a PortMap not from tailscale0, is read straight from its bytes (3 µs, not the
    15 of decode() and parse()), unless it follows a round-robin entry, whose group it may close."""
    items: list[Spec | Foreign] = []
    quick: set[Rule] = set()
    templates = {rev: DnatEntries(fam, rev) for rev in DNAT_REVISIONS[fam]}
    size = xtables.LAYOUT[fam].size
    target_at = size + len(port_match("tcp", 1))  # the same for udp
    port_templates = {(proto.encode(), rev): PortEntries(fam, rev, proto, TUN)
                      for proto in PROTO for rev in DNAT_REVISIONS[fam]}
    for chain, (jumps, entries) in chains.items():
        if jumps > 1:
            items.append(Foreign(fam, f"{jumps} jumps from {CHAINS[chain][1]} to {chain}"))
        in_group = False
        for entry in entries:
            template: DnatEntries | PortEntries | None = None
            if chain == PRE and not in_group:
                template = templates.get(entry[size + 31])
                if entry[size + 2:size + 6] in (b"tcp\0", b"udp\0") and len(entry) > target_at + 31:
                    template = port_templates.get((entry[size + 2:size + 5], entry[target_at + 31]), template)
            rule = template.parse(entry) if template is not None else None
            if rule is not None:
                quick.add(rule)
                continue
            spec = decode(fam, chain, entry)
            in_group = spec is not None and spec.every > 0
            items.append(spec if spec is not None else Foreign(fam, describe(fam, chain, entry)))
    return parse(fam, items) | quick


# ---- the driver -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def xtables_lock(wait: float) -> Iterator[None]:
    """The lock the iptables tools take with --wait (tailscaled's do), so that our read-modify-commit
    of a table and theirs do not interleave; the kernel takes none across the two. Held here, around
    both families' commits. Unlike `iptables --wait`, the wait is bounded: a lock held for ever must
    not hold the boot for ever (FirewallBusy: retry later)."""
    path = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        yield  # no writable /run: nothing else can be holding it either
        return
    try:
        deadline, pause = time.monotonic() + wait, 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FirewallBusy(f"another process has held the xtables lock {path} for more than "
                                       f"{wait:g}s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
        yield
    finally:
        os.close(fd)


def legacy_tables(fam: int) -> set[str]:
    """Legacy tables instantiated in this network namespace (reading this creates none)."""
    return xtables.tables(fam)


T = TypeVar("T")


class IptablesDriver:
    name = "iptables"

    def __init__(self, families: Iterable[int] = (4, 6), lock_wait: float = LOCK_WAIT) -> None:
        self.families = tuple(sorted(set(families)))
        self.lock_wait = lock_wait  # a shutdown lowers it: the rules go if they can go quickly
        self.servers = {fam: Server(fam) for fam in self.families}
        # Per family, what the kernel held when its server last reported: (the version it gave that content,
        # the rules). A read that finds the same version costs no parse.
        self._known: dict[int, tuple[int, Plan]] = {}
        self._together: tuple[tuple[Plan, ...], Plan] | None = None  # the families' plans, and their union
        self._dnat: dict[int, int] = {}

    def _call(self, fams: Iterable[int], request: Callable[[int, Server], T]) -> dict[int, T]:
        """`request(fam, server)` for each family; every family is asked even when one fails (the first error
        is raised)."""
        results: dict[int, T] = {}
        error: BaseException | None = None
        for fam in fams:
            try:
                with kernel_errors():
                    results[fam] = request(fam, self.servers[fam])
            except BaseException as exc:  # what the kernel holds is unknown now: read it whole next time
                self._known.pop(fam, None)
                error = error or exc
        if error is not None:
            raise error
        return results

    def _dnat_revisions(self, fams: Iterable[int]) -> dict[int, int]:
        """The DNAT revision each family's rules are written in, asked of the kernel once."""
        ask = [fam for fam in fams if fam not in self._dnat]
        if ask:
            for fam, rev in self._call(ask, lambda fam, server: server.revision("DNAT", DNAT_REVISIONS[fam])).items():
                self._dnat[fam] = DNAT_REVISIONS[fam][0] if rev is None else rev
        return self._dnat

    def _write(self, plan: Plan | None) -> None:
        tables: dict[int, Tables] = {}
        dnat = self._dnat_revisions(f for f in self.families if plan is not None and plan.only(f).rules)
        for fam in self.families:
            want = chain_entries(plan, fam, dnat[fam]) if plan is not None and plan.only(fam).rules else None
            tables[fam] = {table: {chain: (base, want[chain] if want else None) for chain, base in owned.items()}
                           for table, owned in OWNED.items()}

        def write(fam: int, server: Server) -> int:
            return server.write(tables[fam])

        if plan is None and not any(xtables.tables(fam) for fam in self.families):
            replies = self._call(self.families, write)  # nothing to remove, and nothing is created: no lock needed
        else:
            with xtables_lock(self.lock_wait):
                replies = self._call(self.families, write)
        for fam, version in replies.items():
            self._known[fam] = (version, plan.only(fam) if plan is not None else Plan())
        self._together = (tuple(self._known[fam][1] for fam in self.families), plan or Plan())

    def apply(self, plan: Plan, full: bool = True) -> None:
        """Rewrites the owned chains whole each time (`full` is accepted for the common interface)."""
        # By the plan's cached family split: plan.families() asks each rule its family (13 ms at 10,000).
        extra = [fam for fam in (4, 6) if fam not in self.families and plan.only(fam).rules]
        if extra:
            raise FirewallError(f"iptables: no usable IPv{min(extra)} NAT (ip6_tables) in this kernel")
        self._write(plan)

    def flush(self) -> None:
        self._write(None)

    def installed(self) -> Plan:
        """What the owned chains hold. Each server compares its tables with what it last reported (a read
        and a comparison: no parse) and only says "same" when nothing changed."""
        def read(fam: int, server: Server) -> ReadBack:
            return server.read(OWNED, self._known.get(fam, (-1, Plan()))[0])

        plans = []
        for fam, reply in self._call(self.families, read).items():
            if not reply.same:
                found = Plan.read_back(read_back(fam, reply.chains))
                before = self._known.get(fam)
                if before is not None and before[1] == found:
                    found = before[1]  # the same object again: the caller's `found == applied` is then instant
                self._known[fam] = (reply.version, found)
            plans.append(self._known[fam][1])
        if self._together is None or any(a is not b for a, b in zip(self._together[0], plans, strict=True)):
            full = [p for p in plans if p.rules]
            union = full[0] if len(full) == 1 else Plan.read_back(r for p in full for r in p.rules)
            self._together = (tuple(plans), union)
        return self._together[1]

    def probe(self, fam: int) -> None:
        """Create and delete an owned chain in `nat`: fails without ip_tables NAT or without the rights."""
        with xtables_lock(self.lock_wait):
            self._call([fam], lambda _, server: server.probe(PROBE))

    def census(self) -> list[tuple[int, str, str, int]]:
        """(family, table, chain, rules) for every chain not ours in the legacy tables that exist."""
        skip = [*CHAINS, PROBE]
        found = self._call([f for f in self.families if xtables.tables(f)], lambda _, server: server.census(skip))
        return [(fam, *row) for fam, rows in found.items() for row in rows]

    def close(self) -> None:
        for server in self.servers.values():
            server.kernel.close()
