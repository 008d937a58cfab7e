"""The rules the program owns, as plain frozen data.

A `Plan` is the whole desired state: every driver renders it into its own backend and reads its
rules back into the same types, so `driver.installed() == plan` answers "is the kernel as we want it".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TUN = "tailscale0"


def family(addr: IPAddress) -> int:
    return addr.version


def addr_key(addr: IPAddress) -> tuple[int, int]:
    """Sort key that orders IPv4 before IPv6 (mixed ipaddress objects do not compare)."""
    return (addr.version, int(addr))


def _norm(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


class _Keyed:
    """Equality and hashing through a key of the fields as text ("Dnat|100.64.0.1|10.0.0.5"), made once.

    Plans of thousands of rules are compared and rendered on every apply: ipaddress objects hash,
    compare and print in Python code, while a str caches its hash and compares in C."""

    _key: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "_key", "|".join([type(self).__name__, *map(_norm, self.__dict__.values())]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Keyed) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)


@dataclass(frozen=True, eq=False)
class Dnat(_Keyed):
    """Connections addressed to `match` go to `to`; several targets are used in turn (round robin)."""

    match: IPAddress
    to: tuple[IPAddress, ...]

    @property
    def family(self) -> int:
        return self.match.version

    def __str__(self) -> str:
        return f"dnat {self.match} -> {', '.join(map(str, self.to))}"

    def texts(self) -> tuple[str, str]:
        """(match, targets) as text, read from the key: rendering 10,000 rules prints no address."""
        _, match, to = self._key.split("|")
        return match, to


@dataclass(frozen=True, eq=False)
class DnatNonTailnet(_Keyed):
    """Egress: every connection that does not arrive on `iface` goes to `to`."""

    to: IPAddress
    iface: str = TUN

    @property
    def family(self) -> int:
        return self.to.version

    def __str__(self) -> str:
        return f"dnat not-from {self.iface} -> {self.to}"


@dataclass(frozen=True, eq=False)
class Snat(_Keyed):
    """Connections to `dst` leave with source address `to` (the node's tailnet address)."""

    dst: IPAddress
    to: IPAddress

    @property
    def family(self) -> int:
        return self.dst.version

    def __str__(self) -> str:
        return f"snat {self.dst} from {self.to}"


@dataclass(frozen=True, eq=False)
class MssClamp(_Keyed):
    """Clamp the MSS of forwarded TCP SYNs to the path MTU, in both directions through `iface`."""

    fam: int
    iface: str = TUN

    @property
    def family(self) -> int:
        return self.fam

    def __str__(self) -> str:
        return f"clamp-mss ipv{self.fam} via {self.iface}"


@dataclass(frozen=True, eq=False)
class Foreign(_Keyed):
    """Something found in an owned chain or table that no rule of ours renders to (drift)."""

    fam: int
    text: str

    @property
    def family(self) -> int:
        return self.fam

    def __str__(self) -> str:
        return f"unexpected ipv{self.fam}: {self.text}"


Rule = Dnat | DnatNonTailnet | Snat | MssClamp | Foreign


def rule_order(rule: Rule) -> tuple[object, ...]:
    order = {Dnat: 0, DnatNonTailnet: 1, Snat: 2, MssClamp: 3, Foreign: 4}[type(rule)]
    match rule:
        case Dnat():
            detail: tuple[object, ...] = (addr_key(rule.match),)
        case DnatNonTailnet():
            detail = (addr_key(rule.to),)
        case Snat():
            detail = (addr_key(rule.dst),)
        case MssClamp():
            detail = (rule.iface,)
        case Foreign():
            detail = (rule.text,)
    return (rule.family, order, *detail)


class PlanError(ValueError):
    """A plan that no backend could render with one meaning (two rules for the same packets)."""


@dataclass(frozen=True)
class Plan:
    """A valid set of rules: built from rules that could not be rendered with one meaning, it raises."""

    rules: frozenset[Rule] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_families", self.check())

    @classmethod
    def of(cls, *rules: Rule) -> Plan:
        return cls(frozenset(rules))

    def check(self) -> dict[int, list[Rule]]:
        """Raise PlanError for rules that overlap; return the rules grouped by family."""
        seen: dict[tuple[object, ...], Rule] = {}
        by_family: dict[int, list[Rule]] = {4: [], 6: []}
        object.__setattr__(self, "_index", {r._key: r for r in self.rules})
        for rule in self.rules:
            by_family[rule.family].append(rule)
            match rule:
                case Dnat():
                    if not rule.to or any(t.version != rule.family for t in rule.to):
                        raise PlanError(f"{rule}: targets must be of the family of {rule.match}")
                    key: tuple[object, ...] = ("dnat", addr_key(rule.match))
                case DnatNonTailnet():
                    key = ("egress", rule.family)
                case Snat():
                    if rule.to.version != rule.family:
                        raise PlanError(f"{rule}: source must be of the family of {rule.dst}")
                    key = ("snat", addr_key(rule.dst))
                case _:
                    continue
            if key in seen:
                raise PlanError(f"{seen[key]} and {rule} match the same packets")
            seen[key] = rule
        return by_family

    def sorted(self, fam: int | None = None) -> list[Rule]:
        return sorted(self.rules if fam is None else self.only(fam).rules, key=rule_order)

    def families(self) -> set[int]:
        return {r.family for r in self.rules}

    def only(self, fam: int) -> Plan:
        """The rules of one address family (grouped once, when the plan was built)."""
        group = self.__dict__["_families"][fam]
        if isinstance(group, Plan):
            return group
        subset = self if len(group) == len(self.rules) else Plan._trusted(fam, frozenset(group))
        self.__dict__["_families"][fam] = subset
        return subset

    def difference(self, other: Plan) -> list[Rule]:
        """Rules of this plan that `other` lacks; compares plain keys in C, not rule objects."""
        mine: dict[str, Rule] = self.__dict__["_index"]
        return [mine[k] for k in mine.keys() - other.__dict__["_index"].keys()]

    @classmethod
    def _trusted(cls, fam: int, rules: frozenset[Rule]) -> Plan:
        """A one-family subset of a valid plan is valid: skip the check."""
        plan = cls.__new__(cls)
        object.__setattr__(plan, "rules", rules)
        object.__setattr__(plan, "_index", {r._key: r for r in rules})
        object.__setattr__(plan, "_families", {f: list(rules) if f == fam else [] for f in (4, 6)})
        return plan

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.sorted()) or "(no rules)"

    def to_json(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for rule in self.sorted():
            match rule:
                case Dnat():
                    out.append({"kind": "dnat", "family": rule.family, "match": str(rule.match),
                                "to": [str(t) for t in rule.to]})
                case DnatNonTailnet():
                    out.append({"kind": "dnat-non-tailnet", "family": rule.family, "iface": rule.iface,
                                "to": str(rule.to)})
                case Snat():
                    out.append({"kind": "snat", "family": rule.family, "dst": str(rule.dst),
                                "to": str(rule.to)})
                case MssClamp():
                    out.append({"kind": "mss-clamp", "family": rule.family, "iface": rule.iface})
                case Foreign():
                    out.append({"kind": "foreign", "family": rule.family, "text": rule.text})
        return out


class Driver(Protocol):
    """What every backend offers. `apply` is the one verb that matters."""

    name: str
    lock_wait: float  # how long a change waits for another program's lock (iptables); 0 where none exists

    def apply(self, plan: Plan, full: bool = False) -> None:
        """Make the owned rules equal to `plan`, atomically per table, removing what is stale.

        `full` rewrites everything instead of trusting what the driver remembers installing."""

    def flush(self) -> None:
        """Remove everything the program owns, and nothing else."""

    def installed(self) -> Plan:
        """Read back the effective owned rules (unknown content appears as `Foreign`)."""


class FirewallError(RuntimeError):
    """The kernel refused a change; the message says what and why."""


class FirewallBusy(FirewallError):
    """Another program holds the netfilter lock longer than we wait for it: try again later."""
