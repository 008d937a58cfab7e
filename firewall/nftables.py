"""nftables driver: one private table per family, written with libnftables JSON.

Layout of `table ip|ip6 containerboot`:
  map ingress        daddr -> new daddr, one element per single-target ingress mapping
  chain prerouting   nat, dstnat:  map lookup, round-robin DNATs, egress DNAT
  chain postrouting  nat, srcnat:  SNATs
  chain forward      filter, mangle priority: MSS clamp both ways on the tunnel

The JSON goes to the kernel through the `nftables` binding when it imports, else through
`nft -j -f -`: the same documents either way. The renderer emits rules in the exact shape
nft lists them, so reading back is "guess the rule, render it, compare".
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from firewall.model import (
    Dnat,
    DnatNonTailnet,
    FirewallError,
    Foreign,
    MssClamp,
    Plan,
    Rule,
    Snat,
    addr_key,
    addr_text,
    rule_order,
)

TABLE = "containerboot"
MAP = "ingress"
FAMILY = {4: "ip", 6: "ip6"}
ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
CHAINS = {
    "prerouting": {"type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"},
    "postrouting": {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
    "forward": {"type": "filter", "hook": "forward", "prio": -150, "policy": "accept"},
}

Json = dict[str, Any]


class Libnft(Protocol):
    """Runs one libnftables JSON document as one transaction; returns the listed objects."""

    path: str

    def run(self, cmds: list[Json], terse: bool = False) -> list[Json]: ...


def _doc(cmds: list[Json]) -> Json:
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *cmds]}


def _objects(output: Any) -> list[Json]:
    if not output:
        return []
    return [o for o in output.get("nftables", []) if "metainfo" not in o]


class BindingLibnft:
    path = "binding"

    def __init__(self) -> None:
        from nftables import Nftables  # Debian python3-nftables; absent on PyPI

        self._nft = Nftables()

    def run(self, cmds: list[Json], terse: bool = False) -> list[Json]:
        old = self._nft.set_terse_output(terse)
        try:
            rc, out, err = self._nft.json_cmd(_doc(cmds))
        finally:
            self._nft.set_terse_output(old)
        if rc != 0:
            raise FirewallError(f"nftables: {err.strip()}")
        return _objects(out)


class CliLibnft:
    path = "cli"

    def __init__(self, nft: str | None = None) -> None:
        found = nft or shutil.which("nft")
        if not found:
            raise FileNotFoundError("nft not found on PATH")
        self._nft = found

    def run(self, cmds: list[Json], terse: bool = False) -> list[Json]:
        argv = [self._nft, "-j", *(["-t"] if terse else []), "-f", "-"]
        proc = subprocess.run(argv, input=json.dumps(_doc(cmds)), capture_output=True, text=True)
        if proc.returncode != 0:
            raise FirewallError(f"nftables (nft -j): {proc.stderr.strip()}")
        return _objects(json.loads(proc.stdout)) if proc.stdout.strip() else []


def open_libnft(prefer: str | None = None) -> tuple[Libnft, str]:
    """The binding where it imports, else the CLI. Returns the path and why it was chosen."""
    if prefer != "cli":
        try:
            return BindingLibnft(), "libnftables through the python3-nftables binding"
        except (ImportError, OSError) as exc:
            if prefer == "binding":
                raise
            why = f"python3-nftables binding unavailable ({exc}); using the nft -j CLI"
    else:
        why = "nft -j CLI requested"
    return CliLibnft(), why


# ---- rendering (pure) -------------------------------------------------------------------------------


def _payload(fam: int, field: str) -> Json:
    return {"payload": {"protocol": FAMILY[fam], "field": field}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def lookup_expr(fam: int) -> list[Json]:
    return [{"dnat": {"addr": {"map": {"key": _payload(fam, "daddr"), "data": "@" + MAP}}}}]


def clamp_expr(direction: str, iface: str) -> list[Json]:
    syn = _match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "rst"]]}, "syn")
    mss = {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}},
                      "value": {"rt": {"key": "mtu"}}}}
    return [_match(_meta(direction), iface), syn, mss]


def rule_exprs(rule: Rule) -> list[tuple[str, list[Json]]]:
    """(chain, expr) for each nft rule that renders `rule`; single-target DNATs live in the map."""
    fam = rule.family
    match rule:
        case Dnat() if len(rule.to) > 1:
            targets = {"set": [[i, addr_text(t)] for i, t in enumerate(rule.to)]}
            numgen = {"numgen": {"mode": "inc", "mod": len(rule.to), "offset": 0}}
            return [("prerouting", [_match(_payload(fam, "daddr"), addr_text(rule.match)),
                                    {"dnat": {"addr": {"map": {"key": numgen, "data": targets}}}}])]
        case DnatNonTailnet():
            # iifname, not upstream's oifname: in prerouting the output interface is always empty.
            return [("prerouting", [_match(_meta("iifname"), rule.iface, "!="),
                                    {"dnat": {"addr": addr_text(rule.to)}}])]
        case Snat():
            return [("postrouting", [_match(_payload(fam, "daddr"), addr_text(rule.dst)),
                                     {"snat": {"addr": addr_text(rule.to)}}])]
        case MssClamp():
            return [("forward", clamp_expr("oifname", rule.iface)), ("forward", clamp_expr("iifname", rule.iface))]
    return []


def _is_mapped(rule: Rule) -> bool:
    return isinstance(rule, Dnat) and len(rule.to) == 1


def _rest(rules: Iterable[Rule]) -> frozenset[Rule]:
    return frozenset(r for r in rules if not _is_mapped(r))


def _ref(fam: int, **kw: Any) -> Json:
    return {"family": FAMILY[fam], "table": TABLE, **kw}


def _elements(rules: Iterable[Rule]) -> list[list[str]]:
    return [[addr_text(r.match), addr_text(r.to[0])] for r in rules if isinstance(r, Dnat)]


def chain_rules(fam: int, rules: list[Rule]) -> list[Json]:
    out = [{"add": {"rule": _ref(fam, chain="prerouting", expr=lookup_expr(fam))}}]
    for rule in rules:
        for chain, expr in rule_exprs(rule):
            out.append({"add": {"rule": _ref(fam, chain=chain, expr=expr)}})
    return out


def drop_table(fam: int) -> list[Json]:
    # add-then-delete removes the table whether or not it exists (nft 1.0.6 has no `destroy`).
    table = {"family": FAMILY[fam], "name": TABLE}
    return [{"add": {"table": table}}, {"delete": {"table": table}}]


def full_table(fam: int, plan: Plan) -> list[Json]:
    """Replace the family's table with one holding exactly `plan` (one transaction with the rest)."""
    rules = plan.only(fam).rules
    mapped = [r for r in rules if _is_mapped(r)]  # a map's elements have no order
    cmap: Json = _ref(fam, name=MAP, type=ADDR_TYPE[fam], map=ADDR_TYPE[fam])
    if mapped:
        cmap["elem"] = _elements(mapped)
    cmds = [*drop_table(fam), {"add": {"table": {"family": FAMILY[fam], "name": TABLE}}},
            {"add": {"map": cmap}}]
    cmds += [{"add": {"chain": _ref(fam, name=name, **spec)}} for name, spec in CHAINS.items()]
    return cmds + chain_rules(fam, sorted(_rest(rules), key=rule_order))


