"""IPN bus notifications -> the node as containerboot needs to know it (pure).

Watching with NotifyInitialStatus | NotifyNoNetMap (| NotifyPeerChanges), the first notification
carries the whole status and later ones carry changes: SelfChange (a tailcfg.Node), PeersChanged
(upserted by NodeID), PeersRemoved (NodeIDs). `update` folds one notification into a `Node`. The DNS
config (cert domains, extra records) changes without a notification of its own: after a SelfChange it
is asked for (/localapi/v0/dns-config) and folded in by `with_dns_config`, as upstream does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from firewall.model import IPAddress

STATES = ["NoState", "InUseOtherUser", "NeedsLogin", "NeedsMachineAuth", "Stopped", "Starting", "Running"]
NOTIFY_INITIAL_PREFS, NOTIFY_INITIAL_HEALTH = 1 << 2, 1 << 7
NOTIFY_PEER_CHANGES, NOTIFY_NO_NETMAP, NOTIFY_INITIAL_STATUS = 1 << 12, 1 << 13, 1 << 14


def watch_mask(peers: bool, first: bool = False) -> int:
    """Upstream's mask: the status first, then changes, never whole netmaps. Peer changes only when the
    rules follow peers (a tailnet target by name, egress services): otherwise tailscaled would send every
    peer's every change for nothing. The first watch, before login, also asks for prefs and health."""
    mask = NOTIFY_INITIAL_STATUS | NOTIFY_NO_NETMAP | (NOTIFY_PEER_CHANGES if peers else 0)
    return mask | (NOTIFY_INITIAL_PREFS | NOTIFY_INITIAL_HEALTH if first else 0)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Peer:
    """A tailnet peer as the rules need it: its name, addresses and AllowedIPs."""

    name: str  # MagicDNS name with the trailing dot
    addrs: tuple[IPAddress, ...]
    # Its addresses, subnet routes, and the VIPs of the Tailscale Services it hosts (egress targets).
    allowed: tuple[Network, ...] = ()


@dataclass(frozen=True)
class Node:
    """This node as the IPN bus has described it so far (folded by `update`)."""

    self_known: bool = False
    stable_id: str = ""
    name: str = ""
    addrs: tuple[IPAddress, ...] = ()
    peers: Mapping[int, Peer] = field(default_factory=dict)
    cert_domains: tuple[str, ...] = ()
    # DNS extra records, (name, address): a Tailscale Service is one, its VIP an AllowedIP of a peer.
    extra_records: tuple[tuple[str, str], ...] = ()

    @property
    def cert_domain(self) -> str:
        return self.cert_domains[0] if self.cert_domains else "no-https"


LOGIN_STATE_WARNING = "login-state"  # health.LoginStateWarnable's code


@dataclass(frozen=True)
class Notification:
    """One IPN bus notification as the boot reads it. `update` folds its netmap parts (`body`, the
    decoded JSON object) into a Node; the loop reads the typed fields."""

    body: Mapping[str, object]
    state: str | None  # the backend state it reports, if any
    netmap: bool  # it carries status, self or peer changes
    self_change: bool
    err_message: str | None
    login_warning: bool  # the health warning that says the auth key was refused


def notification(notify: Mapping[str, Any]) -> Notification:
    health = notify.get("Health")
    warnings = health.get("Warnings") if isinstance(health, dict) else None
    err = notify.get("ErrMessage")
    return Notification(notify, state_of(notify), is_netmap(notify), bool(notify.get("SelfChange")),
                        err if isinstance(err, str) else None,
                        isinstance(warnings, dict) and LOGIN_STATE_WARNING in warnings)


def state_of(notify: Mapping[str, Any]) -> str | None:
    """The backend state a notification reports, if any."""
    state = notify.get("State")
    if isinstance(state, int) and 0 <= state < len(STATES):
        return STATES[state]
    backend = (notify.get("InitialStatus") or {}).get("BackendState")
    return backend if isinstance(backend, str) and backend else None


