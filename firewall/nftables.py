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
`nft -j -f -`: the same documents either way (nftables_kernel.py). The renderer (nftables_render.py)
emits rules in the exact shape nft lists them, so reading back (nftables_read.py) is "guess the rule,
render it, compare". This module is the driver that puts them together.
"""

from __future__ import annotations

from collections.abc import Iterable

# Imported "as" themselves: names callers (containerboot.commands, bench, tests) import from here, as before
# the call layer, the rendering and the reading back moved to modules of their own.
from firewall.model import FirewallError, Plan, Rule
from firewall.nftables_kernel import Json, Libnft
from firewall.nftables_kernel import Nfnetlink as Nfnetlink
from firewall.nftables_kernel import dumps as dumps
from firewall.nftables_kernel import open_libnft as open_libnft
from firewall.nftables_read import Listing
from firewall.nftables_read import parse_table as parse_table
from firewall.nftables_render import CHAINS, FAMILY, TABLE, drop_table, map_counts, plan_groups, unmapped
from firewall.nftables_render import full_table as full_table
from firewall.nftables_render import lookup_expr as lookup_expr
from firewall.nftables_render import map_size as map_size
from firewall.nftables_render import map_sizes as map_sizes
from firewall.nftables_render import portmap_expr as portmap_expr
from firewall.nftables_render import portmap_group as portmap_group
from firewall.nftables_render import portmap_maps as portmap_maps
from firewall.nftables_render import update_table as update_table


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
        return read is not None and read.lookup and read.rules == unmapped(have.rules) \
            and read.port_lookups == set(plan_groups(have))

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
