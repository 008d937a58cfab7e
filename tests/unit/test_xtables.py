"""Splicing owned chains into a legacy xtables table (pure): everything else stays, jumps keep their targets.

The kernel's side of the same (tables iptables-legacy-restore wrote, counters, iptables -C agreeing with
our entries) is in tests/netns/test_xtables.py."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from firewall import iptables, xtables
from firewall.iptables import Spec

NAT_HOOKS = (0, 1, 3, 4)  # PREROUTING, INPUT, OUTPUT, POSTROUTING
NONE = 0xFFFFFFFF


def empty_nat(fam: int) -> xtables.Table:
    """The nat table as the kernel creates it: four built-in chains that accept, and the closing ERROR."""
    lay = xtables.LAYOUT[fam]
    policy = lay.standard(xtables.ACCEPT)
    hooks = [NONE] * 5
    for k, hook in enumerate(NAT_HOOKS):
        hooks[hook] = k * len(policy)
    blob = policy * len(NAT_HOOKS) + lay.error("ERROR")
    mask = sum(1 << h for h in NAT_HOOKS)
    return xtables.Table(lay, "nat", (mask, *hooks, *hooks, len(NAT_HOOKS) + 1), blob)


def spliced(table: xtables.Table, owned: Mapping[str, tuple[str | None, list[bytes] | None]]) -> xtables.Table:
    new = xtables.splice(table, owned)
    info = (table.valid_hooks, *new.hook_entry, *new.underflow, new.entries)
    out = xtables.Table(table.lay, table.name, info, new.blob)
    assert out.offs == new.offs
    return out


def shape(table: xtables.Table) -> dict[str, list[object]]:
    """Each chain's entries, a jump shown as the name of the chain it lands on (offsets differ between tables)."""
    bodies = {c.body: c.name for c in table.chains}
    jumps = {o: v for o, _, v in table.jumps}
    out: dict[str, list[object]] = {}
    for chain in table.chains:
        first, last = table.index[chain.body], table.index[chain.end]
        out[chain.name] = [("jump", bodies.get(jumps[o], "?")) if o in jumps else table.blob[o:table.offs[i + 1]]
                           for i, o in enumerate(table.offs[first:last], start=first)]
    return out


def dnat(fam: int, n: int) -> bytes:
    dst, to = (f"100.64.{n // 250}.{n % 250 + 1}", "198.18.0.1") if fam == 4 else (f"fd7a::{n + 1:x}", "fd18::1")
    return iptables.encode(fam, Spec(iptables.PRE, "DNAT", to, dst=dst))


names = st.sampled_from(["AAA", "CONTAINER", "KUBE-SERVICES", "ZZZ", "ts-prerouting"])
foreign = st.dictionaries(names, st.tuples(st.sampled_from(["PREROUTING", "POSTROUTING", "OUTPUT", None]),
                                           st.integers(0, 3)), max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([4, 6]), foreign, st.integers(0, 40), st.integers(0, 40))
def test_owned_chains_come_and_go_leaving_the_rest(fam: int, others: dict[str, tuple[str | None, int]],
                                                    first: int, second: int) -> None:
    # Someone else's chains, each with some rules, some reached from a built-in chain.
    before = spliced(empty_nat(fam), {name: (base, [dnat(fam, 1000 + k) for k in range(n)])
                                      for name, (base, n) in others.items()})
    theirs = shape(before)
    ours = {iptables.PRE: ("PREROUTING", [dnat(fam, k) for k in range(first)]),
            iptables.POST: ("POSTROUTING", [dnat(fam, k) for k in range(second)])}
    after = spliced(before, ours)
    got = shape(after)
    for chain in (iptables.PRE, iptables.POST):
        base = ours[chain][0]
        assert got[chain] == ours[chain][1]
        assert got[base][0] == ("jump", chain) and got[base].count(("jump", chain)) == 1
        got[base].remove(("jump", chain))
        del got[chain]
    assert got == theirs
    names = [c.name for c in after.chains if c.hook is None]
    assert names == sorted(names)  # user chains in name order, as iptables keeps them

    # Changed again: still one jump each, the new rules.
    changed = spliced(after, {iptables.PRE: ("PREROUTING", [dnat(fam, k + 7) for k in range(second)]),
                              iptables.POST: ("POSTROUTING", None)})
    got = shape(changed)
    assert iptables.POST not in got and got["PREROUTING"].count(("jump", iptables.PRE)) == 1
    # Removed: the table is byte for byte what it was.
    gone = spliced(changed, {iptables.PRE: ("PREROUTING", None), iptables.POST: ("POSTROUTING", None)})
    assert (gone.blob, gone.info) == (before.blob, before.info)


