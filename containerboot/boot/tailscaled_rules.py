"""TailscaledRules: tailscaled's own netfilter chains watched on the drift check, and the budget of
tailscaled restarts that put them back.

tailscaled installs ts-input, ts-forward and ts-postrouting when its router starts and never checks them
again, and it cannot be asked to put them back (turning its netfilter mode off and on again fails once
the chains are gone, because removing the jumps to them fails first). So when they vanish (a
whole-ruleset flush, a firewall reload in a shared network namespace) the boot restarts tailscaled:
that loses least. The container and its Pod stay up, our own rules stay in the kernel, and nothing
depends on a restart policy (a `docker run` without one would simply stop); the Secret or state
directory brings the node back as itself. Exiting for the kubelet instead would cost a container
restart each time, and CrashLoopBackOff when it repeats. Where tailscaled's state is in memory, a restart
(or an exit) would register a new device with new addresses: then keeping the node loses less, and the
loss is only said (log, Event, metric), with what would let containerboot repair it.

A chain counts only once it has been seen holding rules in this tailscaled's life (a netfilter mode
of off or nodivert, or a tailscaled still starting, is not a loss). Something that keeps flushing
would make restarts a loop: more than RESTARTS in RESTART_WINDOW seconds ends the boot instead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from containerboot import log
from containerboot.events import Clock, Every, Exit, RestartTailscaled
from containerboot.kube.podevents import REASON_TAILSCALED_RESTARTED, REASON_TAILSCALED_RULES_LOST, Recorder
from containerboot.metrics import Metrics
from containerboot.settings import Settings
from containerboot.tailscale import tailscaled
from containerboot.tailscale.localapi import TailscaledAPI
from firewall.tschains import Chain, ChainReader, describe

CHECK_SECONDS = 2.0  # the same cadence as the check of our own rules
RESTARTS = 3
RESTART_WINDOW = 600.0


class TailscaledRules:
    def __init__(self, reader: ChainReader, s: Settings, clock: Clock, api: TailscaledAPI, metrics: Metrics,
                 events: Recorder) -> None:
        self.reader = reader
        self.keeps_state = tailscaled.keeps_state(s)  # a restarted tailscaled is the same node
        self.clock = clock
        self.api = api
        self.metrics = metrics
        self.events = events
        self.seen: set[Chain] = set()  # chains seen holding rules since this tailscaled started
        self.lost: tuple[float, frozenset[Chain]] | None = None  # when chains were found gone, and which
        self.restarts: deque[float] = deque()
        self.every = Every(clock, CHECK_SECONDS)

    def check_due(self) -> bool:
        return self.every.due()

    def check(self) -> None:
        """Raises RestartTailscaled when chains seen with rules are now empty or gone (Exit when that has
        happened too often); nothing when they could not be read."""
        found = self.reader.read()
        if found is None:
            return
        gone = frozenset(c for c in self.seen if not found.get(c))
        if gone:
            self._gone(gone)
        first = not self.seen
        self.seen |= {c for c, n in found.items() if n}
        if first and self.seen:  # from here on a removal counts; said once per tailscaled
            log.info(f"watching tailscaled's netfilter chains: {describe(self.seen)}")
        if self.lost is not None and self.lost[1] <= self.seen:
            log.info(f"tailscaled's netfilter chains are back ({describe(self.lost[1])}), "
                     f"{self.clock.now() - self.lost[0]:.1f}s after they were found gone")
            self.lost = None

    def _gone(self, gone: frozenset[Chain]) -> None:
        prefs = tailscaled.read_prefs(self.api)
        if isinstance(prefs, Mapping) and prefs.get("NetfilterMode") == 0:
            self.seen = set()  # `tailscale set --netfilter-mode=off` removed them, as asked
            return
        what = f"tailscaled's own netfilter chains were removed ({describe(gone)})"
        self.metrics.tailscaled_rules_lost += 1
        if not self.keeps_state:
            self.seen = set()  # said once for this loss
            why = ("not restarting tailscaled to put them back: its state is in memory, so a restart would "
                   "register a new device with new addresses; set TS_STATE_DIR (or TS_KUBE_SECRET) for that")
            log.warning(f"{what}; {why}")
            self.events.emit(REASON_TAILSCALED_RULES_LOST, f"{what}; {why}", warning=True)
            return
        now = self.clock.now()
        while self.restarts and self.restarts[0] <= now - RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= RESTARTS:
            raise Exit(1, f"{what} again, after {RESTARTS} restarts of tailscaled in "
                          f"{log.go_duration(round(RESTART_WINDOW))}: something keeps removing them (a firewall "
                          "reload in a loop?); exiting")
        self.restarts.append(now)
        self.lost, self.seen = (now, gone), set()  # the next tailscaled makes its chains afresh
        log.warning(f"{what}: a ruleset flush or a firewall reload; tailscaled installs them only when it starts, "
                    "so it is restarted (our rules stay)")
        self.metrics.tailscaled_restarts += 1
        self.events.emit(REASON_TAILSCALED_RESTARTED, f"{what}; restarting tailscaled to put them back", warning=True)
        raise RestartTailscaled(what)
