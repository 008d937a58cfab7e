"""iptables rules as the kernel's entries, and back: `encode` and `decode` of a Spec in the bytes of
struct ipt_entry / ip6t_entry with its matches and target, templates for the rules there are thousands
of (`DnatEntries`, `PortEntries`), and the owned chains of a plan (`chain_entries`) or read from the
kernel (`read_back`); pure.

Apart from the Specs (iptables_rules.py) and from the driver (iptables.py) because this is the binary
format of one entry, which the kernel side (iptables_kernel.py) splices and reads as opaque bytes.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from firewall.iptables_rules import CHAINS, PRE, Spec, parse, specs
from firewall.model import TUN, Dnat, Foreign, Plan, PortMap, Rule, rule_order
from firewall.xtables_layout import HDR, LAYOUT, ext

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
SYN_MATCH = ext("tcp", TCP_MATCH.pack(0, 0xFFFF, 0, 0xFFFF, 0, 0x06, 0x02, 0))


def port_match(proto: str, port: int) -> bytes:
    """-m tcp|udp --dport `port` (the ports in host order, as xt_tcp and xt_udp hold them)."""
    if proto == "tcp":
        return ext("tcp", TCP_MATCH.pack(0, 0xFFFF, port, port, 0, 0, 0, 0))
    return ext("udp", UDP_MATCH.pack(0, 0xFFFF, port, port, 0))
CLAMP = ext("TCPMSS", struct.pack("=H", 0xFFFF))  # XT_TCPMSS_CLAMP_PMTU


def _iface(name: str) -> tuple[bytes, bytes]:
    """(name, mask) as iptables stores `-i name`: the mask covers the name and its NUL."""
    raw = name.encode()
    return raw.ljust(16, b"\0"), (b"\xff" * (len(raw) + 1) if raw else b"").ljust(16, b"\0")


def encode(fam: int, spec: Spec, dnat: int = 2) -> bytes:
    """The kernel's entry for `spec`, with DNAT in revision `dnat`."""
    lay = LAYOUT[fam]
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
        matches += ext("statistic", struct.pack("=HHIIIQ", 1, 0, spec.every - 1, 0, 0, 0))
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
        target = ext(spec.target, data, revision=nat)
    return lay.entry(ip, matches, target)


class DnatEntries:
    """encode() of single-target DNATs, the rules there are thousands of, by splicing the two addresses
    into a template: 0.5 µs a rule instead of 4 (tests hold it equal to encode)."""

    def __init__(self, fam: int, dnat: int) -> None:
        lay = LAYOUT[fam]
        self.n = n = lay.addr_len
        sample = "::1" if fam == 6 else "0.0.0.1"
        t = encode(fam, Spec(PRE, "DNAT", sample, dst=sample), dnat)
        self.to = to = lay.size + HDR + (8 if dnat == 0 else 4)  # after (rangesize and) flags
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
        lay = LAYOUT[fam]
        self.n = n = lay.addr_len
        self.proto, self.iface = proto, iface
        sample = "::1" if fam == 6 else "0.0.0.1"
        t = encode(fam, Spec(PRE, "DNAT", sample, iif="!" + iface, proto=proto, dport=1, to_port=1), dnat)
        dport = lay.size + HDR + 4  # the match's dpts[2], after spts[2]
        to = lay.size + len(port_match(proto, 1)) + HDR + (8 if dnat == 0 else 4)
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
    lay = LAYOUT[fam]
    fields = lay.ip.unpack_from(entry)
    dst, iif, oif, inv = fields[1], fields[4], fields[5], fields[-1]
    target_at = struct.unpack_from("=H", entry, lay.offsets_at)[0]
    target, revision = _name(entry, target_at)
    syn, every, proto, dport, at = False, 0, "", 0, lay.size
    while at < target_at:
        name, _ = _name(entry, at)
        if name in ("tcp", "udp"):
            _, _, dport_min, _, *rest = (TCP_MATCH if name == "tcp" else UDP_MATCH).unpack_from(entry, at + HDR)
            syn = name == "tcp" and rest[1] != 0  # a flag mask: --tcp-flags
            if dport_min:
                proto, dport = name, dport_min
        elif name == "statistic":
            every = struct.unpack_from("=I", entry, at + HDR + 4)[0] + 1
        at += struct.unpack_from("=H", entry, at)[0] or len(entry)
    to, to_port = "", 0
    if target in ("DNAT", "SNAT"):
        flags_at = target_at + HDR + (4 if revision == 0 else 0)  # after rangesize
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
    lay = LAYOUT[fam]
    target_at = struct.unpack_from("=H", entry, lay.offsets_at)[0]
    names, at = [], lay.size
    while at < target_at:
        names.append(f"-m {_name(entry, at)[0]}")
        at += struct.unpack_from("=H", entry, at)[0] or len(entry)
    target = _name(entry, target_at)[0] if target_at + HDR <= len(entry) else "?"
    return " ".join([f"-A {chain}", *names, f"-j {target or 'a jump'}", f"({len(entry)} bytes)"])


def read_back(fam: int, chains: dict[str, tuple[int, list[bytes]]]) -> set[Rule]:
    """The rules in the owned chains a worker read (chain -> (jumps from its base chain, entries)).

    A single-target DNAT, or a PortMap not from tailscale0, is read straight from its bytes (3 µs, not the
    15 of decode() and parse()), unless it follows a round-robin entry, whose group it may close."""
    items: list[Spec | Foreign] = []
    quick: set[Rule] = set()
    templates = {rev: DnatEntries(fam, rev) for rev in DNAT_REVISIONS[fam]}
    size = LAYOUT[fam].size
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

