"""What a plan becomes in nftables: the libnftables JSON commands that write, update or drop
`table ip|ip6 containerboot` (its layout is in nftables.py's docstring), pure.

Apart from the driver (nftables.py), which decides which of these to run and when, and from the
reading back (nftables_read.py), which renders each rule it guesses with these same functions and
compares.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

from firewall.model import (
    TUN,
    Dnat,
    DnatNonTailnet,
    MssClamp,
    Plan,
    PortMap,
    Rule,
    Snat,
    addr_key,
    addr_text,
    rule_order,
)
from firewall.nftables_kernel import Json, Raw

TABLE = "containerboot"
MAP = "ingress"
FAMILY = {4: "ip", 6: "ip6"}
ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
CHAINS = {
    "prerouting": {"type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"},
    "postrouting": {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
    "forward": {"type": "filter", "hook": "forward", "prio": -150, "policy": "accept"},
}


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


def unmapped(rules: Iterable[Rule]) -> frozenset[Rule]:
    """The rules of the chains, not the maps: what a listing without the maps' elements shows."""
    return frozenset(r for r in rules if not _is_mapped(r))


def _port_groups(rules: Iterable[Rule]) -> dict[Group, list[PortMap]]:
    """The PortMaps by the interface they are not from and their protocol (one pair of maps each)."""
    groups: dict[Group, list[PortMap]] = {}
    for r in rules:
        if type(r) is PortMap:
            groups.setdefault((r.iface, r.proto), []).append(r)
    return groups


_groups_seen: list[tuple[Plan, dict[Group, list[PortMap]]]] = []  # the last few plans' groups (read only)


def plan_groups(plan: Plan) -> dict[Group, list[PortMap]]:
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
    groups = plan_groups(plan)
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
    groups = plan_groups(mine)
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
    have_groups, want_groups = set(plan_groups(have)), set(plan_groups(want))
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
    if unmapped(gone) or unmapped(added) or have_groups != want_groups:
        cmds += [{"flush": {"chain": _ref(fam, name=name)}} for name in CHAINS]
        cmds += chain_rules(fam, sorted(unmapped(want.rules), key=rule_order), want_groups)
    for group in sorted(have_groups - want_groups):  # after the flush: a rule referred to them
        cmds += [{"delete": {"map": _ref(fam, name=name)}} for name in portmap_maps(*group)]
    return cmds
