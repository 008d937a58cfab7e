"""What the boot's main loop is told, one type per kind of event: a reader thread, a signal handler, a
watcher or the tailscaled child puts one on the queue, and the loop takes them in order."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Notify:
    """One notification from tailscaled's IPN bus, from the watch numbered `watch` (a later watch makes
    the ones still queued from an earlier one stale)."""

    value: dict[str, Any]
    watch: int
    at: float = field(default_factory=time.monotonic)  # when it arrived, for the "our share" figure


@dataclass(frozen=True)
class BusError:
    """The IPN bus watch numbered `watch` failed."""

    message: str
    watch: int


@dataclass(frozen=True)
class TailscaledExit:
    """tailscaled exited on its own: its wait status (negative: killed by that signal)."""

    code: int


@dataclass(frozen=True)
class Signal:
    """SIGTERM or SIGINT arrived."""

    signum: int


@dataclass(frozen=True)
class ConfigChanged:
    """The versioned config directory changed (the kubelet swapped ..data)."""


@dataclass(frozen=True)
class ServicesChanged:
    """A ProxyGroup service config changed."""


Event = Notify | BusError | TailscaledExit | Signal | ConfigChanged | ServicesChanged
