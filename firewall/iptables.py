"""iptables driver: legacy xtables (the kernel's ip_tables/ip6_tables), written as the kernel holds it.

Owned chains, each reached by one jump inserted at the top of its base chain:
  nat    PREROUTING  -> CONTAINERBOOT-PREROUTING   DNATs (ingress, round robin, egress, egress services)
  nat    POSTROUTING -> CONTAINERBOOT-POSTROUTING  SNATs
  mangle FORWARD     -> CONTAINERBOOT-FORWARD      MSS clamp both ways on the tunnel

A plan becomes `Spec`s (iptables_rules.py: one per iptables rule, printed the way iptables-save
prints it), and each Spec the kernel's entry bytes (`encode`, iptables_entries.py). A `Server` per
family (firewall/iptables_kernel.py, in this process) splices them into the table and commits it (one
IPT_SO_SET_REPLACE per table, as iptables-legacy-restore does) and reads the owned chains back, as
bytes that `decode` turns into Specs again; this module is the driver over them. python-iptables
built each rule as a graph of ctypes objects through libxtables: about 170 µs a rule, 60x
iptables-legacy-restore at 10,000 rules; and libxtables cannot hold both families' extensions in one
process, which is why it had to fork per call. (A worker interpreter per family came next; the
container's memory paid 12 MB for each: see iptables_kernel.py.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

# Imported "as" themselves: names callers (bench, tests) import from here, as before the Specs and their
# entries moved to modules of their own.
from firewall import xtables
from firewall.iptables_entries import DNAT_REVISIONS
from firewall.iptables_entries import PortEntries as PortEntries
from firewall.iptables_entries import chain_entries as chain_entries
from firewall.iptables_entries import decode as decode
from firewall.iptables_entries import describe as describe
from firewall.iptables_entries import encode as encode
from firewall.iptables_entries import port_match as port_match
from firewall.iptables_entries import read_back as read_back
from firewall.iptables_kernel import ReadBack, Server, Tables, kernel_errors
from firewall.iptables_rules import CHAINS as CHAINS
from firewall.iptables_rules import FWD
from firewall.iptables_rules import POST as POST
from firewall.iptables_rules import PRE as PRE
from firewall.iptables_rules import Spec as Spec
from firewall.iptables_rules import parse as parse
from firewall.iptables_rules import render as render
from firewall.iptables_rules import specs as specs
from firewall.model import FirewallBusy, FirewallError, Plan

OWNED = {"nat": {PRE: "PREROUTING", POST: "POSTROUTING"}, "mangle": {FWD: "FORWARD"}}
PROBE = "CONTAINERBOOT-PROBE"
LOCK_WAIT = 5.0  # how long a change waits for the xtables lock before giving up (and retrying later)


@contextlib.contextmanager
def xtables_lock(wait: float) -> Iterator[None]:
    """The lock the iptables tools take with --wait (tailscaled's do), so that our read-modify-commit
    of a table and theirs do not interleave; the kernel takes none across the two. Held here, around
    both families' commits. Unlike `iptables --wait`, the wait is bounded: a lock held for ever must
    not hold the boot for ever (FirewallBusy: retry later)."""
    path = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        yield  # no writable /run: nothing else can be holding it either
        return
    try:
        deadline, pause = time.monotonic() + wait, 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FirewallBusy(f"another process has held the xtables lock {path} for more than "
                                       f"{wait:g}s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
        yield
    finally:
        os.close(fd)


def legacy_tables(fam: int) -> set[str]:
    """Legacy tables instantiated in this network namespace (reading this creates none)."""
    return xtables.tables(fam)


T = TypeVar("T")


class IptablesDriver:
    name = "iptables"

    def __init__(self, families: Iterable[int] = (4, 6), lock_wait: float = LOCK_WAIT) -> None:
        self.families = tuple(sorted(set(families)))
        self.lock_wait = lock_wait  # a shutdown lowers it: the rules go if they can go quickly
        self.servers = {fam: Server(fam) for fam in self.families}
        # Per family, what the kernel held when its server last reported: (the version it gave that content,
        # the rules). A read that finds the same version costs no parse.
        self._known: dict[int, tuple[int, Plan]] = {}
        self._together: tuple[tuple[Plan, ...], Plan] | None = None  # the families' plans, and their union
        self._dnat: dict[int, int] = {}

    def _call(self, fams: Iterable[int], request: Callable[[int, Server], T]) -> dict[int, T]:
        """`request(fam, server)` for each family; every family is asked even when one fails (the first error
        is raised)."""
        results: dict[int, T] = {}
        error: BaseException | None = None
        for fam in fams:
            try:
                with kernel_errors():
                    results[fam] = request(fam, self.servers[fam])
            except BaseException as exc:  # what the kernel holds is unknown now: read it whole next time
                self._known.pop(fam, None)
                error = error or exc
        if error is not None:
            raise error
        return results

    def _dnat_revisions(self, fams: Iterable[int]) -> dict[int, int]:
        """The DNAT revision each family's rules are written in, asked of the kernel once."""
        ask = [fam for fam in fams if fam not in self._dnat]
        if ask:
            for fam, rev in self._call(ask, lambda fam, server: server.revision("DNAT", DNAT_REVISIONS[fam])).items():
                self._dnat[fam] = DNAT_REVISIONS[fam][0] if rev is None else rev
        return self._dnat

    def _write(self, plan: Plan | None) -> None:
        tables: dict[int, Tables] = {}
        dnat = self._dnat_revisions(f for f in self.families if plan is not None and plan.only(f).rules)
        for fam in self.families:
            want = chain_entries(plan, fam, dnat[fam]) if plan is not None and plan.only(fam).rules else None
            tables[fam] = {table: {chain: (base, want[chain] if want else None) for chain, base in owned.items()}
                           for table, owned in OWNED.items()}

        def write(fam: int, server: Server) -> int:
            return server.write(tables[fam])

        if plan is None and not any(xtables.tables(fam) for fam in self.families):
            replies = self._call(self.families, write)  # nothing to remove, and nothing is created: no lock needed
        else:
            with xtables_lock(self.lock_wait):
                replies = self._call(self.families, write)
        for fam, version in replies.items():
            self._known[fam] = (version, plan.only(fam) if plan is not None else Plan())
        self._together = (tuple(self._known[fam][1] for fam in self.families), plan or Plan())

    def apply(self, plan: Plan, full: bool = True) -> None:
        """Rewrites the owned chains whole each time (`full` is accepted for the common interface)."""
        # By the plan's cached family split: plan.families() asks each rule its family (13 ms at 10,000).
        extra = [fam for fam in (4, 6) if fam not in self.families and plan.only(fam).rules]
        if extra:
            raise FirewallError(f"iptables: no usable IPv{min(extra)} NAT (ip6_tables) in this kernel")
        self._write(plan)

    def flush(self) -> None:
        self._write(None)

    def installed(self) -> Plan:
        """What the owned chains hold. Each server compares its tables with what it last reported (a read
        and a comparison: no parse) and only says "same" when nothing changed."""
        def read(fam: int, server: Server) -> ReadBack:
            return server.read(OWNED, self._known.get(fam, (-1, Plan()))[0])

        plans = []
        for fam, reply in self._call(self.families, read).items():
            if not reply.same:
                found = Plan.read_back(read_back(fam, reply.chains))
                before = self._known.get(fam)
                if before is not None and before[1] == found:
                    found = before[1]  # the same object again: the caller's `found == applied` is then instant
                self._known[fam] = (reply.version, found)
            plans.append(self._known[fam][1])
        if self._together is None or any(a is not b for a, b in zip(self._together[0], plans, strict=True)):
            full = [p for p in plans if p.rules]
            union = full[0] if len(full) == 1 else Plan.read_back(r for p in full for r in p.rules)
            self._together = (tuple(plans), union)
        return self._together[1]

    def probe(self, fam: int) -> None:
        """Create and delete an owned chain in `nat`: fails without ip_tables NAT or without the rights."""
        with xtables_lock(self.lock_wait):
            self._call([fam], lambda _, server: server.probe(PROBE))

    def census(self) -> list[tuple[int, str, str, int]]:
        """(family, table, chain, rules) for every chain not ours in the legacy tables that exist."""
        skip = [*CHAINS, PROBE]
        found = self._call([f for f in self.families if xtables.tables(f)], lambda _, server: server.census(skip))
        return [(fam, *row) for fam, rows in found.items() for row in rows]

    def close(self) -> None:
        for server in self.servers.values():
            server.kernel.close()
