"""The comparisons the other tests rely on see a change: a foreign rule's counters (only the bytes above 4 GiB),
a policy's counters, a rule moved to another place in its chain, one rule of ours too many, a second jump to one
of our chains. Each change is made by iptables-legacy itself, after an apply among a real ruleset."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.foreign import (
    IPT,
    Services,
    Target,
    apply,
    check_ours,
    compare,
    dataset,
    load,
    save,
    split,
    tool,
    with_counters,
)

pytestmark = pytest.mark.root


def test_each_kind_of_change_is_seen(target: Target, lockfile: str, tmp_path: Path) -> None:
    before = load(target, 4, with_counters(dataset("kube-proxy.v4")), tmp_path)
    services = Services(0)
    apply(target, services, lockfile)

    def changed() -> tuple[str, list[str]]:
        foreign, ours = split(save(target, 4))
        return compare(before, foreign), check_ours(ours, services.plan(), 4)

    assert changed() == ("", [])

    # A nat rule loaded with more than 4 GiB of bytes keeps its packets and loses 2^32 bytes.
    chain, number, spec, packets, count = find(before, "nat", lambda p, b: b > 2**32)
    tool(target, "sh", "-c", f"{IPT[4]} -t nat -R {chain} {number} {spec} -c {packets} {count - 2**32}")
    foreign_diff, ours_wrong = changed()
    assert f"-[{packets}:{count}] -A {chain} {spec}" in foreign_diff, foreign_diff
    assert f"+[{packets}:{count - 2**32}] -A {chain} {spec}" in foreign_diff, foreign_diff
    assert ours_wrong == []
    # (iptables -R itself zeroed the nat policies' counters: seen too)
    assert "-:PREROUTING ACCEPT [" in foreign_diff and "+:PREROUTING ACCEPT [0:0]" in foreign_diff, foreign_diff
    before = split(save(target, 4))[0]

    # A filter rule moved from the top of its chain to the end, counters and all.
    chain, number, spec, packets, count = find(before, "filter", lambda p, b: True)
    tool(target, "sh", "-c", f"{IPT[4]} -D {chain} {number} && {IPT[4]} -A {chain} {spec} -c {packets} {count}")
    foreign_diff, _ = changed()
    moved = f"[{packets}:{count}] -A {chain} {spec}"
    assert f"-{moved}" in foreign_diff and f"+{moved}" in foreign_diff, foreign_diff
    before = split(save(target, 4))[0]

    # One rule of ours too many, and a second jump to our chain.
    tool(target, IPT[4], "-t", "nat", "-A", "CONTAINERBOOT-PREROUTING", "-d", "100.64.9.9", "-j", "ACCEPT")
    tool(target, IPT[4], "-t", "mangle", "-A", "FORWARD", "-j", "CONTAINERBOOT-FORWARD")
    foreign_diff, ours_wrong = changed()
    assert foreign_diff == ""
    assert any("-A CONTAINERBOOT-PREROUTING -d 100.64.9.9/32 -j ACCEPT" in p for p in ours_wrong), ours_wrong
    assert any(p.startswith("jumps to our chains") for p in ours_wrong), ours_wrong


def find(lines: list[str], table: str, want: Callable[[int, int], bool]) -> tuple[str, int, str, int, int]:
    """The first rule of `table` whose counters (packets, bytes) are wanted: its chain, its number there, the
    rest of its line, its counters."""
    current, numbers = "", Counter[str]()
    for line in lines:
        if line.startswith("*"):
            current, numbers = line[1:], Counter()
        head, _, rule = line.partition(" -A ")
        if not rule:
            continue
        chain, _, spec = rule.partition(" ")
        numbers[chain] += 1
        packets, count = (int(n) for n in head[1:-1].split(":"))
        if current == table and want(packets, count) and spec:
            return chain, numbers[chain], spec, packets, count
    raise AssertionError(f"no such rule in {table}")
