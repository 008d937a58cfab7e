"""RuleKeeper: the kernel's rules kept equal to the last plan, through the detected Driver.

A plan goes in with `apply`; another program holding the netfilter lock leaves it pending (tried again
on the tick), any other failure ends the boot. Once a plan is live, `check_drift` reads the rules back
every DRIFT_CHECK_SECONDS and puts back what somebody removed (`nft flush ruleset`, `iptables -t nat -F`,
a firewall reload). On a clean shutdown `flush` removes them.
"""

from __future__ import annotations

from containerboot import log
from containerboot.events import Cancel, Clock, Every, Exit
from containerboot.kube.podevents import REASON_FIREWALL_RULES_RESTORED, Recorder
from containerboot.metrics import Metrics
from firewall.model import Driver, FirewallBusy, FirewallError, Plan

DRIFT_CHECK_SECONDS = 2.0


class RuleKeeper:
    def __init__(self, driver: Driver, cancel: Cancel, clock: Clock, metrics: Metrics, events: Recorder) -> None:
        self.driver = driver
        self.events = events
        self.cancel = cancel
        self.clock = clock
        self.metrics = metrics
        self.applied: Plan | None = None  # the plan live in the kernel
        self.pending = False  # a plan that could not be applied yet (lock busy): retried on the tick
        self.every = Every(clock, DRIFT_CHECK_SECONDS)

    def apply(self, plan: Plan) -> bool:
        """Make the kernel's rules equal to `plan`; False when the lock is busy (pending, retried)."""
        started = self.clock.now()
        try:
            with self.cancel.blocking():
                self.driver.apply(plan)
        except FirewallBusy as exc:
            # Another program holds the netfilter lock: not an error of ours; the next tick tries again.
            self.metrics.apply_failures += 1
            self.pending = True
            log.warning(f"firewall: {exc}; retrying")
            return False
        except FirewallError as exc:
            self.metrics.apply_failures += 1
            raise Exit(1, f"installing proxy rules: {exc}") from exc
        self.pending = False
        self.applied = plan
        self.metrics.applies += 1
        self.metrics.last_apply_seconds = self.clock.now() - started
        self.metrics.rules = {fam: len(plan.only(fam).rules) for fam in (4, 6)}
        self.every.restart()
        return True

    def retry_due(self) -> bool:
        """A pending plan is tried again every DRIFT_CHECK_SECONDS."""
        return self.pending and self.every.due()

    def check_due(self) -> bool:
        return self.applied is not None and not self.pending and self.every.due()

    def check_drift(self) -> None:
        """Put back rules that somebody removed."""
        assert self.applied is not None
        try:
            with self.cancel.blocking():
                found = self.driver.installed()
        except (FirewallError, OSError) as exc:
            # Not being able to read (out of file descriptors, a busy lock) says nothing about the rules:
            # unknown, so nothing is "restored" on a guess; the next check tries again.
            log.warning(f"firewall: cannot read back the rules: {exc}; checking again in {DRIFT_CHECK_SECONDS:g}s")
            return
        if found == self.applied:
            return
        missing, extra = self.applied.rules - found.rules, found.rules - self.applied.rules
        what = f"rules changed outside containerboot ({len(missing)} missing, {len(extra)} unexpected)"
        log.warning(f"firewall: {what}; restoring them")
        try:
            with self.cancel.blocking():
                self.driver.apply(self.applied, full=True)
        except (FirewallError, OSError) as exc:
            log.error(f"firewall: restoring the rules failed: {exc}; retrying")
            return
        self.metrics.drift_repairs += 1
        self.events.emit(REASON_FIREWALL_RULES_RESTORED, f"{what}; restored", warning=True)

    def flush(self) -> None:
        """Remove our rules (clean shutdown): quickly, or not at all."""
        if self.applied is None:
            return
        try:
            self.driver.lock_wait = min(self.driver.lock_wait, 1.0)
            self.driver.flush()
        except FirewallError as exc:
            log.warning(f"firewall: removing our rules failed: {exc}")
            return
        self.metrics.rules = {}
