"""nftables driver: one private table per family, written with libnftables JSON.

Layout of `table ip|ip6 containerboot`:
  map ingress        daddr -> new daddr, one element per single-target ingress mapping
  map portmap_tcp_addr  tcp dport -> new daddr  } one element each per egress service port (PortMap), only
  map portmap_tcp_port  tcp dport -> new dport  } while there are any; the same for udp (for another
                                                  interface than tailscale0: portmap_<hex of its name>_tcp_addr...)
  chain prerouting   nat, dstnat:  map lookup, round-robin DNATs, egress DNAT, port map lookups
  chain postrouting  nat, srcnat:  SNATs
  chain forward      filter, mangle priority: MSS clamp both ways on the tunnel

The JSON goes to the kernel through the `nftables` binding when it imports, else through
`nft -j -f -`: the same documents either way. The renderer emits rules in the exact shape
nft lists them, so reading back is "guess the rule, render it, compare".
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from firewall.model import (
    TUN,
    Dnat,
    DnatNonTailnet,
    FirewallError,
    Foreign,
    MssClamp,
    Plan,
    PortMap,
    Rule,
    Snat,
    addr_key,
    addr_text,
    rule_order,
)
from firewall.paths import which

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

    def release(self) -> None:
        """Drop whatever is kept between commands (the next command starts afresh)."""


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
        self._new = Nftables
        self._nft: Any = None  # the context, made by the first command after a release

    def run(self, cmds: list[Json], terse: bool = False) -> list[Json]:
        if self._nft is None:
            self._nft = self._new()
            self._nft.set_json_output(True)  # JSON out, and JSON in: libnftables parses the input as JSON first
        self._nft.set_terse_output(terse)
        rc, out, err = self._nft.cmd(dumps(cmds))
        if rc != 0:
            raise FirewallError(f"nftables: {err.strip()}")
        return _objects(json.loads(out)) if out else []

    def release(self) -> None:
        """Free the context, and with it the ruleset cache it keeps from its last command until the next
        one: a write caches every table of the ruleset at about 0.5 MiB each, 3.5 MiB beside tailscaled's
        six (measured in the boot benchmark). Kept, the cache makes our next change cheaper while nothing
        else has changed the ruleset (13 ms instead of 25 ms for one change among 10,000 mappings); the
        next command after a release makes a new context (0.1 ms) and fetches again."""
        self._nft = None  # nft_ctx_free, now: nothing else refers to it


class CliLibnft:
    path = "cli"

    def __init__(self, nft: str | None = None) -> None:
        found = nft or which("nft")
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

    def release(self) -> None:
        pass  # each command is its own process


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


# Egress services (PortMap): per interface and protocol, the new address and the new port come from two maps
# keyed by the destination port. Two maps, because nft 1.0.6 cannot declare a map whose data is a
# concatenation (ipv4_addr . inet_service) in JSON: a list makes a set, a string is "Invalid map type". Keyed
# by port alone (a map per protocol), not by `meta l4proto . th dport`: nft lists 10,000 plain elements in a
# third of the time it takes for concatenated ones (about 40 ms a map, not 120), and the drift check lists them.
# Both maps change in the same transaction.
Group = tuple[str, str]  # (interface, protocol): the PortMaps of one pair of maps


def portmap_maps(iface: str, proto: str) -> tuple[str, str]:
    """The names of the address and the port map of the PortMaps of `proto` not from `iface` (a name as hex,
    so that any interface name makes a valid set name)."""
    base = "portmap" if iface == TUN else f"portmap_{iface.encode().hex()}"
    return f"{base}_{proto}_addr", f"{base}_{proto}_port"


def portmap_group(name: str) -> tuple[Group, bool] | None:
    """The group of a port map's name and whether it is the port map, the inverse of portmap_maps (None: not
    a port map's name)."""
    parts = name.split("_")
    if parts[0] != "portmap" or len(parts) not in (3, 4) or parts[-2] not in ("tcp", "udp") \
            or parts[-1] not in ("addr", "port"):
        return None
    iface = TUN
    if len(parts) == 4:
        try:
            iface = bytes.fromhex(parts[1]).decode()
        except ValueError:
            return None
    is_port = parts[-1] == "port"
    return ((iface, parts[-2]), is_port) if portmap_maps(iface, parts[-2])[is_port] == name else None


def portmap_expr(iface: str, proto: str) -> list[Json]:
    """Not from `iface`: DNAT to the address and port both maps hold for the packet's destination port (a
    packet whose port is in neither map goes on unchanged). As nft lists it: `tcp dport` (nft adds and hides
    the `meta l4proto tcp` it implies), no "family" in the dnat."""
    addr, port = portmap_maps(iface, proto)
    key = {"payload": {"protocol": proto, "field": "dport"}}
    return [_match(_meta("iifname"), iface, "!="),
            {"dnat": {"addr": {"map": {"key": key, "data": "@" + addr}},
                      "port": {"map": {"key": key, "data": "@" + port}}}}]


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
    """The rule is an element of a map (the ingress map, or a port map pair), not a rule of a chain."""
    return (type(rule) is Dnat and len(rule.to) == 1) or type(rule) is PortMap


