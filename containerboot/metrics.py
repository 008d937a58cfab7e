"""containerboot's own metrics: what it decided and how its rules and tailscaled are doing, served on
/metrics (TS_ENABLE_METRICS) before tailscaled's own, in Prometheus' text format.

The loop and its collaborators set plain fields of one `Metrics` (from the main thread); a scrape (a
server thread) renders them. Each field is one value, so a scrape sees every value whole; the figures
are a handful whatever the number of services, so a scrape costs the same at 1 or 1,000 of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

Sample = tuple[Mapping[str, str], float]  # labels, value
STATES = ("NoState", "InUseOtherUser", "NeedsLogin", "NeedsMachineAuth", "Stopped", "Starting", "Running")


def _label(value: str) -> str:
    """A label value as the text format escapes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def go_time(text: str) -> float | None:
    """A Go time.Time in JSON (RFC 3339, up to nanoseconds) as Unix time; None for Go's zero time or junk."""
    from datetime import datetime

    head, dot, rest = text.partition(".")
    if dot:  # Python reads at most microseconds: keep six digits of the fraction, and the zone after it
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    try:
        stamp = datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
    return None if stamp < 0 else stamp


@dataclass
class Metrics:
    """The figures as they stand; render() writes them in the text format."""

    firewall: tuple[str, str, str] | None = None  # backend, variant, why (the evidence)
    rules: dict[int, int] = field(default_factory=dict)  # installed, by address family
    applies: int = 0
    apply_failures: int = 0
    last_apply_seconds: float = math.nan
    drift_repairs: int = 0
    netmap_at: float | None = None  # monotonic time of the last netmap
    backend_state: str = ""
    control_online: bool | None = None  # None: not known yet
    key_expiry: float | None = None  # the node key's expiry, Unix time (None: it does not expire, or unknown)
    services: dict[tuple[str, str], int] = field(default_factory=dict)  # (egress|ingress, configured|applied)
    reissues: int = 0
    tailscaled_rules_lost: int = 0
    tailscaled_restarts: int = 0
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time

    def observe_status(self, status: object) -> None:
        """What /localapi/v0/status (without peers) says at scrape time: whether tailscaled is in its map
        poll with the control server (Self.Online) and when the node key expires."""
        me = status.get("Self") if isinstance(status, dict) else None
        if not isinstance(me, dict):
            self.control_online = None
            return
        self.control_online = bool(me.get("Online"))
        expiry = me.get("KeyExpiry")
        self.key_expiry = go_time(expiry) if isinstance(expiry, str) else None

    def render(self) -> bytes:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")

        fw = self.firewall
        family("containerboot_firewall_info", "gauge", "The netfilter backend containerboot chose, and why.",
               [({"backend": fw[0], "variant": fw[1], "reason": fw[2]}, 1)] if fw else [])
        family("containerboot_rules", "gauge", "Rules containerboot has installed, by address family.",
               [({"family": f"ipv{fam}"}, n) for fam, n in sorted(self.rules.items())])
        family("containerboot_rule_applies_total", "counter", "Rule plans made live in the kernel.",
               [({}, self.applies)])
        family("containerboot_rule_apply_failures_total", "counter",
               "Rule plans the kernel refused or another program's lock held back.", [({}, self.apply_failures)])
        family("containerboot_rule_apply_seconds", "gauge", "How long the last rule plan took to apply.",
               [({}, self.last_apply_seconds)])
        family("containerboot_drift_repairs_total", "counter",
               "Times rules removed or changed by others were put back.", [({}, self.drift_repairs)])
        age: list[Sample] = [({}, self.clock() - self.netmap_at)] if self.netmap_at is not None else []
        family("containerboot_netmap_age_seconds", "gauge", "Seconds since tailscaled last sent a netmap.", age)
        family("containerboot_tailscaled_backend_state", "gauge", "tailscaled's backend state (1: the current one).",
               [({"state": st}, 1 if st == self.backend_state else 0) for st in STATES])
        online: list[Sample] = [({}, 1 if self.control_online else 0)] if self.control_online is not None else []
        family("containerboot_control_connected", "gauge",
               "Whether tailscaled's connection to the control server is up.", online)
        expiry: list[Sample] = [({}, self.key_expiry - self.wall())] if self.key_expiry is not None else []
        family("containerboot_node_key_expiry_seconds", "gauge",
               "Seconds until the node key expires (negative: expired; absent: it does not expire).", expiry)
        family("containerboot_services", "gauge", "ProxyGroup services configured, and with rules applied.",
               [({"kind": kind, "state": state}, n) for (kind, state), n in sorted(self.services.items())])
        family("containerboot_authkey_reissues_total", "counter", "New auth keys asked of the operator.",
               [({}, self.reissues)])
        family("containerboot_tailscaled_rules_lost_total", "counter",
               "Times tailscaled's own netfilter chains were found removed under it.",
               [({}, self.tailscaled_rules_lost)])
        family("containerboot_tailscaled_restarts_total", "counter",
               "tailscaled restarted in-process because its own netfilter chains were removed.",
               [({}, self.tailscaled_restarts)])
        return ("\n".join(out) + "\n").encode()
