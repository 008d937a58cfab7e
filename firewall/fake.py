"""In-memory driver for TS_TEST_FAKE_NETFILTER=true: records plans, touches nothing."""

from __future__ import annotations

from collections.abc import Iterable

from firewall.model import FirewallError, Plan


class FakeDriver:
    def __init__(self, backend: str = "iptables", families: Iterable[int] = (4, 6)) -> None:
        self.name = f"fake-{backend}"
        self.families = tuple(families)
        self.current = Plan()
        self.history: list[Plan] = []
        self.lock_wait = 0.0

    def apply(self, plan: Plan, full: bool = False) -> None:
        extra = plan.families() - set(self.families)
        if extra:
            raise FirewallError(f"fake: IPv{min(extra)} NAT disabled (TS_TEST_FAKE_NETFILTER_6=false)")
        self.current = plan
        self.history.append(plan)

    def flush(self) -> None:
        self.current = Plan()

    def installed(self) -> Plan:
        return self.current
