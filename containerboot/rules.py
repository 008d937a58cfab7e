"""The one reconciler: every source of rules -> one firewall Plan (pure).

Three inputs: the single-target proxy settings (`proxy.plan`: TS_DEST_IP, TS_TAILNET_TARGET_*, ...), the
egress services of a ProxyGroup (port mappings to tailnet targets, each target SNATed to our tailnet
address of its family) and its ingress services (Tailscale Service VIP -> cluster IP). The driver applies
the result in one transaction, so a service that leaves the config, a target that moves or a new own
address replaces the old rules instead of piling up beside them.

Where two sources claim the same packets (two services on one port, two services on one VIP) the first
by service name wins and the other is noted; the Plan itself would refuse to hold both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from containerboot import proxy
from containerboot.proxygroup import egress, ingress
from containerboot.settings import Settings
from firewall.model import Dnat, IPAddress, MssClamp, Plan, PortMap, Rule, Snat

ProxyError = proxy.ProxyError


@dataclass(frozen=True)
class Inputs:
    """Everything the plan depends on besides Settings and the usable families."""

    proxy: proxy.Inputs = proxy.Inputs()
    egress: Sequence[egress.Resolved] = ()
    ingress: ingress.Configs = ()


def _local(addrs: Sequence[IPAddress], fam: int) -> IPAddress | None:
    return next((a for a in addrs if a.version == fam), None)


def egress_rules(resolved: Iterable[egress.Resolved], self_addrs: Sequence[IPAddress],
                 usable: set[int]) -> tuple[list[Rule], list[str]]:
    rules: list[Rule] = []
    notes: list[str] = []
    owner: dict[tuple[int, str, int], str] = {}
    clamp: set[int] = set()
    for r in resolved:
        name = r.service.name
        done: set[int] = set()
        for target in r.targets:
            fam = target.version
            if fam not in usable:
                continue
            local = _local(self_addrs, fam)
            if local is None:
                notes.append(f"egress service {name}: no tailnet address of this node is IPv{fam}, so {target} "
                             "cannot be reached; not installing its rules")
                continue
            if fam in done:
                notes.append(f"egress service {name}: tailnet target has several IPv{fam} addresses; forwarding "
                             f"to the first, not to {target}")
                continue
            done.add(fam)
            for pm in r.service.ports:
                proto = pm.protocol.lower()  # the config may say "TCP", as the operator writes it
                key = (fam, proto, pm.match_port)
                if key in owner:
                    notes.append(f"egress services {owner[key]} and {name} both map {proto} port "
                                 f"{pm.match_port} (IPv{fam}); {name}'s mapping is not installed")
                    continue
                owner[key] = name
                rules.append(PortMap(proto, pm.match_port, target, pm.target_port))
            rules.append(Snat(target, local))
            clamp.add(fam)
    rules += [MssClamp(fam) for fam in sorted(clamp)]
    return rules, notes


def ingress_rules(services: Iterable[ingress.Service], usable: set[int],
                  taken: Iterable[IPAddress] = ()) -> tuple[list[Rule], list[str]]:
    rules: list[Rule] = []
    notes: list[str] = []
    owner: dict[IPAddress, str] = {ip: "the proxy settings" for ip in taken}
    clamp: set[int] = set()
    for svc in services:
        for m in svc.mappings:
            fam = m.vip.version
            if fam not in usable:
                notes.append(f"ingress service {svc.name}: IPv{fam} NAT is unavailable here; not installing "
                             f"{m.vip} -> {m.cluster_ip}")
                continue
            if m.vip in owner:
                notes.append(f"ingress services {owner[m.vip]} and {svc.name} both use {m.vip}; "
                             f"{svc.name}'s mapping is not installed")
                continue
            owner[m.vip] = svc.name
            rules.append(Dnat(m.vip, (m.cluster_ip,)))
            clamp.add(fam)
    rules += [MssClamp(fam) for fam in sorted(clamp)]
    return rules, notes


def plan(settings: Settings, inputs: Inputs, families: Iterable[int] = (4, 6)) -> tuple[Plan, list[str]]:
    """The whole desired rule set, and notes worth logging; ProxyError where the proxy settings ask for
    rules this node cannot have (upstream exits 1 for those)."""
    usable = set(families)
    base, notes = proxy.plan(settings, inputs.proxy, usable)
    rules: set[Rule] = set(base.rules)
    out, more = egress_rules(inputs.egress, inputs.proxy.self_addrs, usable)
    rules.update(out)
    notes += more
    taken = [r.match for r in base.rules if isinstance(r, Dnat)]
    out, more = ingress_rules(inputs.ingress, usable, taken)
    rules.update(out)
    notes += more
    return Plan(frozenset(rules)), notes