def _rest(rules: Iterable[Rule]) -> frozenset[Rule]:
    return frozenset(r for r in rules if not _is_mapped(r))


def _port_groups(rules: Iterable[Rule]) -> dict[Group, list[PortMap]]:
    """The PortMaps by the interface they are not from and their protocol (one pair of maps each)."""
    groups: dict[Group, list[PortMap]] = {}
    for r in rules:
        if type(r) is PortMap:
            groups.setdefault((r.iface, r.proto), []).append(r)
    return groups


_groups_seen: list[tuple[Plan, dict[Group, list[PortMap]]]] = []  # the last few plans' groups (read only)


def _plan_groups(plan: Plan) -> dict[Group, list[PortMap]]:
    """_port_groups of a plan's rules, remembered for the last few plans: one apply asks it of the same two
    plans five times (2 ms each at 10,000 rules)."""
    for seen, groups in _groups_seen:
        if seen is plan:
            return groups
    groups = _port_groups(plan.rules)
    _groups_seen.insert(0, (plan, groups))
    del _groups_seen[4:]
    return groups


def _port_order(r: PortMap) -> int:
    return r.port


def _port_elements(fam: int, rules: list[PortMap]) -> tuple[Raw, Raw]:
    """The elements of the address map and of the port map, as JSON text (10,000 of them: see _split)."""
    text = socket.inet_ntoa if fam == 4 else (lambda b: socket.inet_ntop(socket.AF_INET6, b))
    addrs = ",".join(f'[{r.port},"{text(r.to.packed)}"]' for r in rules)
    ports = ",".join(f"[{r.port},{r.to_port}]" for r in rules)
    return Raw(f"[{addrs}]"), Raw(f"[{ports}]")


def _port_map_decls(fam: int, group: Group, rules: list[PortMap], size: int) -> list[Json]:
    """The add commands of the two maps for `rules` (all of `group`), their elements included."""
    addr, port = portmap_maps(*group)
    elems = _port_elements(fam, rules) if rules else None
    out: list[Json] = []
    for name, data, i in ((addr, ADDR_TYPE[fam], 0), (port, "inet_service", 1)):
        decl = _ref(fam, name=name, type="inet_service", map=data, size=size)
        if elems is not None:
            decl["elem"] = elems[i]
        out.append({"add": {"map": decl}})
    return out


def _split(fam: int, rules: Iterable[Rule]) -> tuple[Raw | None, list[Rule]]:
    """The single-target DNATs as the map's elements [key, value] in JSON text (addresses need no
    escaping), and the other rules but the PortMaps (see _port_groups), in one pass: 10,000 elements cost
    9.5 ms this way, 12 with a pass to split and one to write them, 14 through str()."""
    pairs: list[str] = []
    rest: list[Rule] = []
    add, keep = pairs.append, rest.append
    if fam == 4:
        ntoa = socket.inet_ntoa
        for r in rules:
            if type(r) is Dnat and len(r.to) == 1:
                add(f'["{ntoa(r.match.packed)}","{ntoa(r.to[0].packed)}"]')
            elif type(r) is not PortMap:
                keep(r)
    else:
        for r in rules:
            if type(r) is Dnat and len(r.to) == 1:
                add(f'["{addr_text(r.match)}","{addr_text(r.to[0])}"]')
            elif type(r) is not PortMap:
                keep(r)
    return (Raw("[" + ",".join(pairs) + "]") if pairs else None), rest


def _ref(fam: int, **kw: Any) -> Json:
    return {"family": FAMILY[fam], "table": TABLE, **kw}


def chain_rules(fam: int, rules: list[Rule], port_groups: Iterable[Group] = ()) -> list[Json]:
    """The chains' rules: the ingress lookup, `rules` (in chain order), then the port map lookups (PortMaps
    come after every other DNAT in the model's order, and nothing else is in prerouting)."""
    out = [{"add": {"rule": _ref(fam, chain="prerouting", expr=lookup_expr(fam))}}]
    for rule in rules:
        for chain, expr in rule_exprs(rule):
            out.append({"add": {"rule": _ref(fam, chain=chain, expr=expr)}})
    for group in sorted(port_groups):
        out.append({"add": {"rule": _ref(fam, chain="prerouting", expr=portmap_expr(*group))}})
    return out