def is_netmap(notify: Mapping[str, Any]) -> bool:
    return any(notify.get(k) for k in ("InitialStatus", "SelfChange", "PeersChanged", "PeersRemoved",
                                       "PeerChangedPatch"))


def _nets(values: Iterable[Any] | None) -> tuple[Network, ...]:
    """Prefixes from "100.64.0.0/10" or bare-address forms; what does not parse is left out."""
    out = []
    for value in values or ():
        try:
            out.append(ipaddress.ip_network(str(value), strict=False))
        except ValueError:
            continue
    return tuple(out)


def _addrs(values: Iterable[Any] | None) -> tuple[IPAddress, ...]:
    """Single addresses from "100.64.0.1" or "100.64.0.1/32" forms; wider prefixes are routes, not ours."""
    return tuple(net.network_address for net in _nets(values) if net.num_addresses == 1)


def _records(values: Any) -> tuple[tuple[str, str], ...]:
    """Address records of a DNS config's or a status's ExtraRecords (tailcfg.DNSRecord; "" means A/AAAA)."""
    if not isinstance(values, list):
        return ()
    return tuple((str(r.get("Name", "")), str(r.get("Value", ""))) for r in values
                 if isinstance(r, dict) and r.get("Type", "") in ("", "A", "AAAA"))


def _peer(node: Mapping[str, Any]) -> tuple[int, Peer] | None:
    """A peer from a tailcfg.Node (ID, Name, Addresses) or an ipnstate.PeerStatus (NodeID, DNSName,
    TailscaleIPs); both carry AllowedIPs."""
    node_id = node.get("ID") if isinstance(node.get("ID"), int) else node.get("NodeID")
    if not isinstance(node_id, int):
        return None
    name = node.get("Name") or node.get("DNSName") or ""
    addrs = _addrs(node.get("Addresses") if "Addresses" in node else node.get("TailscaleIPs"))
    return node_id, Peer(str(name), addrs, _nets(node.get("AllowedIPs")))


def update(node: Node, notify: Mapping[str, Any]) -> Node:
    status = notify.get("InitialStatus")
    if isinstance(status, Mapping):
        me = status.get("Self") or {}
        if me:
            node = replace(node, self_known=True, stable_id=str(me.get("ID", "")), name=str(me.get("DNSName", "")),
                           addrs=_addrs(me.get("TailscaleIPs") or status.get("TailscaleIPs")))
        # A watch's first status is the whole truth: peers it does not list are gone.
        peers = dict(p for p in map(_peer, (status.get("Peer") or {}).values()) if p)
        node = replace(node, peers=peers, cert_domains=tuple(status.get("CertDomains") or ()),
                       extra_records=_records(status.get("ExtraRecords")))
    me = notify.get("SelfChange")
    if isinstance(me, Mapping):
        node = replace(node, self_known=True, stable_id=str(me.get("StableID", node.stable_id)),
                       name=str(me.get("Name", node.name)), addrs=_addrs(me.get("Addresses")))
    changed = [p for p in map(_peer, notify.get("PeersChanged") or ()) if p]
    removed = {i for i in notify.get("PeersRemoved") or () if isinstance(i, int)}
    if changed or removed:
        peers = {k: v for k, v in node.peers.items() if k not in removed}
        peers.update(changed)
        node = replace(node, peers=peers)
    return node


def with_dns_config(node: Node, cfg: object) -> Node:
    """The cert domains and extra records of /localapi/v0/dns-config (a tailcfg.DNSConfig)."""
    if not isinstance(cfg, Mapping):
        return node
    domains = cfg.get("CertDomains")
    return replace(node, cert_domains=tuple(str(d) for d in domains) if isinstance(domains, list) else
                   node.cert_domains, extra_records=_records(cfg.get("ExtraRecords")))


def fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def resolve(node: Node, name: str) -> tuple[IPAddress, ...]:
    """A peer's addresses by MagicDNS name (case-insensitive); empty when no peer has that name."""
    want = fqdn(name).lower()
    for peer in node.peers.values():
        if fqdn(peer.name).lower() == want:
            return peer.addrs
    return ()
