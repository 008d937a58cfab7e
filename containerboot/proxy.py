"""Settings + the node's current addresses -> the firewall Plan (pure).

The plan is the whole desired state, recomputed on every netmap, so a changed tailnet address
replaces the old rules instead of adding to them (upstream accumulates them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from containerboot.log import go_list, go_prefixes
from containerboot.settings import Settings
from firewall.model import Dnat, DnatNonTailnet, IPAddress, MssClamp, Plan, Rule, Snat


class ProxyError(RuntimeError):
    """The settings ask for rules this node cannot have (upstream exits 1 for these)."""


@dataclass(frozen=True)
class Inputs:
    """What the plan depends on besides Settings: all of it comes from the netmap or DNS."""

    self_addrs: tuple[IPAddress, ...] = ()
    egress_targets: tuple[IPAddress, ...] = ()  # TS_TAILNET_TARGET_IP, or TS_TAILNET_TARGET_FQDN resolved
    dest_backends: tuple[IPAddress, ...] = ()  # TS_EXPERIMENTAL_DEST_DNS_NAME resolved


def _local(addrs: Sequence[IPAddress], fam: int) -> IPAddress | None:
    return next((a for a in addrs if a.version == fam), None)


def cross_family(dst: IPAddress, local: IPAddress | None = None, other: IPAddress | None = None) -> str:
    """The one line for TS_DEST_IP `dst`, whose family leaves the proxy's tailnet address of the other
    family (`other`) forwarding nothing: netfilter's NAT cannot translate between IPv4 and IPv6. Upstream says
    it only for an IPv6 Service address (tailscale/tailscale#12156), and only as "you might need to"."""
    fam, alt = (4, 6) if dst.version == 4 else (6, 4)
    where = str(local) if local else f"the proxy's IPv{fam} tailnet address"
    line = (f"TS_DEST_IP {dst} is IPv{fam}: this proxy's IPv{alt} tailnet address{f' {other}' if other else ''} "
            f"forwards nothing (netfilter cannot translate IPv{alt} to IPv{fam}); clients reach the Service at {where}")
    if fam == 6:
        line += (", and IPv4 clients need a Service whose first family is IPv4 (ipFamilies: [IPv4, IPv6]; "
                 "the operator forwards to the first ClusterIP). See https://github.com/tailscale/tailscale/issues/12156")
    return line


def egress_targets(settings: Settings, resolved: Iterable[IPAddress] = ()) -> tuple[IPAddress, ...]:
    if settings.tailnet_target_ip:
        return (settings.tailnet_target_ip,)
    return tuple(resolved) if settings.tailnet_target_fqdn else ()


def plan(settings: Settings, inputs: Inputs, families: Iterable[int] = (4, 6)) -> tuple[Plan, list[str]]:
    """The rules for these settings and inputs, and notes worth logging (skipped families, warnings)."""
    addrs = inputs.self_addrs
    usable = set(families)
    rules: list[Rule] = []
    notes: list[str] = []
    if not addrs:
        return Plan(), notes

    if settings.dest_ip:
        dst = settings.dest_ip
        local = _local(addrs, dst.version)
        if local is None:
            raise ProxyError(f"installing ingress proxy rules: no tailscale IP matching family of {dst} "
                             f"found in {go_prefixes(addrs)}")
        other = _local(addrs, 10 - dst.version)
        if other is not None:
            notes.append(cross_family(dst, local, other))
        rules += [Dnat(local, (dst,)), MssClamp(dst.version)]

    for fam in (4, 6):
        backends = tuple(b for b in inputs.dest_backends if b.version == fam)
        local = _local(addrs, fam)
        if backends and local:
            rules += [Dnat(local, backends), MssClamp(fam)]
        elif backends:
            notes.append(f"backend targets {go_list(inputs.dest_backends)} contain at least one IPv{fam} address, "
                         f"but this node's Tailscale IPs do not contain a valid IPv{fam} address: "
                         f"{go_prefixes(addrs)}")

    installed_egress = False
    for fam in (4, 6):
        targets = [t for t in inputs.egress_targets if t.version == fam]
        local = _local(addrs, fam)
        if not targets or not local or fam not in usable:  # upstream: IPv6 only where the host has IPv6 NAT
            continue
        if len(targets) > 1:
            notes.append(f"egress target has {len(targets)} IPv{fam} addresses; forwarding to {targets[0]}")
        rules += [DnatNonTailnet(targets[0]), Snat(targets[0], local), MssClamp(fam)]
        installed_egress = True
    if inputs.egress_targets and not installed_egress:
        raise ProxyError(f"no forwarding rules for egress addresses {go_prefixes(inputs.egress_targets)}, "
                         f"host supports IPv6: {'true' if 6 in usable else 'false'}")

    if settings.allow_cluster_traffic_via_ingress and settings.pod_ip:
        local = _local(addrs, settings.pod_ip.version)
        if local:
            rules.append(Dnat(settings.pod_ip, (local,)))

    kept = [r for r in rules if r.family in usable]
    skipped = {str(r) for r in rules if r.family not in usable}
    if skipped:
        notes.append(f"IPv6 NAT is unavailable here; not installing: {', '.join(sorted(skipped))}")
    return Plan.of(*set(kept)), notes
