"""The program a bare `containerboot` runs: the set-up (the Kubernetes state Secret beside the host's
preparation and netfilter detection), then one boot after another (loop.py) for as long as a boot ends in
a restart of tailscaled."""

from __future__ import annotations

from containerboot import log
from containerboot.events import Cancel, Clock, Exit, Inbox, MonotonicClock
from containerboot.kube import configdir
from containerboot.kube import state as kube_state
from containerboot.kube.podevents import REASON_FIREWALL_BACKEND, open_events
from containerboot.settings import Settings
from containerboot.tailscale.localapi import LocalAPI

from .loop import Boot, ended, unexpected
from .prepare import prepare_firewall, prepare_host, summary


def run(boot: Boot) -> int:
    """Boot, and boot again for as long as a boot ends in a restart of tailscaled."""
    while (code := boot.boot()) is None:
        boot = boot.again()
    return code


def main(s: Settings, clock: Clock | None = None) -> int:
    """Set up (the Kubernetes state Secret beside the host's preparation and netfilter detection, all
    bounded by TS_BOOT_TIMEOUT with tailscaled's start and the login), then boot."""
    for text in s.notes:
        log.info(text)
    clock = clock or MonotonicClock()
    cancel = Cancel(Inbox(clock))
    api = LocalAPI(s.socket, guard=cancel.blocking)
    try:
        cancel.install()
        deadline = clock.now() + s.boot_timeout
        opening = kube_state.Opening(s, cancel, deadline, configdir.authkey(s.config_file) if s.config_file else "") \
            if s.kube_secret else None
        prepare_host(s)
        fw = prepare_firewall(s)
        log.info(summary(s, fw.detection))
        store, s = opening.result() if opening is not None else (None, s)
        events = open_events(s, cancel.requested, store.client if store is not None else None)
        if fw.detection is not None:
            d = fw.detection
            events.emit(REASON_FIREWALL_BACKEND, f"{d.backend} ({d.variant}): {'; '.join(d.evidence)}")
    except Exit as exc:
        return ended(exc)
    except Exception as exc:  # noqa: BLE001
        return unexpected(exc)
    return run(Boot(s, api, fw, store, events, cancel, clock, deadline))
