"""tailscaled's own netfilter chains, read (never written): how many rules each holds.

In kernel mode tailscaled installs chains of its own beside ours, in the backend we hand it: `ts-input`
and `ts-forward` in the filter table (the tailnet range dropped where it does not come from the tunnel,
the mark on forwarded tunnel traffic) and `ts-postrouting` in the nat table (the masquerade of marked
packets, which an ingress proxy's replies need to find their way back). It installs them once, when its
router starts, and never looks again: a whole-ruleset flush or a firewall reload removes them for good.
The boot watches them with this reader (containerboot/boot/tailscaled_rules.py) and decides what to do.

Both readers are cheap beside the 2-second drift check (bench/bench_tschains.py: 0.1 ms for nftables, a
filtered rule dump over netlink per chain, no libnftables, no listing of anybody's table; 0.16 ms for legacy,
whose filter and nat tables are read with the socket option iptables-legacy-save uses and parsed whole, 1.2
ms beside 1,000 foreign rules).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

Chain = tuple[int, str, str]  # address family, table, chain
WATCHED = (("filter", "ts-input"), ("filter", "ts-forward"), ("nat", "ts-postrouting"))


def describe(chains: Iterable[Chain]) -> str:
    """'ip filter ts-forward, ip nat ts-postrouting' (nft's names for the families)."""
    return ", ".join(f"{'ip' if fam == 4 else 'ip6'} {table} {chain}" for fam, table, chain in sorted(chains))


class ChainReader(Protocol):
    def read(self) -> dict[Chain, int] | None:
        """Every watched chain with the rules it holds (0: empty or missing); None: could not read."""


class NftChains:
    def __init__(self, families: Iterable[int]) -> None:
        from firewall.nftables_kernel import Nfnetlink

        self.families = tuple(families)
        self._nl = Nfnetlink()

    def read(self) -> dict[Chain, int] | None:
        found: dict[Chain, int] = {}
        for fam in self.families:
            for table, chain in WATCHED:
                count = self._nl.rule_count(fam, table, chain)
                if count is None:
                    return None
                found[(fam, table, chain)] = count
        return found


class LegacyChains:
    def __init__(self, families: Iterable[int]) -> None:
        from firewall.iptables_kernel import Kernel

        self.kernels = {fam: Kernel(fam) for fam in families}

    def read(self) -> dict[Chain, int] | None:
        from firewall import xtables

        found: dict[Chain, int] = {}
        try:
            for fam, kernel in self.kernels.items():
                present = xtables.tables(fam)  # a table nobody made is not made by reading it
                for table in sorted({t for t, _ in WATCHED}):
                    parsed = kernel.read(table) if table in present else None
                    chains = parsed.by_name if parsed is not None else {}
                    for chain in (c for t, c in WATCHED if t == table):
                        found[(fam, table, chain)] = len(parsed.entries(chains[chain])) \
                            if parsed is not None and chain in chains else 0
        except (xtables.TableError, OSError, ValueError, KeyError, IndexError):
            return None
        return found


def reader(backend: str, families: Iterable[int]) -> ChainReader:
    """The reader for the backend tailscaled was handed (TS_DEBUG_FIREWALL_MODE)."""
    return NftChains(families) if backend == "nftables" else LegacyChains(families)
