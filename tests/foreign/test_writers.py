"""Other programs writing the same tables at the same time: while the driver applies again and again, four
writers (`iptables-legacy -w` and `ip6tables-legacy -w`, two per family) insert and delete rules of their own
in nat, mangle and filter, some of them target-less, some at the top of a base chain, above our jump. They and
the driver take the same xtables lock (a file of the test's own). At the end no foreign rule is lost or
duplicated: the loaded ruleset reads back with every rule and rule counter as loaded (policy counters aside:
iptables-legacy itself zeroes them in every table it writes), the writers' rules are exactly those they
inserted and did not delete, and our chains are as planned, first after an apply, then gone after a flush."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
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
    flush,
    load,
    save,
    split,
    try_apply,
    with_counters,
)
from tests.lab.netns import Lab

pytestmark = pytest.mark.root

# A real firewall with foreign nat and mangle rules; iptables' extension tests, most of them target-less, in
# every table the driver writes (ip6tables', as no real IPv6 ruleset here has nat or mangle rules).
RULESETS = {4: "openlab.v4", 6: "extensions.v6"}
OPS = 70  # insertions per writer (and 23 deletions)
PLACES = [("nat", "PREROUTING"), ("mangle", "FORWARD"), ("nat", "POSTROUTING"), ("filter", "INPUT"),
          ("nat", "OUTPUT"), ("mangle", "PREROUTING"), ("filter", "FORWARD")]
TARGETS = ["", "-j ACCEPT", "-j RETURN", "-j LOG --log-prefix writer"]
DEADLINE = 60.0  # seconds for the whole exchange; it takes about 5


@dataclass(frozen=True)
class Op:
    table: str
    chain: str
    action: str  # -I (at the top), -A or -D
    spec: str
    tag: str  # the rule's comment: which writer, which insertion

    def argv(self, fam: int) -> str:
        where = f"{self.chain} 1" if self.action == "-I" else self.chain
        return f"{IPT[fam]} -w -t {self.table} {self.action} {where} {self.spec}"


def writer_ops(fam: int, w: int) -> list[Op]:
    """Writer `w`'s operations, in order: after every third insertion, one of the two before it is deleted
    again, so that rules inserted at the top (every third) and appended ones both stay and go."""
    ops: list[Op] = []
    inserted: list[Op] = []
    for k in range(OPS):
        table, chain = PLACES[(k + w) % len(PLACES)]
        source = f"198.18.{100 + w}.{k + 1}" if fam == 4 else f"fd18:{100 + w:x}::{k + 1:x}"
        tag = f"writer{fam}-{w}-{k}"
        spec = f'-s {source} -m comment --comment "{tag}" {TARGETS[k % len(TARGETS)]}'.strip()
        inserted.append(Op(table, chain, "-I" if k % 3 == 0 else "-A", spec, tag))
        ops.append(inserted[-1])
        if k % 3 == 2:
            gone = inserted[k - 1 - (k // 3) % 2]
            ops.append(Op(gone.table, gone.chain, "-D", gone.spec, gone.tag))
    return ops


def expected_tags(ops: list[Op]) -> Counter[tuple[str, str, str]]:
    out: Counter[tuple[str, str, str]] = Counter()
    for op in ops:
        out[(op.table, op.chain, op.tag)] += -1 if op.action == "-D" else 1
    return +out


def found_tags(lines: list[str]) -> tuple[list[str], Counter[tuple[str, str, str]]]:
    """The lines that are not the writers', and the writers' rules found (table, chain, tag)."""
    rest, found, table = [], Counter[tuple[str, str, str]](), ""
    for line in lines:
        if line.startswith("*"):
            table = line[1:]
        tag = re.search(r'--comment "?(writer\d-\d+-\d+)', line)
        if tag:
            found[(table, line.split(" -A ", 1)[1].split()[0], tag.group(1))] += 1
        else:
            rest.append(line)
    return rest, found


def start_writer(lab: Lab, target: Target, fam: int, w: int, lockfile: str, scratch: Path) -> subprocess.Popen[str]:
    script = scratch / f"writer{fam}-{w}.sh"
    lines = ["set -e"] + [f"{op.argv(fam)}\nsleep 0.01" for op in writer_ops(fam, w)]
    script.write_text("\n".join(lines) + "\n")
    return lab.spawn(target.ns, ["sh", str(script)], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                          "XTABLES_LOCKFILE": lockfile},
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_concurrent_writers_lose_nothing(lab: Lab, target: Target, lockfile: str, tmp_path: Path) -> None:
    before = {fam: load(target, fam, with_counters(dataset(name)), tmp_path) for fam, name in RULESETS.items()}
    apply(target, Services(0), lockfile)
    writers = {(fam, w): start_writer(lab, target, fam, w, lockfile, tmp_path) for fam in (4, 6) for w in (0, 1)}

    deadline = time.monotonic() + DEADLINE
    rounds = busy = 0
    while any(p.poll() is None for p in writers.values()):
        assert time.monotonic() < deadline, f"writers still running after {DEADLINE:g} s"
        services = Services(1 + rounds % 3)
        proc = try_apply(target, services, lockfile)
        if proc.returncode and "xtables lock" in proc.stderr:
            busy += 1  # held by the writers for longer than the driver waits: the boot would retry next tick
            continue
        assert proc.returncode == 0, f"apply during the writers: {proc.stdout}{proc.stderr}"
        rounds += 1
    failed = {k: p.stderr.read() if p.stderr else "" for k, p in writers.items() if p.returncode}
    assert not failed, f"writers failed: {failed}"
    assert rounds >= 2, f"only {rounds} applies ran while the writers wrote ({busy} found the lock busy)"
    print(f"{rounds} applies among the writers, {busy} found the lock busy")

    last = Services(1 + rounds % 3)
    apply(target, last, lockfile)
    check(target, before, last, "the applies among the writers")
    flush(target, lockfile)
    check(target, before, None, "the flush after the writers")


def check(target: Target, before: dict[int, list[str]], services: Services | None, step: str) -> None:
    problems = []
    for fam in (4, 6):
        foreign, ours = split(save(target, fam))
        rest, found = found_tags(foreign)
        changed = compare(before[fam], rest, policies=False)
        if changed:
            problems.append(f"IPv{fam}, the loaded rules after {step}:\n{changed}")
        want = Counter[tuple[str, str, str]]()
        for w in (0, 1):
            want += expected_tags(writer_ops(fam, w))
        if found != want:
            lost, extra = want - found, found - want
            problems.append(f"IPv{fam}, the writers' rules after {step}: {sum(lost.values())} lost "
                            f"{sorted(lost)[:10]}, {sum(extra.values())} unexpected or duplicated {sorted(extra)[:10]}")
        wrong = check_ours(ours, services.plan() if services else None, fam, on_top=False)
        problems += [f"IPv{fam}, our chains after {step}: {p}" for p in wrong]
    assert not problems, "\n\n".join(problems)
