"""The model's rules as the iptables rules that render them, and back: a `Spec` is one rule in an owned
chain, in the shapes this program writes, printed the way iptables-save prints it; pure.

Apart from the bytes the kernel holds (iptables_entries.py) because this is the level at which a
rule's shape is decided and compared (round robin as "every n", the two halves of the MSS clamp),
and at which a rule that is not ours is shown to the user.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from firewall.model import Dnat, DnatNonTailnet, Foreign, MssClamp, Plan, PortMap, Rule, Snat, addr_text

PRE, POST, FWD = "CONTAINERBOOT-PREROUTING", "CONTAINERBOOT-POSTROUTING", "CONTAINERBOOT-FORWARD"
# owned chain -> (table, base chain)
CHAINS = {PRE: ("nat", "PREROUTING"), POST: ("nat", "POSTROUTING"), FWD: ("mangle", "FORWARD")}


@dataclass(frozen=True)
class Spec:
    """One iptables rule in an owned chain (only the shapes this program writes)."""

    chain: str
    target: str  # DNAT, SNAT or TCPMSS
    to: str = ""  # the DNAT or SNAT address
    dst: str = ""  # -d, one address
    iif: str = ""  # -i; "!" first inverts
    oif: str = ""  # -o
    syn: bool = False  # -p tcp -m tcp --tcp-flags SYN,RST SYN
    every: int = 0  # -m statistic --mode nth --every N --packet 0
    proto: str = ""  # with dport: -p tcp|udp -m tcp|udp --dport N
    dport: int = 0
    to_port: int = 0  # the DNAT's port (--to-destination address:port)

    def __str__(self) -> str:
        """As iptables-save prints it."""
        out = [f"-A {self.chain}"]
        if self.dst:
            out.append(f"-d {self.dst}/{128 if ':' in self.dst else 32}")
        if self.iif:
            out.append(f"! -i {self.iif[1:]}" if self.iif.startswith("!") else f"-i {self.iif}")
        if self.oif:
            out.append(f"-o {self.oif}")
        if self.syn:
            out.append("-p tcp -m tcp --tcp-flags SYN,RST SYN")
        if self.dport:
            out.append(f"-p {self.proto} -m {self.proto} --dport {self.dport}")
        if self.every:
            out.append(f"-m statistic --mode nth --every {self.every} --packet 0")
        out.append(f"-j {self.target}")
        to = self.to
        if self.to_port:
            to = f"[{to}]:{self.to_port}" if ":" in to else f"{to}:{self.to_port}"
        out.append({"DNAT": f"--to-destination {to}", "SNAT": f"--to-source {to}",
                    "TCPMSS": "--clamp-mss-to-pmtu"}.get(self.target, ""))
        return " ".join(out).strip()


def specs(rule: Rule) -> list[Spec]:
    """The iptables rules that render `rule`, in chain order (pure)."""
    match rule:
        case Dnat():
            m, to = addr_text(rule.match), rule.to
            # Round robin as upstream's load balancer: "every n" for the last target down to 2, then the first.
            lb = [Spec(PRE, "DNAT", addr_text(to[n - 1]), dst=m, every=n) for n in range(len(to), 1, -1)]
            return [*lb, Spec(PRE, "DNAT", addr_text(to[0]), dst=m)]
        case DnatNonTailnet():
            return [Spec(PRE, "DNAT", addr_text(rule.to), iif="!" + rule.iface)]
        case PortMap():
            return [Spec(PRE, "DNAT", addr_text(rule.to), iif="!" + rule.iface, proto=rule.proto, dport=rule.port,
                         to_port=rule.to_port)]
        case Snat():
            return [Spec(POST, "SNAT", addr_text(rule.to), dst=addr_text(rule.dst))]
        case MssClamp():
            return [Spec(FWD, "TCPMSS", oif=rule.iface, syn=True), Spec(FWD, "TCPMSS", iif=rule.iface, syn=True)]
    return []


def render(plan: Plan, fam: int) -> list[Spec]:
    return [s for rule in plan.sorted(fam) for s in specs(rule)]


def _addr(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text) if text else None
    except ValueError:
        return None


def _guess(fam: int, chain: list[Spec], i: int) -> tuple[Rule, int] | None:
    """The model rule that starts at chain[i], and how many specs it spans."""
    s = chain[i]
    if s.chain == PRE and s.target == "DNAT":
        to = _addr(s.to)
        if s.dport and s.iif.startswith("!") and to:
            return PortMap(s.proto, s.dport, to, s.to_port, s.iif[1:]), 1
        if s.iif.startswith("!") and to:
            return DnatNonTailnet(to, s.iif[1:]), 1
        match = _addr(s.dst)
        if not (to and match):
            return None
        n = s.every or 1
        group = chain[i:i + n]
        targets = [_addr(g.to) for g in group]
        if len(group) != n or not all(targets):
            return None
        ordered = [targets[-1], *reversed(targets[:-1])]
        return Dnat(match, tuple(t for t in ordered if t)), n
    if s.chain == POST and s.target == "SNAT":
        dst, src = _addr(s.dst), _addr(s.to)
        return (Snat(dst, src), 1) if dst and src else None
    if s.chain == FWD and s.target == "TCPMSS" and s.oif:
        return MssClamp(fam, s.oif), 2
    return None


def parse(fam: int, chain_specs: Iterable[Spec | Foreign]) -> set[Rule]:
    """Model rules from the specs found in the owned chains; anything else becomes `Foreign`."""
    found: set[Rule] = set()
    by_chain: dict[str, list[Spec]] = {}
    for s in chain_specs:
        if isinstance(s, Foreign):
            found.add(s)
        else:
            by_chain.setdefault(s.chain, []).append(s)
    for chain in by_chain.values():
        i = 0
        while i < len(chain):
            guess = _guess(fam, chain, i)
            if guess is not None:
                rule, n = guess
                if rule.family == fam and specs(rule) == chain[i:i + n]:
                    found.add(rule)
                    i += n
                    continue
            found.add(Foreign(fam, str(chain[i])))
            i += 1
    return found

