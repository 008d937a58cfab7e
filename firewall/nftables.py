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
CLI_TIMEOUT = 30.0


class Libnft(Protocol):
    """Runs one libnftables JSON document as one transaction; returns the listed objects."""

    path: str

    def run(self, cmds: list[Json], terse: bool = False) -> list[Json]: ...


class Raw:
    """JSON text that goes into a document as it is: 10,000 map elements joined as text cost a third of
    what building and dumping them as lists does."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(cmds: list[Json]) -> str:
    """The libnftables JSON document for `cmds`, with each Raw put in place."""
    raws: list[str] = []

    def placeholder(obj: object) -> str:
        if not isinstance(obj, Raw):
            raise TypeError(f"{type(obj).__name__} in an nftables command")
        raws.append(obj.text)
        return f"@raw{len(raws) - 1}@"

    text = json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *cmds]}, default=placeholder)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@raw{i}@"', raw, 1)
    return text


def _objects(output: Any) -> list[Json]:
    if not output:
        return []
    return [o for o in output.get("nftables", []) if "metainfo" not in o]


NETLINK_NETFILTER = 12  # <linux/netlink.h>

class BindingLibnft:
    path = "binding"

    def __init__(self) -> None:
        from nftables import Nftables  # Debian python3-nftables; absent on PyPI

        # libnftables ends the whole process (exit status 3, "Unable to initialize Netlink socket") when the
        # kernel refuses a netfilter netlink socket (qemu-user, a kernel without nfnetlink): ask first, so
        # that it is an error detection can report in one line instead.
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER).close()
        except OSError as exc:
            raise OSError(exc.errno, f"no netfilter netlink socket here ({exc.strerror})") from None
        self._nft = Nftables()
        self._nft.set_json_output(True)  # JSON out, and JSON in: libnftables parses the input as JSON first

    def run(self, cmds: list[Json], terse: bool = False) -> list[Json]:
        old = self._nft.set_terse_output(terse)
        try:
            rc, out, err = self._nft.cmd(dumps(cmds))
        finally:
            self._nft.set_terse_output(old)
        if rc != 0:
            raise FirewallError(f"nftables: {err.strip()}")
        return _objects(json.loads(out)) if out else []


class CliLibnft:
    path = "cli"

    def __init__(self, nft: str | None = None) -> None:
        found = nft or shutil.which("nft")
        if not found:
            raise FileNotFoundError("nft not found on PATH")
        self._nft = found

    def run(self, cmds: list[Json], terse: bool = False) -> list[Json]:
        argv = [self._nft, "-j", *(["-t"] if terse else []), "-f", "-"]
        try:
            proc = subprocess.run(argv, input=dumps(cmds), capture_output=True, text=True, timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise FirewallError(f"nftables (nft -j): no answer within {CLI_TIMEOUT:g}s") from None
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
    return type(rule) is Dnat and len(rule.to) == 1


def _rest(rules: Iterable[Rule]) -> frozenset[Rule]:
    return frozenset(r for r in rules if not _is_mapped(r))


def _split(fam: int, rules: Iterable[Rule]) -> tuple[Raw | None, list[Rule]]:
    """The single-target DNATs as the map's elements [key, value] in JSON text (addresses need no
    escaping), and the other rules, in one pass: 10,000 elements cost 9.5 ms this way, 12 with a
    pass to split and one to write them, 14 through str()."""
    pairs: list[str] = []
    rest: list[Rule] = []
    add, keep = pairs.append, rest.append
    if fam == 4:
        ntoa = socket.inet_ntoa
        for r in rules:
            if type(r) is Dnat and len(r.to) == 1:
                add(f'["{ntoa(r.match.packed)}","{ntoa(r.to[0].packed)}"]')
            else:
                keep(r)
    else:
        for r in rules:
            if type(r) is Dnat and len(r.to) == 1:
                add(f'["{addr_text(r.match)}","{addr_text(r.to[0])}"]')
            else:
                keep(r)
    return (Raw("[" + ",".join(pairs) + "]") if pairs else None), rest


def _ref(fam: int, **kw: Any) -> Json:
    return {"family": FAMILY[fam], "table": TABLE, **kw}


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


def map_size(rules: int) -> int:
    """The map's declared size for a plan of this many rules: room to double (the size is also its limit).
    Declared, the kernel sizes the hash once instead of growing it element by element: a table of
    10,000 elements loads in 23 ms instead of 29."""
    return 1 << max(10, (2 * rules).bit_length())


def full_table(fam: int, plan: Plan, drop: bool = True) -> list[Json]:
    """Replace the family's table with one holding exactly `plan` (one transaction with the rest);
    `drop=False` when the table is known not to exist (deleting it first costs 2 ms at 10,000 elements)."""
    rules = plan.only(fam).rules
    elements, rest = _split(fam, rules)  # a map's elements have no order
    cmap: Json = _ref(fam, name=MAP, type=ADDR_TYPE[fam], map=ADDR_TYPE[fam], size=map_size(len(rules)))
    if elements is not None:
        cmap["elem"] = elements
    cmds = [*(drop_table(fam) if drop else []), {"add": {"table": {"family": FAMILY[fam], "name": TABLE}}},
            {"add": {"map": cmap}}]
    cmds += [{"add": {"chain": _ref(fam, name=name, **spec)}} for name, spec in CHAINS.items()]
    return cmds + chain_rules(fam, sorted(rest, key=rule_order))


def update_table(fam: int, have: Plan, want: Plan) -> list[Json]:
    """The smallest change from `have` to `want`: map elements by key, and, when any other rule changed,
    the three chains flushed and written again (they hold a handful of rules). One symmetric difference
    compares each rule once (two differences compare them twice: 10 ms at 10,000 rules, not 5)."""
    changed = have.rules ^ want.rules
    gone = [r for r in changed if r in have.rules]
    added = [r for r in changed if r in want.rules]
    cmds: list[Json] = []
    keys = sorted((r.match for r in gone if isinstance(r, Dnat) and _is_mapped(r)), key=addr_key)
    if keys:
        cmds.append({"delete": {"element": _ref(fam, name=MAP, elem=[addr_text(m) for m in keys])}})
    new = sorted((r for r in added if isinstance(r, Dnat) and _is_mapped(r)), key=lambda r: addr_key(r.match))
    if new:
        cmds.append({"add": {"element": _ref(fam, name=MAP, elem=_split(fam, new)[0])}})
    if _rest(gone) or _rest(added):
        cmds += [{"flush": {"chain": _ref(fam, name=name)}} for name in CHAINS]
        cmds += chain_rules(fam, sorted(_rest(want.rules), key=rule_order))
    return cmds


class Nfnetlink:
    """Two questions to nf_tables over netlink, each well under a millisecond: the generation id of this
    network namespace, which changes with every committed transaction, ours or anyone's
    (NFT_MSG_GETGEN), and whether a table exists (NFT_MSG_GETTABLE). One socket stays open: closing
    a netlink socket here costs about 10 ms. None: could not ask."""

    SUBSYS = 10 << 8  # NFNL_SUBSYS_NFTABLES
    NEWTABLE, GETTABLE, NEWGEN, GETGEN = 0, 1, 15, 16
    NLMSG_ERROR, NLM_F_REQUEST = 2, 1

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def _ask(self, kind: int, family: int, attrs: bytes = b"") -> tuple[int, bytes] | None:
        """The reply's message type and payload (after the nfgenmsg header)."""
        self._seq += 1
        msg = struct.pack("=LHHLLBBH", 20 + len(attrs), self.SUBSYS | kind, self.NLM_F_REQUEST, self._seq, 0,
                          family, 0, 0) + attrs
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._sock.send(msg)
            while True:
                data = self._sock.recv(65536)
                length, reply, _, seq = struct.unpack_from("=LHHL", data)
                if seq == self._seq:
                    return reply, data[16:length]
        except (OSError, struct.error):
            return None

    def generation(self) -> int | None:
        answer = self._ask(self.GETGEN, socket.AF_UNSPEC)
        if answer is None or answer[0] != self.SUBSYS | self.NEWGEN:
            return None
        body, pos = answer[1], 4  # after nfgenmsg
        while pos + 4 <= len(body):
            alen, atype = struct.unpack_from("=HH", body, pos)
            if atype & 0x7FFF == 1 and alen >= 8:  # NFTA_GEN_ID, big endian
                return int(struct.unpack_from("!L", body, pos + 4)[0])
            pos += (alen + 3) & ~3
        return None

    def has_table(self, fam: int, name: str) -> bool | None:
        raw = name.encode() + b"\0"
        attr = struct.pack("=HH", 4 + len(raw), 1) + raw  # NFTA_TABLE_NAME
        answer = self._ask(self.GETTABLE, {4: 2, 6: 10}[fam], attr.ljust((len(attr) + 3) & ~3, b"\0"))
        if answer is None:
            return None
        if answer[0] == self.SUBSYS | self.NEWTABLE:
            return True
        if answer[0] == self.NLMSG_ERROR and struct.unpack_from("=i", answer[1])[0] == -2:  # ENOENT
            return False
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
        self._capacity: dict[int, int] = {}  # the declared size of each family's map (see map_size)
        self._nl = Nfnetlink()
        self._applied_gen: int | None = None  # the generation our last transaction made, if nobody's came since
        self._cache: tuple[int, Plan] | None = None  # (generation, what the owned tables held at it)

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
        """Cheap check that the table still holds what `have` put there: nothing committed since our last
        transaction, or else a listing without the map's elements."""
        if self._applied_gen is not None and self._nl.generation() == self._applied_gen:
            return True
        read = self._read(fam, terse=True)
        return read is not None and read.lookup and read.rules == _rest(have.rules)

    def _check_families(self, plan: Plan) -> None:
        for fam in set(FAMILY) - set(self.families):
            if plan.only(fam).rules:
                raise FirewallError(f"nftables: no usable IPv{fam} NAT in this kernel for: "
                                    f"{plan.only(fam).sorted()[0]}")

    def _commit(self, cmds: list[Json], now: Plan) -> None:
        """Run one transaction that leaves the owned tables holding `now`. The generation it made is
        remembered only when it is the one right after the generation before it: then nobody else
        committed in between, and until the generation moves again the tables hold exactly `now`."""
        before = self._nl.generation()
        self._applied_gen = self._cache = None
        self.nft.run(cmds)
        after = self._nl.generation()
        if before is not None and after == before % 0xFFFFFFFF + 1:  # 32 bits, and never 0
            self._applied_gen, self._cache = after, (after, now)

    def apply(self, plan: Plan, full: bool = False) -> None:
        """`full` rewrites the tables whole, trusting nothing remembered about them."""
        self._check_families(plan)
        cmds: list[Json] = []
        shortcut = False  # a change built on what we believe is there, which a retry does not trust
        for fam in self.families:
            want, have = plan.only(fam), self._last.get(fam)
            roomy = len(want.rules) <= self._capacity.get(fam, 0)  # else the map must be declared larger
            if not full and have is not None and roomy and self._intact(fam, have):
                shortcut = True
                if not have.rules:  # we removed the table, and nothing happened since
                    cmds += self._full(fam, want, drop=False) if want.rules else []
                elif not want.rules:
                    cmds += drop_table(fam)
                else:
                    cmds += update_table(fam, have, want)
                continue
            exists = self._nl.has_table(fam, TABLE)
            shortcut = shortcut or exists is False
            if want.rules:
                cmds += self._full(fam, want, drop=exists is not False)
            elif exists is not False:
                cmds += drop_table(fam)
        try:
            if cmds:
                self._commit(cmds, plan)
        except FirewallError:
            if not shortcut:
                raise
            # The tables changed under us between the check and the change: replace them whole.
            self._commit([c for fam in self.families for c in (self._full(fam, plan.only(fam))
                                                               if plan.only(fam).rules else drop_table(fam))], plan)
        self._last = {fam: plan.only(fam) for fam in self.families}

    def _full(self, fam: int, want: Plan, drop: bool = True) -> list[Json]:
        self._capacity[fam] = map_size(len(want.rules))
        return full_table(fam, want, drop)

    def flush(self) -> None:
        self._commit([c for fam in self.families for c in drop_table(fam)], Plan())
        self._last = {fam: Plan() for fam in self.families}

    def installed(self) -> Plan:
        """What the owned tables hold. While the ruleset's generation has not moved since the last
        transaction or listing, that is what they held then, and nothing is listed (the drift check
        every 2 s costs one netlink round trip, not a listing of 10,000 map elements)."""
        gen = self._nl.generation()
        if gen is not None and self._cache is not None and self._cache[0] == gen:
            return self._cache[1]
        rules: set[Rule] = set()
        for fam in self.families:
            read = self._read(fam, terse=False)
            if read:
                rules |= read.rules
        found = Plan.read_back(rules)
        if self._cache is not None and found == self._cache[1]:
            found = self._cache[1]  # the same object again: the caller's `found == applied` is then instant
        if gen is not None and self._nl.generation() == gen:  # nothing committed while we listed
            self._cache = (gen, found)
        return found

    def probe(self, fam: int) -> None:
        """Create and delete a NAT base chain: fails where nf_tables or its NAT support is missing."""
        name = TABLE + "-probe"
        table = {"family": FAMILY[fam], "name": name}
        chain = {"family": FAMILY[fam], "table": name, "name": "probe", **CHAINS["postrouting"]}
        self.nft.run([{"add": {"table": table}}, {"add": {"chain": chain}}, {"delete": {"table": table}}])