def update_table(fam: int, have: Plan, want: Plan) -> list[Json]:
    """The smallest change from `have` to `want`: map elements by key, and, when any other rule changed,
    the three chains flushed and written again (they hold a handful of rules)."""
    gone, added = have.rules - want.rules, want.rules - have.rules
    cmds: list[Json] = []
    keys = sorted((r.match for r in gone if isinstance(r, Dnat) and _is_mapped(r)), key=addr_key)
    if keys:
        cmds.append({"delete": {"element": _ref(fam, name=MAP, elem=[addr_text(m) for m in keys])}})
    new = sorted((r for r in added if isinstance(r, Dnat) and _is_mapped(r)), key=lambda r: addr_key(r.match))
    if new:
        cmds.append({"add": {"element": _ref(fam, name=MAP, elem=_elements(new))}})
    if _rest(gone) or _rest(added):
        cmds += [{"flush": {"chain": _ref(fam, name=name)}} for name in CHAINS]
        cmds += chain_rules(fam, sorted(_rest(want.rules), key=rule_order))
    return cmds


class Generation:
    """The nf_tables generation id of this network namespace, which changes with every committed
    transaction, ours or anyone's (NFT_MSG_GETGEN over netlink, well under a millisecond). One socket
    stays open: closing a netlink socket here costs about 10 ms."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    def read(self) -> int | None:
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
            # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN; the answer is NFT_MSG_NEWGEN.
            self._sock.send(struct.pack("=LHHLLBBH", 20, (10 << 8) | 16, 1, 1, 0, socket.AF_UNSPEC, 0, 0))
            data = self._sock.recv(4096)
        except OSError:
            return None
        length, kind = struct.unpack_from("=LH", data)
        pos = 20  # nlmsghdr + nfgenmsg
        while kind == (10 << 8) | 15 and pos + 4 <= min(length, len(data)):
            alen, atype = struct.unpack_from("=HH", data, pos)
            if atype & 0x7FFF == 1 and alen >= 8:  # NFTA_GEN_ID, big endian
                return int(struct.unpack_from("!L", data, pos + 4)[0])
            pos += (alen + 3) & ~3
        return None


# ---- reading back (pure) ----------------------------------------------------------------------------


def _addr(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _guess(fam: int, chain: str, expr: list[Json]) -> Rule | str | None:
    """The rule `expr` would render from, judged by its last statement; the caller checks by rendering."""
    try:
        last = expr[-1]
        right = expr[0].get("match", {}).get("right") if len(expr) > 1 else None
        if chain == "prerouting" and "dnat" in last:
            addr = last["dnat"]["addr"]
            if isinstance(addr, dict) and addr.get("map", {}).get("data") == "@" + MAP:
                return "lookup"
            if isinstance(addr, dict):
                targets = [_addr(t) for _, t in addr["map"]["data"]["set"]]
                match = _addr(right)
                if match and all(targets):
                    return Dnat(match, tuple(t for t in targets if t))
            elif (to := _addr(addr)) and isinstance(right, str):
                return DnatNonTailnet(to, right)
        if chain == "postrouting" and "snat" in last:
            dst, src = _addr(right), _addr(last["snat"]["addr"])
            if dst and src:
                return Snat(dst, src)
        if chain == "forward" and "mangle" in last and isinstance(right, str):
            return f"{expr[0]['match']['left']['meta']['key']} {right}"
    except (KeyError, TypeError, IndexError, AttributeError):
        pass
    return None


@dataclass(frozen=True)
class Listing:
    rules: frozenset[Rule]  # map elements count only while the prerouting chain looks them up
    lookup: bool  # the prerouting chain holds the map lookup rule


def parse_table(fam: int, objects: list[Json]) -> Listing:
    """The rules of `table <fam> containerboot` as nft listed them."""
    found: set[Rule] = set()
    elements: list[Dnat] = []
    lookup = False
    clamp_halves: set[str] = set()
    for obj in objects:
        kind, body = next(iter(obj.items()))
        if kind == "table":
            continue
        if kind == "map" and body.get("name") == MAP and body.get("type") == ADDR_TYPE[fam] \
                and body.get("map") == ADDR_TYPE[fam]:
            for elem in body.get("elem", []):
                k, v = (_addr(x) for x in elem) if isinstance(elem, list) and len(elem) == 2 else (None, None)
                if k and v and k.version == v.version == fam:
                    elements.append(Dnat(k, (v,)))
                else:
                    found.add(Foreign(fam, f"map {MAP} element {json.dumps(elem)}"))
            continue
        if kind == "chain":
            spec = {k: body.get(k) for k in ("type", "hook", "prio", "policy")}
            if CHAINS.get(body.get("name", "")) != spec:
                found.add(Foreign(fam, f"chain {body.get('name')} {json.dumps(spec)}"))
            continue
        if kind != "rule":
            found.add(Foreign(fam, f"{kind} {body.get('name', '')}".strip()))
            continue
        chain, expr = body.get("chain", ""), body.get("expr", [])
        guess = _guess(fam, chain, expr)
        if guess == "lookup" and expr == lookup_expr(fam):
            lookup = True
        elif isinstance(guess, str) and guess != "lookup":
            direction, iface = guess.split(" ", 1)
            if expr == clamp_expr(direction, iface):
                clamp_halves.add(guess)
            else:
                found.add(Foreign(fam, f"{chain}: {json.dumps(expr)}"))
        elif guess is not None and not isinstance(guess, str) and guess.family == fam \
                and rule_exprs(guess) == [(chain, expr)]:
            found.add(guess)
        else:
            found.add(Foreign(fam, f"{chain}: {json.dumps(expr)}"))
    for iface in {h.split(" ", 1)[1] for h in clamp_halves}:
        if {f"oifname {iface}", f"iifname {iface}"} <= clamp_halves:
            found.add(MssClamp(fam, iface))
        else:
            found.add(Foreign(fam, f"forward: half of the MSS clamp for {iface}"))
    if lookup:
        found.update(elements)
    return Listing(frozenset(found), lookup)


# ---- the driver -------------------------------------------------------------------------------------


class NftablesDriver:
    name = "nftables"
    lock_wait = 0.0  # nf_tables changes are transactions: there is no lock to wait for

    def __init__(self, nft: Libnft, families: Iterable[int] = (4, 6)) -> None:
        self.nft = nft
        self.families = tuple(sorted(set(families)))
        # What the last successful apply installed, per family: the base for small updates, and the
        # ruleset generation right after it (unchanged since means nobody touched anything).
        self._last: dict[int, Plan] = {}
        self._generation: int | None = None
        self._gen = Generation()

    def _read(self, fam: int, terse: bool) -> Listing | None:
        """The family's table as listed, or None when it does not exist (other failures raise)."""
        try:
            objs = self.nft.run([{"list": {"table": {"family": FAMILY[fam], "name": TABLE}}}], terse=terse)
        except FirewallError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        return parse_table(fam, objs)

    def _intact(self, fam: int, have: Plan) -> bool:
        """Cheap check (no map elements listed) that the table still holds what `have` put there."""
        if self._generation is not None and self._gen.read() == self._generation:
            return True
        read = self._read(fam, terse=True)
        return read is not None and read.lookup and read.rules == _rest(have.rules)

    def _check_families(self, plan: Plan) -> None:
        for fam in set(FAMILY) - set(self.families):
            if plan.only(fam).rules:
                raise FirewallError(f"nftables: no usable IPv{fam} NAT in this kernel for: "
                                    f"{plan.only(fam).sorted()[0]}")

    def apply(self, plan: Plan, full: bool = False) -> None:
        """`full` rewrites the tables whole, trusting nothing remembered about them."""
        self._check_families(plan)
        cmds: list[Json] = []
        small = True
        for fam in self.families:
            want, have = plan.only(fam), self._last.get(fam)
            if not want.rules:
                cmds += drop_table(fam) if have is None or have.rules else []
            elif not full and have is not None and have.rules and self._intact(fam, have):
                cmds += update_table(fam, have, want)
            else:
                small = False
                cmds += full_table(fam, want)
        try:
            if cmds:
                self.nft.run(cmds)
        except FirewallError:
            if not small:
                raise
            # The table changed under us between the check and the update: replace it whole.
            cmds = [c for fam in self.families for c in (full_table(fam, plan.only(fam))
                                                         if plan.only(fam).rules else drop_table(fam))]
            self.nft.run(cmds)
        self._last = {fam: plan.only(fam) for fam in self.families}
        self._generation = self._gen.read()

    def flush(self) -> None:
        self.nft.run([c for fam in self.families for c in drop_table(fam)])
        self._last = {fam: Plan() for fam in self.families}
        self._generation = None

    def installed(self) -> Plan:
        rules: set[Rule] = set()
        for fam in self.families:
            read = self._read(fam, terse=False)
            if read:
                rules |= read.rules
        return Plan.read_back(rules)

    def probe(self, fam: int) -> None:
        """Create and delete a NAT base chain: fails where nf_tables or its NAT support is missing."""
        name = TABLE + "-probe"
        table = {"family": FAMILY[fam], "name": name}
        chain = {"family": FAMILY[fam], "table": name, "name": "probe", **CHAINS["postrouting"]}
        self.nft.run([{"add": {"table": table}}, {"add": {"chain": chain}}, {"delete": {"table": table}}])
