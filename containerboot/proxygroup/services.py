"""A ProxyGroup replica's services as the boot drives them: the egress and ingress configs in force
(the last good ones), their watches, the status written to the state Secret once the rules are live,
and the pre-stop drain of egress services.

The configs are parsed in egress.py and ingress.py (pure); their rules come from rules.plan together
with the proxy's own. Upstream starts these proxies once the boot is complete, and so does the loop.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from containerboot import log
from containerboot.events import Cancel, Clock, Inbox, ServicesChanged
from containerboot.kube import client as kube
from containerboot.kube import configdir, secret
from containerboot.kube.podevents import REASON_CONFIG_REJECTED, Recorder
from containerboot.kube.state import StateKeeper
from containerboot.metrics import Metrics
from containerboot.proxygroup import egress, ingress
from containerboot.settings import Settings
from containerboot.tailscale.ipn import Node

STATUS_RETRY_SECONDS = 5.0
POLL_SECONDS = 10.0  # the configs are also re-read this often (a write that is no kubelet swap)
T = TypeVar("T", bound=tuple[object, ...])  # a parsed service config (a tuple of services)

Status = dict[str, object]


class ProxyGroupServices:
    def __init__(self, s: Settings, state: StateKeeper, inbox: Inbox, cancel: Cancel, clock: Clock,
                 metrics: Metrics, events: Recorder) -> None:
        self.s = s
        self.metrics = metrics
        self.events = events
        self.state = state
        self.inbox = inbox
        self.cancel = cancel
        self.clock = clock
        self.on = False
        self.watches: list[configdir.DirWatch] = []
        self.egress_cfg: egress.Configs | None = None
        self.ingress_cfg: ingress.Configs | None = None
        self.files: dict[str, bytes | str | None] = {}  # by path: the bytes last read, or the error
        self.resolved: list[egress.Resolved] | None = None  # egress targets as last applied
        self.written: dict[str, Status | None] = {}  # the status last written, by Secret key
        self.status_retry = False
        self.status_inputs: object = None
        self.next_retry = 0.0
        self.next_poll = 0.0
        self.pod = egress.pod_ips(s.pod_ips)
        self.drain_stop = threading.Event()
        self.drain: egress.Drain | None = None
        if s.egress_proxies_config_path:
            sleep = float(os.environ.get("TS_TEST_ONLY_EGRESS_SLEEP") or 1.0)  # upstream's testSleepDuration
            self.drain = egress.Drain(s.egress_proxies_config_path, self.pod, self.drain_stop, short=sleep,
                                      long=sleep * 10, log=log.info)

    @property
    def configured(self) -> bool:
        return bool(self.s.egress_proxies_config_path or self.s.ingress_proxies_config_path)

    def start(self) -> bool:
        """Watch and read the configs; True the first time (the caller reconciles)."""
        s = self.s
        if self.on or not self.configured:
            return False
        self.on = True
        use_inotify = not os.environ.get("TS_TEST_NO_INOTIFY")
        for what, path, directory in (
                ("egress", s.egress_proxies_config_path, s.egress_proxies_config_path),
                ("ingress", s.ingress_proxies_config_path, os.path.dirname(s.ingress_proxies_config_path))):
            if not path:
                continue
            log.info(f"configuring {what} proxy using configuration file at {path}")
            watch = configdir.DirWatch(directory or ".", lambda: self.inbox.put(ServicesChanged()),
                                       use_inotify=use_inotify)
            if watch.mode != "inotify":
                log.info(f"{what} services config watch: failed to create fsnotify watcher, timer-only mode: "
                         f"{watch.problem}")
            self.watches.append(watch)
        self.load()
        self.next_poll = self.clock.now() + POLL_SECONDS
        return True

    def inputs(self, node: Node, families: Iterable[int]) -> tuple[list[egress.Resolved], ingress.Configs, list[str]]:
        """What the services add to rules.plan: egress targets resolved against the netmap, ingress
        services, and notes about targets that do not resolve."""
        if not self.on:
            return [], (), []
        resolved: list[egress.Resolved] = []
        notes: list[str] = []
        if self.egress_cfg:
            resolved, notes = egress.targets(self.egress_cfg, node, families, self.s.pod_ips)
        return resolved, self.ingress_cfg or (), notes

    def wants_dns_config(self) -> bool:
        """An egress service named by a name that may be a Tailscale Service (an extra DNS record)."""
        return bool(self.on and self.egress_cfg and any(svc.fqdn and not svc.ip for svc in self.egress_cfg))

    def poll_due(self) -> bool:
        return self.on and self.clock.now() >= self.next_poll

    def reload(self) -> bool:
        """Read the configs again (a watch said so, or the poll is due); True when those in force changed."""
        self.next_poll = self.clock.now() + POLL_SECONDS
        return self.on and self.load()

    def load(self) -> bool:
        """Read the config files; True when the configs in force changed. A file that cannot be used is
        logged in one line (once, until it changes) and the last good config stays in force."""
        s = self.s
        changed = False
        if s.egress_proxies_config_path:
            path = os.path.join(s.egress_proxies_config_path, egress.KEY_CONFIG)
            got = self._read("egress", path, egress.SETTING, egress.parse, len(self.egress_cfg or ()))
            if got is not None:
                changed = changed or got[0] != self.egress_cfg
                self.egress_cfg = got[0]
        if s.ingress_proxies_config_path:
            igot = self._read("ingress", s.ingress_proxies_config_path, ingress.SETTING, ingress.parse,
                              len(self.ingress_cfg or ()))
            if igot is not None:
                # None (no file) and () (an empty object) differ: upstream writes a status for the latter.
                changed = changed or igot[0] != self.ingress_cfg
                self.ingress_cfg = igot[0]
        self.metrics.services[("egress", "configured")] = len(self.egress_cfg or ())
        self.metrics.services[("ingress", "configured")] = len(self.ingress_cfg or ())
        return changed

    def _read(self, kind: str, path: str, setting: str, parse: Callable[[bytes, str], T | None],
              in_force: int) -> tuple[T | None] | None:
        """A config file read again: (the config,) when its bytes changed and it is usable (None in it:
        no file, or an empty one), else None. A file that cannot be read, is too large or does not parse
        is said once and keeps the `in_force` services; an unreadable file is not taken for a missing
        one, which would remove every service."""
        try:
            data: bytes | str | None = egress.read_file(path, setting)
        except egress.ConfigError as exc:
            data = str(exc)
        if data == self.files.get(path):  # (a file missing from the start is no change)
            return None
        self.files[path] = data
        try:
            if isinstance(data, str):
                raise egress.ConfigError(data)
            cfg = parse(data, path) if data is not None else None
        except egress.ConfigError as exc:
            log.error(f"{exc}; keeping the {in_force} {kind} services in force")
            self.events.emit(REASON_CONFIG_REJECTED, f"{exc}; keeping the {in_force} {kind} services in force",
                             warning=True)
            return None
        log.info(f"{kind} services config: {len(cfg) if cfg is not None else 0} services")
        return (cfg,)

    def applied(self, resolved: list[egress.Resolved]) -> None:
        """The rules for `resolved` are live: the operator may be told."""
        if self.on:
            self.resolved = resolved
            self.metrics.services[("egress", "applied")] = sum(1 for r in resolved if r.targets)
            self.metrics.services[("ingress", "applied")] = len(self.ingress_cfg or ())
            self.write_status()

    def retry_due(self) -> bool:
        return self.status_retry and self.clock.now() >= self.next_retry

    def write_status(self) -> None:
        """The `egress-services` and `ingress-config.json` keys, when they differ from what was written."""
        store = self.state.writable
        if store is None:
            return
        # Every netmap reconciles; the status (about 6 ms to build for 1,000 services) only when its inputs moved.
        inputs = (tuple(self.resolved or ()), self.resolved is None, self.ingress_cfg)
        if inputs == self.status_inputs and not self.status_retry:
            return
        s = self.s
        patch: secret.Patch = {}
        new: dict[str, Status] = {}
        if s.egress_proxies_config_path and self.resolved is not None:
            new[secret.KEY_EGRESS_SERVICES] = egress.status(self.resolved, self.pod)
            if egress.wants_write(new[secret.KEY_EGRESS_SERVICES], self.written.get(secret.KEY_EGRESS_SERVICES)):
                patch[secret.KEY_EGRESS_SERVICES] = egress.status_bytes(new[secret.KEY_EGRESS_SERVICES])
        if s.ingress_proxies_config_path:
            new[secret.KEY_INGRESS_CONFIG] = ingress.status(self.ingress_cfg, self.pod)
            if ingress.wants_write(self.ingress_cfg, new[secret.KEY_INGRESS_CONFIG],
                                   self.written.get(secret.KEY_INGRESS_CONFIG)):
                patch[secret.KEY_INGRESS_CONFIG] = egress.status_bytes(new[secret.KEY_INGRESS_CONFIG])
        if patch:
            try:
                with self.cancel.blocking():
                    store.patch(patch)
            except kube.KubeError as exc:
                # The rules are live; the status tells the operator so. Not worth the proxy's life: try again.
                self.status_retry = True
                self.next_retry = self.clock.now() + STATUS_RETRY_SECONDS
                log.warning(f"writing services status to Secret {json.dumps(s.kube_secret)}: {exc}; retrying in "
                            f"{STATUS_RETRY_SECONDS:g}s")
                return
        self.status_retry = False
        self.status_inputs = inputs
        for key, what, field in ((secret.KEY_EGRESS_SERVICES, "egress", "services"),
                                 (secret.KEY_INGRESS_CONFIG, "ingress", "configs")):
            if key in patch:
                self.written[key] = new[key]
                entries = new[key].get(field)
                n = len(entries) if isinstance(entries, dict | list) else 0
                log.info(f"{what} services: status of {n} services written to the state Secret")

    def close(self) -> None:
        self.drain_stop.set()  # a pre-stop drain in progress answers now
        for watch in self.watches:
            watch.close()