def drop_table(fam: int) -> list[Json]:
    # add-then-delete removes the table whether or not it exists (nft 1.0.6 has no `destroy`).
    table = {"family": FAMILY[fam], "name": TABLE}
    return [{"add": {"table": table}}, {"delete": {"table": table}}]


def map_counts(plan: Plan) -> dict[str, int]:
    """The maps a table of `plan` (one family) holds, by name, with the number of rules each is sized for
    (the ingress map: every rule but the PortMaps, as before there were port maps)."""
    groups = _plan_groups(plan)
    counts = {MAP: len(plan.rules) - sum(map(len, groups.values()))}
    for group, rules in groups.items():
        for name in portmap_maps(*group):
            counts[name] = len(rules)
    return counts


def map_sizes(plan: Plan) -> dict[str, int]:
    """The declared size of each map a full table of `plan` (one family) holds, by map name."""
    return {name: map_size(n) for name, n in map_counts(plan).items()}


def map_size(rules: int) -> int:
    """The map's declared size for a plan of this many rules: room to double (the size is also its limit).
    Declared, the kernel sizes the hash once instead of growing it element by element: a table of
    10,000 elements loads in 23 ms instead of 29."""
    return 1 << max(10, (2 * rules).bit_length())


def full_table(fam: int, plan: Plan, drop: bool = True) -> list[Json]:
    """Replace the family's table with one holding exactly `plan` (one transaction with the rest);
    `drop=False` when the table is known not to exist (deleting it first costs 2 ms at 10,000 elements)."""
    mine = plan.only(fam)
    sizes = map_sizes(mine)
    elements, rest = _split(fam, mine.rules)  # a map's elements have no order
    groups = _plan_groups(mine)
    cmap: Json = _ref(fam, name=MAP, type=ADDR_TYPE[fam], map=ADDR_TYPE[fam], size=sizes[MAP])
    if elements is not None:
        cmap["elem"] = elements
    cmds = [*(drop_table(fam) if drop else []), {"add": {"table": {"family": FAMILY[fam], "name": TABLE}}},
            {"add": {"map": cmap}}]
    for group, ports in groups.items():
        cmds += _port_map_decls(fam, group, ports, sizes[portmap_maps(*group)[0]])
    cmds += [{"add": {"chain": _ref(fam, name=name, **spec)}} for name, spec in CHAINS.items()]
    return cmds + chain_rules(fam, sorted(rest, key=rule_order), groups)


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
    # Port maps: elements by key in the maps that stay; maps of their own for a group that comes or goes.
    have_groups, want_groups = set(_plan_groups(have)), set(_plan_groups(want))
    for group, ports in _port_groups(gone).items():
        if group in want_groups:
            gone_ports = sorted(r.port for r in ports)
            cmds += [{"delete": {"element": _ref(fam, name=name, elem=gone_ports)}} for name in portmap_maps(*group)]
    for group, ports in _port_groups(added).items():
        if group in have_groups:
            elems = _port_elements(fam, sorted(ports, key=_port_order))
            cmds += [{"add": {"element": _ref(fam, name=name, elem=e)}}
                     for name, e in zip(portmap_maps(*group), elems, strict=True)]
        else:
            cmds += _port_map_decls(fam, group, ports, map_size(len(ports)))
    if _rest(gone) or _rest(added) or have_groups != want_groups:
        cmds += [{"flush": {"chain": _ref(fam, name=name)}} for name in CHAINS]
        cmds += chain_rules(fam, sorted(_rest(want.rules), key=rule_order), want_groups)
    for group in sorted(have_groups - want_groups):  # after the flush: a rule referred to them
        cmds += [{"delete": {"map": _ref(fam, name=name)}} for name in portmap_maps(*group)]
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


