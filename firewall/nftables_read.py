"""Reading back our nftables tables: the rules a listing of `table ip|ip6 containerboot` holds, pure.

Each listed rule is guessed from its last statement, rendered again with nftables_render.py and kept
only when the rendering is exactly what nft listed; anything else is `Foreign`. Apart from the
rendering because it is the inverse direction, with its own rules about what counts (map elements
only while a rule looks them up, an MSS clamp only with both halves).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from firewall.model import Dnat, DnatNonTailnet, Foreign, MssClamp, PortMap, Rule, Snat
from firewall.nftables_kernel import Json
from firewall.nftables_render import (
    ADDR_TYPE,
    CHAINS,
    MAP,
    Group,
    clamp_expr,
    lookup_expr,
    portmap_expr,
    portmap_group,
    rule_exprs,
)


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


@dataclass
class _Seen:
    """What parse_table collects from the listing, before it settles what counts."""

    found: set[Rule] = field(default_factory=set)
    elements: list[Dnat] = field(default_factory=list)  # the ingress map's
    lookup: bool = False
    clamp_halves: set[str] = field(default_factory=set)
    addrs: PortElements = field(default_factory=dict)
    ports: PortElements = field(default_factory=dict)
    port_rules: list[Group] = field(default_factory=list)  # the groups of the port map lookup rules


def parse_table(fam: int, objects: list[Json]) -> Listing:
    """The rules of `table <fam> containerboot` as nft listed them."""
    seen = _Seen()
    for obj in objects:
        kind, body = next(iter(obj.items()))
        if kind == "rule":
            _see_rule(fam, body, seen)
        elif kind != "table":
            _see_object(fam, kind, body, seen)
    return _settle(fam, seen)


def _see_object(fam: int, kind: str, body: Json, seen: _Seen) -> None:
    """A map or chain of the table (anything else in it is Foreign)."""
    found = seen.found
    if kind == "map" and body.get("name") == MAP and body.get("type") == ADDR_TYPE[fam] \
            and body.get("map") == ADDR_TYPE[fam]:
        for elem in body.get("elem", []):
            k, v = (_fam_addr(fam, x) for x in elem) if isinstance(elem, list) and len(elem) == 2 else (None, None)
            if k and v:
                seen.elements.append(Dnat(k, (v,)))
            else:
                found.add(Foreign(fam, f"map {MAP} element {json.dumps(elem)}"))
        return
    if kind == "map" and _port_map(fam, body, found, seen.addrs, seen.ports):
        return
    if kind == "chain":
        spec = {k: body.get(k) for k in ("type", "hook", "prio", "policy")}
        if CHAINS.get(body.get("name", "")) != spec:
            found.add(Foreign(fam, f"chain {body.get('name')} {json.dumps(spec)}"))
        return
    found.add(Foreign(fam, f"{kind} {body.get('name', '')}".strip()))


def _see_rule(fam: int, body: Json, seen: _Seen) -> None:
    """A rule of one of the chains: ours when it renders back exactly as listed."""
    found = seen.found
    chain, expr = body.get("chain", ""), body.get("expr", [])
    group = _port_lookup(expr) if chain == "prerouting" else None
    if group is not None:
        seen.port_rules.append(group)
        return
    guess = _guess(fam, chain, expr)
    if guess == "lookup" and expr == lookup_expr(fam):
        seen.lookup = True
    elif isinstance(guess, str) and guess != "lookup":
        direction, iface = guess.split(" ", 1)
        if expr == clamp_expr(direction, iface):
            seen.clamp_halves.add(guess)
        else:
            found.add(Foreign(fam, f"{chain}: {json.dumps(expr)}"))
    elif guess is not None and not isinstance(guess, str) and guess.family == fam \
            and rule_exprs(guess) == [(chain, expr)]:
        found.add(guess)
    else:
        found.add(Foreign(fam, f"{chain}: {json.dumps(expr)}"))


def _settle(fam: int, seen: _Seen) -> Listing:
    """What counts of what was seen: an MSS clamp with both halves, map elements while a rule looks them up."""
    found, clamp_halves, addrs, ports = seen.found, seen.clamp_halves, seen.addrs, seen.ports
    for iface in {h.split(" ", 1)[1] for h in clamp_halves}:
        if {f"oifname {iface}", f"iifname {iface}"} <= clamp_halves:
            found.add(MssClamp(fam, iface))
        else:
            found.add(Foreign(fam, f"forward: half of the MSS clamp for {iface}"))
    if seen.lookup:
        found.update(seen.elements)
    # A port map pair counts while one rule looks it up; a lookup of a missing map cannot exist (nft refuses it).
    looked_up: set[Group] = set()
    for group in seen.port_rules:
        if group in looked_up or group not in addrs or group not in ports:
            what = "a second lookup of" if group in looked_up else "a lookup of unexpected"
            found.add(Foreign(fam, f"prerouting: {what} port maps for {group[1]} not from {group[0]}"))
            continue
        looked_up.add(group)
        found.update(_port_maps_read(fam, group, addrs[group], ports[group]))
    for group in (addrs.keys() | ports.keys()) - looked_up:
        found.add(Foreign(fam, f"port maps for {group[1]} not from {group[0]} that no rule looks up"))
    return Listing(frozenset(found), seen.lookup, frozenset(looked_up))
