"""Plans, their renderings and reading them back (pure; the kernel tests are in tests/netns)."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from containerboot import proxy
from containerboot.settings import load
from firewall import iptables, nftables, xtables
from firewall.model import (
    Dnat,
    DnatNonTailnet,
    Foreign,
    IPAddress,
    MssClamp,
    Plan,
    PlanError,
    PortMap,
    Rule,
    Snat,
)

a = ipaddress.ip_address


def addrs(fam: int) -> st.SearchStrategy[IPAddress]:
    if fam == 4:
        return st.integers(1, 2**32 - 2).map(ipaddress.IPv4Address)
    return st.integers(1, 2**128 - 2).map(ipaddress.IPv6Address)


@st.composite
def plans(draw: Any) -> Plan:
    rules: list[Rule] = []
    for fam in (4, 6):
        matches = draw(st.lists(addrs(fam), max_size=6, unique=True))
        for m in matches:
            rules.append(Dnat(m, tuple(draw(st.lists(addrs(fam), min_size=1, max_size=3, unique=True)))))
        if draw(st.booleans()):
            rules.append(DnatNonTailnet(draw(addrs(fam))))
        for dst in draw(st.lists(addrs(fam), max_size=2, unique=True)):
            rules.append(Snat(dst, draw(addrs(fam))))
        if draw(st.booleans()):
            rules.append(MssClamp(fam))
        keys = draw(st.lists(st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 65535)), max_size=5,
                             unique=True))
        for proto, port in keys:
            iface = draw(st.sampled_from(["tailscale0", "tailscale0", "eth0", "eth0.100"]))
            rules.append(PortMap(proto, port, draw(addrs(fam)), draw(st.integers(1, 65535)), iface))
    return Plan.of(*rules)


def as_json(cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The commands as libnftables receives them (pre-rendered map elements included)."""
    doc: list[dict[str, Any]] = json.loads(nftables.dumps(cmds))["nftables"]
    assert doc[0] == {"metainfo": {"json_schema_version": 1}}
    return doc[1:]