def _fam_addr(fam: int, value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address of family `fam` as nft lists it (None: anything else), for map elements, of which there are
    thousands: through inet_pton, 2 µs instead of the 12 that parsing the text in ipaddress costs."""
    try:
        if fam == 4:
            return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, value))
    except (OSError, TypeError, ValueError):
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
    """What one of our tables holds, read back from its listing."""

    rules: frozenset[Rule]  # map elements count only while a prerouting rule looks them up
    lookup: bool  # the prerouting chain holds the map lookup rule
    port_lookups: frozenset[Group] = frozenset()  # groups whose port maps both exist and are looked up


PortElements = dict[Group, dict[int, object]]  # group -> destination port -> the element's data as listed


def _port_map(fam: int, body: Json, found: set[Rule], addrs: PortElements, ports: PortElements) -> bool:
    """Collect a port map's elements by group; False when `body` is no port map of ours."""
    named = portmap_group(body.get("name", ""))
    if named is None:
        return False
    group, is_port = named
    if body.get("type") != "inet_service" or body.get("map") != ("inet_service" if is_port else ADDR_TYPE[fam]):
        return False
    into = (ports if is_port else addrs).setdefault(group, {})
    for elem in body.get("elem", []):
        if isinstance(elem, list) and len(elem) == 2 and type(elem[0]) is int:
            into[elem[0]] = elem[1]
        else:
            found.add(Foreign(fam, f"map {body['name']} element {json.dumps(elem)}"))
    return True


def _port_maps_read(fam: int, group: Group, addrs: dict[int, object], ports: dict[int, object]) -> set[Rule]:
    """The PortMaps whose port both maps hold with valid data; Foreign for anything else in them."""
    out: set[Rule] = set()
    iface, proto = group
    for key in addrs.keys() | ports.keys():
        to, port = _fam_addr(fam, addrs.get(key)), ports.get(key)
        if to is not None and type(port) is int and 0 < port < 65536 and 0 < key < 65536:
            out.add(PortMap(proto, key, to, port, iface))
        else:
            out.add(Foreign(fam, f"port maps for {proto} not from {iface}, port {key}: address "
                                 f"{json.dumps(addrs.get(key))}, port {json.dumps(port)}"))
    return out


def _port_lookup(expr: list[Json]) -> Group | None:
    """The group whose port maps `expr` looks up, when it is exactly such a rule."""
    try:
        iface, proto = expr[0]["match"]["right"], expr[1]["dnat"]["addr"]["map"]["key"]["payload"]["protocol"]
    except (KeyError, TypeError, IndexError):
        return None
    if isinstance(iface, str) and proto in ("tcp", "udp") and expr == portmap_expr(iface, proto):
        return iface, proto
    return None


def parse_table(fam: int, objects: list[Json]) -> Listing:
    """The rules of `table <fam> containerboot` as nft listed them."""
    found: set[Rule] = set()
    elements: list[Dnat] = []
    lookup = False
    clamp_halves: set[str] = set()
    addrs: PortElements = {}
    ports: PortElements = {}
    port_rules: list[Group] = []  # the groups of the port map lookup rules
    for obj in objects:
        kind, body = next(iter(obj.items()))
        if kind == "table":
            continue
        if kind == "map" and body.get("name") == MAP and body.get("type") == ADDR_TYPE[fam] \
                and body.get("map") == ADDR_TYPE[fam]:
            for elem in body.get("elem", []):
                k, v = (_fam_addr(fam, x) for x in elem) if isinstance(elem, list) and len(elem) == 2 else (None, None)
                if k and v:
                    elements.append(Dnat(k, (v,)))
                else:
                    found.add(Foreign(fam, f"map {MAP} element {json.dumps(elem)}"))
            continue
        if kind == "map" and _port_map(fam, body, found, addrs, ports):
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
        group = _port_lookup(expr) if chain == "prerouting" else None
        if group is not None:
            port_rules.append(group)
            continue
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
    # A port map pair counts while one rule looks it up; a lookup of a missing map cannot exist (nft refuses it).
    looked_up: set[Group] = set()
    for group in port_rules:
        if group in looked_up or group not in addrs or group not in ports:
            what = "a second lookup of" if group in looked_up else "a lookup of unexpected"
            found.add(Foreign(fam, f"prerouting: {what} port maps for {group[1]} not from {group[0]}"))
            continue
        looked_up.add(group)
        found.update(_port_maps_read(fam, group, addrs[group], ports[group]))
    for group in (addrs.keys() | ports.keys()) - looked_up:
        found.add(Foreign(fam, f"port maps for {group[1]} not from {group[0]} that no rule looks up"))
    return Listing(frozenset(found), lookup, frozenset(looked_up))


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
        self._capacity: dict[int, dict[str, int]] = {}  # the declared size of each family's maps, by name
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
        return read is not None and read.lookup and read.rules == _rest(have.rules) \
            and read.port_lookups == set(_plan_groups(have))

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
            # Every map that stays must have room for its elements, else it is declared larger in a new
            # table; a map made by the update (a new port map pair) is declared as large as it needs.
            capacity, counts = self._capacity.get(fam, {}), map_counts(want)
            kept = map_counts(have) if have is not None else {}
            roomy = all(n <= capacity.get(name, 0) for name, n in counts.items() if name in kept)
            if not full and have is not None and roomy and self._intact(fam, have):
                shortcut = True
                if not have.rules:  # we removed the table, and nothing happened since
                    cmds += self._full(fam, want, drop=False) if want.rules else []
                elif not want.rules:
                    cmds += drop_table(fam)
                else:
                    cmds += update_table(fam, have, want)
                    self._capacity[fam] = {name: capacity[name] if name in kept else map_size(n)
                                           for name, n in counts.items()}
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
        self._capacity[fam] = map_sizes(want)
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
            # Nothing changed since: the quiet state a proxy spends its life in, when libnftables' cache
            # of the ruleset is only memory held.
            self.nft.release()
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