def test_unchanged_rules_keep_their_counters_and_others_keep_theirs() -> None:
    base = spliced(empty_nat(4), {"AAA": ("PREROUTING", [dnat(4, 900)])})
    with_ours = spliced(base, {iptables.PRE: ("PREROUTING", [dnat(4, 1), dnat(4, 2), dnat(4, 3)])})
    new = xtables.splice(with_ours, {iptables.PRE: ("PREROUTING", [dnat(4, 1), dnat(4, 5), dnat(4, 3)])})
    old_counters = b"".join(i.to_bytes(8, "little") * 2 for i in range(with_ours.num_entries))
    counters = new.counters_from(old_counters)
    table = spliced(with_ours, {iptables.PRE: ("PREROUTING", [dnat(4, 1), dnat(4, 5), dnat(4, 3)])})
    kept = {table.blob[o:table.offs[i + 1]]: int.from_bytes(counters[i * 16:i * 16 + 8], "little")
            for i, o in enumerate(table.offs[:-1])}
    old = {with_ours.blob[o:with_ours.offs[i + 1]]: i for i, o in enumerate(with_ours.offs[:-1])}
    assert kept[dnat(4, 1)] == old[dnat(4, 1)] and kept[dnat(4, 3)] == old[dnat(4, 3)]
    assert kept[dnat(4, 5)] == 0  # new: no counters
    assert kept[dnat(4, 900)] == old[dnat(4, 900)]  # someone else's rule keeps its own


def test_a_rule_elsewhere_that_jumps_to_an_owned_chain_stops_its_removal() -> None:
    table = spliced(empty_nat(4), {iptables.PRE: ("PREROUTING", [dnat(4, 1)]), "OTHER": ("OUTPUT", [])})
    # Turn the jump OUTPUT -> OTHER into OUTPUT -> ours: someone else's rule that uses our chain.
    at = table.by_name["OUTPUT"].start
    jump = table.lay.standard(table.by_name[iptables.PRE].body)
    blob = table.blob[:at] + jump + table.blob[at + len(jump):]
    crafted = xtables.Table(table.lay, "nat", table.info, blob)
    assert shape(crafted)["OUTPUT"][0] == ("jump", iptables.PRE)
    try:
        xtables.splice(crafted, {iptables.PRE: ("PREROUTING", None)})
    except xtables.TableError as exc:
        assert "rules we did not install jump to it (OUTPUT rule 1)" in str(exc)
    else:
        raise AssertionError("removed a chain that a rule elsewhere still jumps to")
    # Rewriting it is fine: the jump moves with the chain.
    kept = spliced(crafted, {iptables.PRE: ("PREROUTING", [dnat(4, 2), dnat(4, 3)])})
    assert shape(kept)["OUTPUT"][0] == ("jump", iptables.PRE)


def with_entry(table: xtables.Table, chain: str, at: int, entry: bytes) -> xtables.Table:
    """`table` with someone else's `entry` inserted as rule `at` of the built-in `chain` (a jump in `entry`
    to offset v >= its own position is moved along), as iptables -I would leave it."""
    lay, c = table.lay, table.by_name[chain]
    pos = table.offs[table.index[c.body] + at]
    n = len(entry)
    blob = bytearray(table.blob[:pos] + entry + table.blob[pos:])
    for o, verdict_at, v in table.jumps:
        if v >= pos:
            new_o = o + n if o >= pos else o
            xtables.I32.pack_into(blob, verdict_at - o + new_o, v + n)
    hooks = [h + n if h != NONE and h > pos else h for h in table.hook_entry]
    under = [u + n if u != NONE and u >= pos else u for u in table.underflow]
    info = (table.valid_hooks, *hooks, *under, table.num_entries + 1)
    assert lay.size <= n
    return xtables.Table(lay, table.name, info, bytes(blob))


