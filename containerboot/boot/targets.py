"""The proxy's destinations that move while it runs: TS_TAILNET_TARGET_FQDN, resolved against the netmap
on every netmap, and TS_EXPERIMENTAL_DEST_DNS_NAME, resolved by DNS every ten minutes (with backoff
after a failure), as upstream's reconfigure timer does. proxy.py turns them into rules."""

from __future__ import annotations

from collections.abc import Callable

from containerboot import log
from containerboot.dns import ResolveError, lookup_bounded
from containerboot.events import Cancel, Clock
from containerboot.settings import Settings
from containerboot.tailscale import ipn
from firewall.model import IPAddress

DNS_REFRESH_SECONDS = 600.0


class Targets:
    def __init__(self, s: Settings, cancel: Cancel, clock: Clock, note: Callable[[str], None]) -> None:
        self.s = s
        self.cancel = cancel
        self.clock = clock
        self.note = note  # said once per text
        self.egress: tuple[IPAddress, ...] = ()  # the tailnet target's addresses
        self.backends: tuple[IPAddress, ...] = ()  # the DNS name's addresses
        self.next_dns = 0.0
        self.dns_failures = 0

    @property
    def egress_waiting(self) -> bool:
        """A tailnet target named by a name that has not resolved yet: no rules and no endpoints for now."""
        return bool(self.s.tailnet_target_fqdn and not self.egress)

    def resolve_egress(self, node: ipn.Node) -> None:
        name = self.s.tailnet_target_fqdn
        if not name:
            return
        found = ipn.resolve(node, name)
        if found:
            self.egress = found
        else:
            self.note(f'could not find Tailscale node "{ipn.fqdn(name)}"; it either does not exist, or not reachable '
                      "because of ACLs; retrying on the next netmap" + (f" (keeping {', '.join(map(str, self.egress))})"
                                                                       if self.egress else ""))

    def dns_due(self) -> bool:
        return bool(self.s.dest_dns_name) and self.clock.now() >= self.next_dns

    def resolve_backends(self, force: bool = False) -> bool:
        """Look the DNS name up when due (or `force`); True when its addresses changed."""
        name = self.s.dest_dns_name
        if not name or (not force and self.clock.now() < self.next_dns):
            return False
        try:
            with self.cancel.blocking():
                found = lookup_bounded(name)
        except (ResolveError, OSError) as exc:
            delay = min(2.0 ** self.dns_failures, DNS_REFRESH_SECONDS)
            self.dns_failures += 1
            log.info(f"[unexpected] error resolving DNS name {name}: {exc}")
            log.info("reconfigureTimer: last DNS resolution attempt failed, next DNS resolution attempt in "
                     f"{log.go_duration(delay)}")
            self.next_dns = self.clock.now() + delay
            return False
        self.dns_failures = 0
        self.next_dns = self.clock.now() + DNS_REFRESH_SECONDS
        if found == self.backends:
            return False
        if self.backends:
            log.info(f"Backend address change detected, installing proxy rules for backends {log.go_list(found)}")
        else:
            log.info(f"installing ingress proxy rules for backends {log.go_list(found)}")
        self.backends = found
        return True
