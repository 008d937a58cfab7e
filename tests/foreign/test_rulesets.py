"""Real rulesets, loaded with counters (some above 4 GiB) into a fresh namespace, then three driver steps: an apply
of hundreds of mappings (egress services' port maps with their SNATs, ingress services' VIPs, an ingress proxy,
MSS clamping), a second apply that changes about half of them, and a flush. After each step every foreign table,
chain, policy, rule and counter reads back exactly as loaded, and our chains are exactly as planned (after the
flush: gone, and the whole save is the one before the first apply, apart from tables the apply had to create).

No packet crosses the namespace (only its loopback is up), so no counter may move.

Each case runs twice: with this checkout's containerboot, and with the linux/386 image's own in a container of
its own (`-k 386`; a docker test), whose 32-bit Python reads and writes the tables in the i386 layout (an
ip6t_entry of 164 bytes, not 168) through the kernel's compat layer, among the same foreign rules, loaded and
read back by this machine's 64-bit tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.foreign import (
    TARGETS,
    Services,
    Target,
    apply,
    check_ours,
    compare,
    dataset,
    flush,
    load,
    save,
    split,
    with_counters,
)

pytestmark = pytest.mark.root

# Each case is one namespace: an IPv4 and an IPv6 ruleset loaded side by side (where a source has one family
# only, the other family's tables are the driver's to create). IPv6 foreign rules in nat and mangle come from
# extensions.v6 alone: the real IPv6 rulesets at hand are under non-commercial licences (data/SOURCES.md).
CASES = [
    ("extensions.v4", "extensions.v6"),
    ("openlab.v4", None),
    ("kube-proxy.v4", None),
    ("tails.v4", None),
    ("kube-portals.v4", None),
]


def check(target: Target, before: dict[int, list[str]], services: Services | None, step: str) -> None:
    """Foreign lines as before and ours as planned, in both families; after the flush (no services), the whole
    save, our lines not taken out, as before."""
    problems = []
    for fam in (4, 6):
        now = save(target, fam)
        foreign, ours = split(now)
        changed = compare(before[fam], foreign if services else now)
        if changed:
            problems.append(f"IPv{fam}, {'foreign rules' if services else 'the whole save'} after {step}:\n{changed}")
        wrong = check_ours(ours, services.plan() if services else None, fam)
        problems += [f"IPv{fam}, our chains after {step}: {p}" for p in wrong]
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("target", TARGETS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=["+".join(n for n in c if n) for c in CASES])
def test_foreign_rules_come_through_apply_apply_flush(target: Target, lockfile: str, tmp_path: Path,
                                                     case: tuple[str, str | None]) -> None:
    before = {}
    for fam, name in zip((4, 6), case, strict=True):
        before[fam] = load(target, fam, with_counters(dataset(name)), tmp_path) if name else save(target, fam)
    first, second = Services(0), Services(1)

    apply(target, first, lockfile)
    check(target, before, first, "the first apply")
    apply(target, second, lockfile)
    check(target, before, second, "the second apply")
    flush(target, lockfile)
    check(target, before, None, "the flush")