def test_a_rule_without_a_target_above_our_jump_keeps_falling_through() -> None:
    # iptables -t nat -I PREROUTING 1 -s 198.18.9.1/32: the kernel holds it as a jump to the next entry.
    ours = spliced(empty_nat(4), {iptables.PRE: ("PREROUTING", [dnat(4, 1)])})
    lay = ours.lay
    start = ours.by_name["PREROUTING"].start
    ip = lay.ip.pack(b"\xc6\x12\x09\x01", bytes(4), b"\xff" * 4, bytes(4), bytes(16), bytes(16), bytes(16),
                     bytes(16), 0, 0, 0)
    size = lay.size + xtables.align(xtables.HDR + 4)
    bare = lay.entry(ip, b"", xtables.ext("", xtables.I32.pack(start + size)))
    table = with_entry(ours, "PREROUTING", 0, bare)
    assert [v for o, _, v in table.jumps if o == start] == [start + size]  # a fallthrough
    for owned in ({iptables.PRE: ("PREROUTING", None)}, {iptables.PRE: ("PREROUTING", [dnat(4, 2)])}):
        out = spliced(table, owned)
        first = out.by_name["PREROUTING"].start
        assert out.blob[first:first + lay.ip.size] == ip
        assert [v for o, _, v in out.jumps if o == first] == [first + size]  # still the entry after it
    assert spliced(table, {iptables.PRE: ("PREROUTING", None)}).blob == \
        spliced(empty_nat(4), {}).blob[:start] + bare + spliced(empty_nat(4), {}).blob[start:]


def test_someone_elses_jump_to_our_chain_is_theirs() -> None:
    ours = spliced(empty_nat(4), {iptables.PRE: ("PREROUTING", [dnat(4, 1)])})
    lay, body = ours.lay, ours.by_name[iptables.PRE].body
    # iptables -t nat -I PREROUTING 1 -i eth7 -j CONTAINERBOOT-PREROUTING, and the same unconditional jump
    # with a byte counter: only the exact entry we install (counters aside) is ours.
    iface = b"eth7".ljust(16, b"\0")
    ip = lay.ip.pack(bytes(4), bytes(4), bytes(4), bytes(4), iface, bytes(16), b"\xff" * 5 + bytes(11), bytes(16),
                     0, 0, 0)
    size = lay.size + xtables.align(xtables.HDR + 4)
    theirs = lay.entry(ip, b"", xtables.ext("", xtables.I32.pack(body + size)))  # where the body will be
    for at in (0, 1):  # above our jump, and below it
        table = with_entry(ours, "PREROUTING", at, theirs)
        pre, chain = table.by_name["PREROUTING"], table.by_name[iptables.PRE]
        assert len(table.jumps_to(chain, pre)) == 2 and len(table.our_jumps(chain, pre)) == 1
        out = spliced(table, {iptables.PRE: ("PREROUTING", [dnat(4, 1), dnat(4, 2)])})
        got = shape(out)["PREROUTING"]
        assert got == [("jump", iptables.PRE)] * 2  # both stay: ours and theirs
        kept = out.offs[out.index[out.by_name["PREROUTING"].start] + at]
        assert out.blob[kept:kept + lay.ip.size] == ip  # theirs, where it was
        try:
            xtables.splice(table, {iptables.PRE: ("PREROUTING", None)})
        except xtables.TableError as exc:
            assert f"(PREROUTING rule {at + 1})" in str(exc)
        else:
            raise AssertionError("flushed a chain someone else's rule jumps to")


def test_counters_and_comefrom_are_not_part_of_an_entry() -> None:
    # IPv6 counters sit after 4 bytes of padding on 64-bit (ip6t_entry: comefrom 144, counters 152-167):
    # a byte counter above 4 GiB sets the high half at 164-167, which must be masked as well.
    for fam in (4, 6):
        table = spliced(empty_nat(fam), {iptables.PRE: ("PREROUTING", [dnat(fam, 1)])})
        lay = table.lay
        raw = bytearray(table.blob)
        for o in table.offs:
            xtables.struct.pack_into("=I", raw, o + lay.comefrom_at, 0x1F)
            xtables.struct.pack_into("=QQ", raw, o + lay.counters_at, 1, 4294967297 + o)
        again = xtables.Table(lay, "nat", table.info, bytes(raw))
        assert again.blob == table.blob
        assert xtables.mask(lay, bytes(raw), table.offs) == table.blob


def test_the_derived_layout_is_the_kernel_uapi_one_for_this_platform() -> None:
    # x86_64 and arm64 (the two 64-bit platforms the image ships): the kernel's UAPI sizes. The 32-bit ones
    # are checked in their images (tests/i386, tests/platforms).
    assert xtables.ABI == ("little", 8, 8)
    assert (xtables.LAYOUT[4].size, xtables.LAYOUT[6].size, xtables.LAYOUT[6].counters_at) == (112, 168, 152)
    assert (xtables.REPLACE.size, xtables.GET_ENTRIES.size, xtables.COUNTERS_INFO.size) == (96, 40, 40)
    standard = len(xtables.LAYOUT[4].standard(0)) - 112
    dnat = len(iptables.encode(4, iptables.Spec(iptables.PRE, "DNAT", "198.18.0.1", dst="100.64.0.1"))) - 112
    assert (standard, len(iptables.port_match("tcp", 1)), dnat) == (40, 48, 80)