def listed(cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What `nft -j list table` shows after these add commands (the drop pair removed)."""
    out: list[dict[str, Any]] = []
    for cmd in as_json(cmds):
        verb, body = next(iter(cmd.items()))
        kind, obj = next(iter(body.items()))
        if verb == "delete":
            out.clear()
        elif verb == "add" and kind != "table":
            out.append({kind: obj})
    return out


@settings(max_examples=150, deadline=None)
@given(plans())
def test_nftables_rendering_reads_back_as_the_plan(plan: Plan) -> None:
    for fam in (4, 6):
        got = nftables.parse_table(fam, listed(nftables.full_table(fam, plan)))
        assert got.rules == plan.only(fam).rules and got.lookup


@settings(max_examples=150, deadline=None)
@given(plans())
def test_iptables_rendering_reads_back_as_the_plan(plan: Plan) -> None:
    for fam in (4, 6):
        assert iptables.parse(fam, iptables.render(plan, fam)) == set(plan.only(fam).rules)


@settings(max_examples=100, deadline=None)
@given(plans(), st.sampled_from([0, 1, 2]))
def test_iptables_entries_decode_to_their_specs(plan: Plan, dnat: int) -> None:
    """Every rule's kernel entry, in each DNAT revision, decodes to the Spec it was encoded from, and the
    chain as the worker returns it reads back as the plan."""
    for fam in (4, 6):
        rev = dnat if fam == 4 or dnat else 1  # DNAT revision 0 is IPv4 only
        entries: dict[str, tuple[int, list[bytes]]] = {c: (1, []) for c in iptables.CHAINS}
        for spec in iptables.render(plan, fam):
            entry = iptables.encode(fam, spec, rev)
            assert len(entry) % 8 == 0 and iptables.decode(fam, spec.chain, entry) == spec
            entries[spec.chain][1].append(entry)
        assert iptables.read_back(fam, entries) == set(plan.only(fam).rules)


def test_unknown_content_reads_back_as_foreign() -> None:
    plan = Plan.of(Dnat(a("100.64.0.1"), (a("10.0.0.5"),)))
    objs = listed(nftables.full_table(4, plan))
    objs.append({"rule": {"chain": "prerouting", "expr": [{"accept": None}]}})
    assert any(isinstance(r, Foreign) for r in nftables.parse_table(4, objs).rules)
    # Without the lookup rule the map's elements do nothing: they are not reported as installed.
    no_lookup = [o for o in listed(nftables.full_table(4, plan))
                 if not ("rule" in o and o["rule"]["expr"] == nftables.lookup_expr(4))]
    assert nftables.parse_table(4, no_lookup).rules == frozenset()
    odd = iptables.Spec(iptables.PRE, "ACCEPT", dst="10.9.9.9")
    assert iptables.parse(4, [odd]) == {Foreign(4, str(odd))}
    # An entry this program does not write (here: -j ACCEPT) reads as Foreign, with words for it.
    accept = xtables.LAYOUT[4].standard(-2)
    assert iptables.decode(4, iptables.PRE, accept) is None
    assert iptables.read_back(4, {iptables.PRE: (1, [accept])}) == {Foreign(4, iptables.describe(4, iptables.PRE,
                                                                                                accept))}
    # Two jumps to an owned chain, or a second DNAT for the same address, are drift, not a crash.
    dnat = iptables.encode(4, iptables.Spec(iptables.PRE, "DNAT", "10.0.0.5", dst="100.64.0.1"))
    assert any(isinstance(r, Foreign) for r in iptables.read_back(4, {iptables.PRE: (2, [dnat])}))
    other = iptables.encode(4, iptables.Spec(iptables.PRE, "DNAT", "10.0.0.6", dst="100.64.0.1"))
    found = Plan.read_back(iptables.read_back(4, {iptables.PRE: (1, [dnat, other])}))
    assert sorted(type(r).__name__ for r in found.rules) == ["Dnat", "Foreign"]


def test_plan_rejects_ambiguous_rules() -> None:
    with pytest.raises(PlanError):
        Plan.of(Dnat(a("100.64.0.1"), (a("10.0.0.5"),)), Dnat(a("100.64.0.1"), (a("10.0.0.6"),)))
    with pytest.raises(PlanError):
        Plan.of(Dnat(a("100.64.0.1"), (a("fd00::1"),)))
    with pytest.raises(PlanError):
        Plan.of(DnatNonTailnet(a("100.64.0.7")), DnatNonTailnet(a("100.64.0.8")))


def test_read_back_turns_overlapping_rules_into_drift() -> None:
    """Rules read from the kernel may overlap (someone added a second DNAT for our address): one of them
    reads as Foreign, and the plan is built instead of raising PlanError."""
    one, two = Dnat(a("100.64.0.1"), (a("10.0.0.5"),)), Dnat(a("100.64.0.1"), (a("10.0.0.6"),))
    with pytest.raises(PlanError):
        Plan.of(one, two)
    found = Plan.read_back([one, two, MssClamp(4)])
    assert sorted(type(r).__name__ for r in found.rules) == ["Dnat", "Foreign", "MssClamp"]
    assert found == Plan.read_back([two, one, MssClamp(4)])  # the same one, whatever the order
    assert Plan.read_back([one, MssClamp(4)]) == Plan.of(one, MssClamp(4))


def test_iptables_rendering_matches_upstream_shapes() -> None:
    plan = Plan.of(Dnat(a("100.64.0.1"), (a("10.0.0.5"),)), DnatNonTailnet(a("100.64.0.7")),
                   Snat(a("100.64.0.7"), a("100.64.0.1")), MssClamp(4),
                   Dnat(a("100.64.0.9"), (a("10.0.0.1"), a("10.0.0.2"))))
    # As iptables-save prints them (tests/netns/test_xtables.py holds the kernel's copy to this).
    text = [str(s) for s in iptables.render(plan, 4)]
    assert text == [
        "-A CONTAINERBOOT-PREROUTING -d 100.64.0.1/32 -j DNAT --to-destination 10.0.0.5",
        "-A CONTAINERBOOT-PREROUTING -d 100.64.0.9/32 -m statistic --mode nth --every 2 --packet 0 "
        "-j DNAT --to-destination 10.0.0.2",
        "-A CONTAINERBOOT-PREROUTING -d 100.64.0.9/32 -j DNAT --to-destination 10.0.0.1",
        "-A CONTAINERBOOT-PREROUTING ! -i tailscale0 -j DNAT --to-destination 100.64.0.7",
        "-A CONTAINERBOOT-POSTROUTING -d 100.64.0.7/32 -j SNAT --to-source 100.64.0.1",
        "-A CONTAINERBOOT-FORWARD -o tailscale0 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu",
        "-A CONTAINERBOOT-FORWARD -i tailscale0 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu",
    ]


def test_nftables_small_update_touches_only_the_changed_mapping() -> None:
    old = Plan.of(*(Dnat(a(f"100.64.{i // 250}.{i % 250 + 1}"), (a("10.0.0.5"),)) for i in range(1000)))
    new = Plan(frozenset({*(r for r in old.rules if r.match != a("100.64.0.1")),  # type: ignore[union-attr]
                          Dnat(a("100.64.0.1"), (a("10.0.0.6"),))}))
    cmds = as_json(nftables.update_table(4, old, new))
    assert cmds == [
        {"delete": {"element": {"family": "ip", "table": "containerboot", "name": "ingress", "elem": ["100.64.0.1"]}}},
        {"add": {"element": {"family": "ip", "table": "containerboot", "name": "ingress",
                             "elem": [["100.64.0.1", "10.0.0.6"]]}}},
    ]
    assert nftables.update_table(4, old, old) == []


def test_nftables_portmap_update_is_one_element_per_map() -> None:
    """A PortMap that moves is one element deleted and added in each of its two maps; removing the last
    PortMap of an interface and protocol removes its maps (after the chains no longer look them up)."""
    old = Plan.of(*(PortMap("tcp" if i % 2 else "udp", 1000 + i, a(f"10.0.{i // 250}.{i % 250 + 1}"), 80)
                    for i in range(1000)))
    moved = PortMap("udp", 1000, a("10.9.9.9"), 8053)
    new = Plan(frozenset({*(r for r in old.rules if r.port != 1000), moved}))  # type: ignore[union-attr]
    ref = {"family": "ip", "table": "containerboot"}
    assert as_json(nftables.update_table(4, old, new)) == [
        {"delete": {"element": {**ref, "name": "portmap_udp_addr", "elem": [1000]}}},
        {"delete": {"element": {**ref, "name": "portmap_udp_port", "elem": [1000]}}},
        {"add": {"element": {**ref, "name": "portmap_udp_addr", "elem": [[1000, "10.9.9.9"]]}}},
        {"add": {"element": {**ref, "name": "portmap_udp_port", "elem": [[1000, 8053]]}}},
    ]
    last = as_json(nftables.update_table(4, Plan.of(moved), Plan()))
    assert [next(iter(c)) for c in last][-2:] == ["delete", "delete"]
    assert [c["delete"]["map"]["name"] for c in last[-2:]] == ["portmap_udp_addr", "portmap_udp_port"]


def test_portmap_renderings_match_upstream_shapes() -> None:
    plan = Plan.of(PortMap("tcp", 80, a("10.0.0.5"), 8080), PortMap("udp", 53, a("fd00::5"), 5353))
    assert [str(s) for s in iptables.render(plan, 4)] == [
        "-A CONTAINERBOOT-PREROUTING ! -i tailscale0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.5:8080"]
    assert [str(s) for s in iptables.render(plan, 6)] == [
        "-A CONTAINERBOOT-PREROUTING ! -i tailscale0 -p udp -m udp --dport 53 -j DNAT --to-destination [fd00::5]:5353"]
    assert nftables.portmap_maps("tailscale0", "tcp") == ("portmap_tcp_addr", "portmap_tcp_port")
    for iface in ("tailscale0", "eth0.100", "a_b"):
        for proto in ("tcp", "udp"):
            addr, port = nftables.portmap_maps(iface, proto)
            assert nftables.portmap_group(addr) == ((iface, proto), False)
            assert nftables.portmap_group(port) == ((iface, proto), True)
    for name in ("portmap_zz_tcp_addr", "portmap_sctp_addr", "portmap_tcp", "ingress", "portmap_74_tcp_addr_x"):
        assert nftables.portmap_group(name) is None


def test_portmap_entries_are_encode() -> None:
    """The template path writes and reads exactly what encode() and decode() do, in every DNAT revision."""
    for fam, revs in ((4, (0, 1, 2)), (6, (1, 2))):
        to = a("10.1.2.3") if fam == 4 else a("fd00::1:2:3")
        for rev in revs:
            for proto in ("tcp", "udp"):
                for port, to_port in ((1, 65535), (65535, 1), (443, 8443)):
                    rule = PortMap(proto, port, to, to_port)
                    entry = iptables.PortEntries(fam, rev, proto, "tailscale0")(rule)
                    assert entry == iptables.encode(fam, iptables.specs(rule)[0], rev)
                    assert iptables.PortEntries(fam, rev, proto, "tailscale0").parse(entry) == rule
                    assert iptables.decode(fam, iptables.PRE, entry) == iptables.specs(rule)[0]
            # Not ours: the other protocol's template, or a range of ports, is no PortMap.
            entry = iptables.PortEntries(fam, rev, "tcp", "tailscale0")(PortMap("tcp", 80, to, 81))
            assert iptables.PortEntries(fam, rev, "udp", "tailscale0").parse(entry) is None
            wide = bytearray(entry)
            wide[xtables.LAYOUT[fam].size + xtables.HDR + 6] ^= 1  # dpts[1]: 80-81
            assert iptables.PortEntries(fam, rev, "tcp", "tailscale0").parse(bytes(wide)) is None
            found = iptables.read_back(fam, {iptables.PRE: (1, [bytes(wide)])})
            assert [type(r) for r in found] == [Foreign]


def test_nftables_port_maps_read_back_strictly() -> None:
    """Elements in only one of the two maps, or maps no rule looks up, are drift (Foreign)."""
    plan = Plan.of(PortMap("tcp", 80, a("10.0.0.5"), 8080), PortMap("udp", 53, a("10.0.0.6"), 53))
    objs = listed(nftables.full_table(4, plan))
    assert nftables.parse_table(4, objs).rules == plan.rules
    addr_map = next(o["map"] for o in objs if o.get("map", {}).get("name") == "portmap_udp_addr")
    addr_map["elem"] = []
    got = nftables.parse_table(4, objs).rules
    assert PortMap("tcp", 80, a("10.0.0.5"), 8080) in got and any(isinstance(r, Foreign) for r in got)
    unused = [o for o in listed(nftables.full_table(4, plan))
              if not ("rule" in o and o["rule"]["expr"] == nftables.portmap_expr("tailscale0", "tcp"))]
    got = nftables.parse_table(4, unused).rules
    assert PortMap("udp", 53, a("10.0.0.6"), 53) in got and any(isinstance(r, Foreign) for r in got)


# ---- proxy plans ------------------------------------------------------------------------------------

TS4, TS6 = a("100.64.0.1"), a("fd7a:115c:a1e0::1")


def test_ingress_plan_follows_the_current_address() -> None:
    s = load({"TS_USERSPACE": "false", "TS_DEST_IP": "10.0.0.5"})
    plan, _ = proxy.plan(s, proxy.Inputs((TS4, TS6)))
    assert plan == Plan.of(Dnat(TS4, (a("10.0.0.5"),)), MssClamp(4))
    moved, _ = proxy.plan(s, proxy.Inputs((a("100.64.0.9"), TS6)))
    assert moved == Plan.of(Dnat(a("100.64.0.9"), (a("10.0.0.5"),)), MssClamp(4))
    assert proxy.plan(s, proxy.Inputs(()))[0] == Plan()


def test_ingress_to_ipv6_backend() -> None:
    s = load({"TS_USERSPACE": "false", "TS_DEST_IP": "fd18::5"})
    plan, notes = proxy.plan(s, proxy.Inputs((TS4, TS6)))
    assert plan == Plan.of(Dnat(TS6, (a("fd18::5"),)), MssClamp(6))
    assert any("issues/12156" in n for n in notes)
    with pytest.raises(proxy.ProxyError, match=r"no tailscale IP matching family of fd18::5 found in \[[0-9.]+/32\]$"):
        proxy.plan(s, proxy.Inputs((TS4,)))
    # IPv6 NAT unusable in this kernel: nothing half-done, and a note says what is skipped.
    plan, notes = proxy.plan(s, proxy.Inputs((TS4, TS6)), families=(4,))
    assert plan == Plan() and any("not installing" in n for n in notes)


def test_egress_plan() -> None:
    s = load({"TS_USERSPACE": "false", "TS_TAILNET_TARGET_IP": "100.64.0.7"})
    plan, _ = proxy.plan(s, proxy.Inputs((TS4, TS6), proxy.egress_targets(s)))
    assert plan == Plan.of(DnatNonTailnet(a("100.64.0.7")), Snat(a("100.64.0.7"), TS4), MssClamp(4))
    fqdn = load({"TS_USERSPACE": "false", "TS_TAILNET_TARGET_FQDN": "db.example.ts.net"})
    targets = proxy.egress_targets(fqdn, (a("100.64.0.8"), a("fd7a:115c:a1e0::8")))
    plan, _ = proxy.plan(fqdn, proxy.Inputs((TS4, TS6), targets))
    assert {type(r) for r in plan.rules} == {DnatNonTailnet, Snat, MssClamp} and plan.families() == {4, 6}
    # Go's formatting, which users' searches match: a []netip.Prefix and a bool.
    with pytest.raises(proxy.ProxyError, match=r"^no forwarding rules for egress addresses \[fd7a:115c:a1e0::8/128\], "
                                               r"host supports IPv6: false$"):
        proxy.plan(fqdn, proxy.Inputs((TS4, TS6), (a("fd7a:115c:a1e0::8"),)), families=(4,))


def test_dns_name_ingress_balances_per_family() -> None:
    s = load({"TS_USERSPACE": "false", "TS_EXPERIMENTAL_DEST_DNS_NAME": "backend.svc"})
    backends = (a("10.0.0.5"), a("10.0.0.6"), a("fd18::5"))
    plan, _ = proxy.plan(s, proxy.Inputs((TS4, TS6), dest_backends=backends))
    assert plan == Plan.of(Dnat(TS4, (a("10.0.0.5"), a("10.0.0.6"))), Dnat(TS6, (a("fd18::5"),)),
                           MssClamp(4), MssClamp(6))


def test_cluster_traffic_via_ingress() -> None:
    s = load({"TS_USERSPACE": "false", "EXPERIMENTAL_ALLOW_PROXYING_CLUSTER_TRAFFIC_VIA_INGRESS": "true",
              "TS_SERVE_CONFIG": "/s.json", "POD_IP": "10.1.0.9"})
    plan, _ = proxy.plan(s, proxy.Inputs((TS4,)))
    assert plan == Plan.of(Dnat(a("10.1.0.9"), (TS4,)))


@settings(max_examples=100, deadline=None)
@given(plans(), st.sampled_from([0, 1, 2]))
def test_iptables_chain_entries_are_the_rendering_encoded(plan: Plan, dnat: int) -> None:
    """The fast path (single-target DNATs spliced into a template) writes what render() and encode() write."""
    for fam in (4, 6):
        rev = dnat if fam == 4 or dnat else 1
        slow: dict[str, list[bytes]] = {c: [] for c in iptables.CHAINS}
        for spec in iptables.render(plan, fam):
            slow[spec.chain].append(iptables.encode(fam, spec, rev))
        assert iptables.chain_entries(plan, fam, rev) == slow


def test_ingress_says_what_the_other_family_forwards() -> None:
    """Netfilter cannot NAT between IPv4 and IPv6: the tailnet address of the other family forwards nothing,
    and one line says which, for which Service address, and where clients do reach it."""
    s = load({"TS_USERSPACE": "false", "TS_DEST_IP": "10.0.0.5"})
    plan, notes = proxy.plan(s, proxy.Inputs((TS4, TS6)))
    assert notes == [f"TS_DEST_IP 10.0.0.5 is IPv4: this proxy's IPv6 tailnet address {TS6} forwards nothing "
                     f"(netfilter cannot translate IPv6 to IPv4); clients reach the Service at {TS4}"]
    assert {r.family for r in plan.rules} == {4}  # nothing half-installed for IPv6
    assert proxy.plan(s, proxy.Inputs((TS4,)))[1] == []  # a node without an IPv6 address: nothing to say
    v6 = load({"TS_USERSPACE": "false", "TS_DEST_IP": "fd18:96::5"})
    plan, notes = proxy.plan(v6, proxy.Inputs((TS4, TS6)))
    assert len(notes) == 1 and notes[0].startswith(f"TS_DEST_IP fd18:96::5 is IPv6: this proxy's IPv4 tailnet address "
                                                   f"{TS4} forwards nothing")
    assert {r.family for r in plan.rules} == {6}


@pytest.mark.parametrize("command", [["plan", "--tailnet-ip", "100.64.0.5", "--tailnet-ip", "fd7a:115c:a1e0::5"],
                                     ["status"]])
def test_plan_and_status_say_it_too(command: list[str]) -> None:
    from click.testing import CliRunner

    from containerboot.commands import commands as main

    result = CliRunner().invoke(main, command, env={"TS_USERSPACE": "false", "TS_DEST_IP": "fd18:96::5",
                                                    "TS_TEST_FAKE_NETFILTER": "1", "TS_STATE_DIR": ""})
    assert result.exit_code == 0, result.output
    assert "TS_DEST_IP fd18:96::5 is IPv6: this proxy's IPv4 tailnet address" in result.output
