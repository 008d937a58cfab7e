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
        assert "target of 1 rule(s) outside PREROUTING" in str(exc)
    else:
        raise AssertionError("removed a chain that a rule elsewhere still jumps to")
    # Rewriting it is fine: the jump moves with the chain.
    kept = spliced(crafted, {iptables.PRE: ("PREROUTING", [dnat(4, 2), dnat(4, 3)])})
    assert shape(kept)["OUTPUT"][0] == ("jump", iptables.PRE)
