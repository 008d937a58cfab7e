"""The boot program: start tailscaled, log the node in, follow the IPN bus, keep the rules in step.

Everything arrives as an event on one queue (IPN notifications from a reader thread, tailscaled's
exit from the thread that waits for it, signals, a one-second tick), and the main thread handles
events one at a time. Decisions about rules are the pure `proxy.plan`; this module applies them.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from containerboot import health, ipn, log, proxy, serve, system, tailscaled
from containerboot.dns import ResolveError, lookup
from containerboot.localapi import BusWatch, LocalAPI, LocalAPIError
from containerboot.settings import Settings
from firewall.model import FirewallError, IPAddress, Plan

DRIFT_CHECK_SECONDS = 2.0
DNS_REFRESH_SECONDS = 600.0
SHUTDOWN_TIMEOUT = 25.0


class Exit(Exception):
    """End the program with `code`, logging `message` (if any) first."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Event:
    kind: str  # notify | bus-error | tailscaled-exit | signal
    value: Any = None
    watch: int = 0
    at: float = field(default_factory=time.monotonic)  # when it arrived, for the "our share" figure


def _state_store(s: Settings) -> str:
    if s.config_file:
        return f"tailscaled config file {s.config_file}"
    if s.kube_secret:
        return f"Kubernetes Secret {s.kube_secret}"
    if s.state_dir:
        return f"directory {s.state_dir}"
    return "memory (a restart registers a new device; set TS_STATE_DIR to keep it)"


class Boot:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()  # put() is safe in signal handlers
        self.api = LocalAPI(s.socket)
        self.health = health.Health(s)
        self.node = ipn.Node()
        self.driver: Any = None
        self.detection: Any = None
        self.child: tailscaled.Tailscaled | None = None
        self.watch: BusWatch | None = None
        self.watch_id = 0
        self.servers: list[Any] = []
        self.serve = serve.ServeWatcher(s.serve_config, self.api) if s.serve_config else None
        self.applied: Plan | None = None
        self.notes: set[str] = set()
        self.egress: tuple[IPAddress, ...] = ()
        self.backends: tuple[IPAddress, ...] = ()
        self.next_dns = 0.0
        self.dns_failures = 0
        self.next_drift = 0.0
        self.env: dict[str, str] = {}
        self.netmap_at = 0.0
        self.stop_requested = 0  # the signal that asked us to stop, seen by blocking CLI calls
        self.started = False

    # ---- setup -------------------------------------------------------------------------------------

    def prepare_host(self) -> None:
        s = self.s
        if s.userspace:
            return
        try:
            system.ensure_tun(s)
        except OSError as exc:
            raise Exit(1, f"Unable to create tuntap device file: {exc}; run the container with "
                          "--device /dev/net/tun (Compose: devices: [/dev/net/tun]; Kubernetes: mount /dev/net/tun "
                          "from the host) and the NET_ADMIN capability, or set TS_USERSPACE=true") from exc
        if s.needs_forwarding:
            try:
                system.enable_forwarding(s)
            except system.ForwardingError as exc:
                log.error(f"Failed to enable IP forwarding: {exc}")
                log.error("To run tailscale as a proxy or router container, IP forwarding must be enabled.")
                raise Exit(1, system.forwarding_help(s)) from exc

    def prepare_firewall(self) -> dict[str, str]:
        """Detect the backend (kernel mode only) and return tailscaled's environment."""
        from firewall.detect import DetectionError, detect, make_driver

        env = dict(os.environ)
        s = self.s
        if s.cert_share:
            env["TS_CERT_SHARE_MODE"] = "rw" if s.pod_name.endswith("-0") else "ro"
        if s.userspace:
            return env
        try:
            self.detection = detect(os.environ, fake=s.fake_netfilter, fake_ipv6=s.fake_netfilter_6)
        except DetectionError as exc:
            if s.is_l3_proxy:
                raise Exit(1, f"error creating new netfilter runner: {exc}") from exc
            log.warning(f"[warning] {exc}; tailscaled will pick its own backend")
            return env
        if s.is_l3_proxy:
            self.driver = make_driver(self.detection)
        if not self.detection.fake and not os.environ.get("TS_DEBUG_FIREWALL_MODE"):
            # tailscaled's own rules (ts-input, ts-forward, ...) land in the same backend as ours.
            env["TS_DEBUG_FIREWALL_MODE"] = self.detection.backend
        if not self.detection.fake and self.detection.backend == "iptables":
            shim = system.legacy_xtables_path(s)
            if shim:
                env["PATH"] = f"{shim}:{env.get('PATH', '')}"
                log.info(f"tailscaled runs iptables as iptables-legacy (through {shim}), like our rules")
        return env

    def summary(self) -> str:
        s, d = self.s, self.detection
        if s.userspace:
            firewall = "none (userspace networking: other processes reach the tailnet through the SOCKS5/HTTP proxy)"
        elif d is None:
            firewall = "undetected"
        else:
            firewall = f"{d.backend} ({d.variant}): {'; '.join(d.evidence)}"
        url = health.health_url(s) or "disabled (set TS_ENABLE_HEALTH_CHECK=true)"
        return f"Configuration: mode {s.mode}; firewall {firewall}; state {_state_store(s)}; health {url}"

    # ---- events ------------------------------------------------------------------------------------

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_requested = signum
        self.events.put(Event("signal", signum))

    def on_tailscaled_exit(self, code: int) -> None:
        self.events.put(Event("tailscaled-exit", code))

    def open_watch(self, mask: int) -> None:
        self.close_watch()
        try:
            watch = self.api.watch(mask)
        except LocalAPIError as exc:
            raise Exit(1, f"failed to watch tailscaled for updates: {exc}") from exc
        self.watch_id += 1
        self.watch = watch
        threading.Thread(target=self._read, args=(watch, self.watch_id), name="ipn-bus", daemon=True).start()

    def _read(self, watch: BusWatch, wid: int) -> None:
        try:
            for notify in watch:
                self.events.put(Event("notify", notify, wid))
        except LocalAPIError as exc:
            self.events.put(Event("bus-error", str(exc), wid))

    def close_watch(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
            self.watch_id += 1  # anything still queued from it is stale

    def next_event(self, deadline: float | None = None) -> Event | None:
        """The next live event, or None on a tick (at most one second, or at the deadline)."""
        while True:
            wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            try:
                ev = self.events.get(timeout=wait)
            except queue.Empty:
                return None
            if ev.kind in ("notify", "bus-error") and ev.watch != self.watch_id:
                continue
            return ev

    def common(self, ev: Event) -> None:
        """Events that end the program the same way in every phase."""
        if ev.kind == "signal":
            log.info(f"Received {signal.Signals(ev.value).name}, shutting down")
            raise Exit(0)
        if ev.kind == "tailscaled-exit":
            code = ev.value
            raise Exit(code if 0 < code < 256 else 128 - code if code < 0 else 1,
                       f"tailscaled exited unexpectedly ({tailscaled.exit_status(code)}); exiting so that the "
                       "container is restarted")
        if ev.kind == "bus-error":
            if self.child and self.child.proc.poll() is None:
                time.sleep(0.5)  # tailscaled dying closes the stream first: report its exit instead
            if self.child and self.child.proc.poll() is not None:
                self.common(Event("tailscaled-exit", self.child.proc.returncode))
            raise Exit(1, f"failed to read from tailscaled: {ev.value}")

    # ---- phases ------------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.s
        deadline = time.monotonic() + s.boot_timeout
        log.info("Starting tailscaled")
        self.child = tailscaled.Tailscaled(tailscaled.tailscaled_argv(s), self.env, self.on_tailscaled_exit)
        log.info(f"Waiting for tailscaled socket at {s.socket}")
        problem = tailscaled.wait_for_socket(s.socket, deadline, lambda: self.child is not None
                                             and self.child.proc.poll() is None)
        if problem:
            if self.child.proc.poll() is not None:
                self.common(Event("tailscaled-exit", self.child.proc.returncode))
            raise Exit(1, problem)
        try:
            self.servers = health.start(s, self.health, self.api)
        except OSError as exc:
            raise Exit(1, f"failed to listen on the health/metrics address: {exc}") from exc
        if s.enable_forwarding_optimizations:
            try:
                self.api.json("POST", "/localapi/v0/set-udp-gro-forwarding")
            except LocalAPIError as exc:
                log.info(f"[unexpected] error enabling UDP GRO forwarding: {exc}")
        self.open_watch(ipn.FIRST_WATCH_MASK)
        warning = system.link_socket(s)
        if warning:
            log.warning(warning)
        if not s.config_file and not s.auth_once:
            self.close_watch()
            self.login(deadline)
            self.open_watch(ipn.WATCH_MASK)
        self.await_running(deadline)
        self.close_watch()
        if s.auth_once and not s.config_file:
            log.info("Running 'tailscale set'")
            problem = tailscaled.run_cli(tailscaled.set_argv(s), timeout=60, stop=lambda: bool(self.stop_requested))
            if problem:
                raise Exit(1, f"failed to auth tailscale: tailscale set failed: {problem}")
        if s.serve_config:
            log.info("serve proxy: unsetting previous config")
            try:
                self.api.json("POST", "/localapi/v0/serve-config", {})
            except LocalAPIError as exc:
                raise Exit(1, f"failed to unset serve config: {exc}") from exc
        self.open_watch(ipn.WATCH_MASK)

    def login(self, deadline: float) -> None:
        log.info("Running 'tailscale up'")
        problem = tailscaled.run_cli(tailscaled.up_argv(self.s), timeout=max(0.1, deadline - time.monotonic()),
                                     stop=lambda: bool(self.stop_requested))
        if self.stop_requested:
            self.common(Event("signal", self.stop_requested))
        if problem:
            raise Exit(1, f"failed to auth tailscale: tailscale up failed: {problem}")

    def await_running(self, deadline: float) -> None:
        logged_in = False
        while True:
            if time.monotonic() >= deadline:
                raise Exit(1, "failed to read from tailscaled: context deadline exceeded (TS_BOOT_TIMEOUT="
                              f"{self.s.boot_timeout:g}s)")
            ev = self.next_event(deadline)
            if ev is None:
                continue
            if ev.kind != "notify":
                self.common(ev)
                continue
            if ipn.is_netmap(ev.value):
                self.node = ipn.update(self.node, ev.value)
            state = ipn.state_of(ev.value)
            if state == "Running":
                return
            if state == "NeedsLogin":
                if self.s.config_file:
                    raise Exit(1, "invalid state: tailscaled daemon started with a config file, but tailscale is "
                                  "not logged in: ensure you pass a valid auth key in the config file")
                if self.s.auth_once and not logged_in:
                    logged_in = True
                    self.login(deadline)
                    continue
            if state == "NeedsMachineAuth":
                log.info("machine authorization required, please visit the admin panel")
            elif state:
                log.info(f'tailscaled in state "{state}", waiting')

    def run_loop(self) -> None:
        while True:
            ev = self.next_event()
            if ev is None:
                self.tick()
                continue
            if ev.kind != "notify":
                self.common(ev)
                continue
            state = ipn.state_of(ev.value)
            if state and state != "Running":
                raise Exit(1, f'tailscaled left running state (now in state "{state}"), exiting')
            if ipn.is_netmap(ev.value):
                self.netmap_at = ev.at
                self.node = ipn.update(self.node, ev.value)
                if self.node.self_known:
                    self.on_netmap(self_changed=bool(ev.value.get("SelfChange")))

    # ---- netmap processing ------------------------------------------------------------------------

    def refresh_cert_domains(self) -> None:
        try:
            cfg = self.api.json("GET", "/localapi/v0/dns-config") or {}
        except (LocalAPIError, ValueError) as exc:
            log.info(f"error refreshing DNS config from tailscaled: {exc}")
            return
        domains = cfg.get("CertDomains") if isinstance(cfg, dict) else None
        if isinstance(domains, list):
            self.node = replace(self.node, cert_domains=tuple(str(d) for d in domains))

    def resolve_egress(self) -> None:
        name = self.s.tailnet_target_fqdn
        if not name:
            return
        found = ipn.resolve(self.node, name)
        if found:
            self.egress = found
        else:
            self.note(f'could not find Tailscale node "{ipn.fqdn(name)}"; it either does not exist, or not reachable '
                      "because of ACLs; retrying on the next netmap" + (f" (keeping {', '.join(map(str, self.egress))})"
                                                                       if self.egress else ""))

    def resolve_backends(self, force: bool = False) -> None:
        name = self.s.dest_dns_name
        if not name or (not force and time.monotonic() < self.next_dns):
            return
        try:
            found = lookup(name)
        except (ResolveError, OSError) as exc:
            delay = min(2.0 ** self.dns_failures, DNS_REFRESH_SECONDS)
            self.dns_failures += 1
            log.info(f"[unexpected] error resolving DNS name {name}: {exc}")
            log.info(f"reconfigureTimer: last DNS resolution attempt failed, next DNS resolution attempt in {delay:g}s")
            self.next_dns = time.monotonic() + delay
            return
        self.dns_failures = 0
        self.next_dns = time.monotonic() + DNS_REFRESH_SECONDS
        if found != self.backends:
            log.info(f"{name} resolves to {', '.join(map(str, found))}")
            self.backends = found

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.add(text)
            log.info(text)

    def reconcile(self) -> None:
        """Make the kernel's rules equal to the plan for the node as it is now."""
        if self.driver is None:
            return
        s = self.s
        egress = proxy.egress_targets(s, self.egress)
        inputs = proxy.Inputs(self.node.addrs, egress, self.backends)
        try:
            plan, notes = proxy.plan(s, inputs, self.detection.families)
        except proxy.ProxyError as exc:
            raise Exit(1, str(exc)) from exc
        for text in notes:
            self.note(text)
        if plan == self.applied:
            return
        if s.dest_ip or s.dest_dns_name:
            log.info("Installing proxy rules")
        for target in egress:
            log.info(f"Installing forwarding rules for destination {target}")
        try:
            self.driver.apply(plan)
        except FirewallError as exc:
            raise Exit(1, f"installing proxy rules: {exc}") from exc
        self.applied = plan
        self.next_drift = time.monotonic() + DRIFT_CHECK_SECONDS
        log.info(f"firewall: {len(plan.rules)} rules live in {self.detection.backend} for "
                 f"{', '.join(map(str, self.node.addrs)) or 'no addresses'}",
                 ms_after_netmap=round((time.monotonic() - self.netmap_at) * 1000, 2))

    def on_netmap(self, self_changed: bool = False) -> None:
        self.resolve_egress()
        self.resolve_backends(force=self.applied is None)
        if self.node.addrs:
            self.reconcile()
        self.health.set(bool(self.node.addrs))
        if self.serve:
            if self_changed:  # cert domains ride with DNS config, which a SelfChange may have changed
                self.refresh_cert_domains()
            self.poll_serve()
        if not self.started:
            self.started = True
            log.info("Startup complete, waiting for shutdown signal")

    def poll_serve(self) -> None:
        assert self.serve is not None
        try:
            self.serve.poll(self.node.cert_domain)
        except LocalAPIError as exc:
            raise Exit(1, f"serve proxy: failed to apply serve config: {exc}") from exc

    def tick(self) -> None:
        if not self.started:
            return
        if self.serve:
            self.poll_serve()
        if self.s.dest_dns_name and time.monotonic() >= self.next_dns:
            before = self.backends
            self.resolve_backends()
            if self.backends != before:
                self.reconcile()
        if self.applied is not None and time.monotonic() >= self.next_drift:
            self.next_drift = time.monotonic() + DRIFT_CHECK_SECONDS
            self.check_drift()

    def check_drift(self) -> None:
        """Put back rules that somebody removed (`nft flush ruleset`, `iptables -t nat -F`, a firewall reload)."""
        assert self.applied is not None
        try:
            found = self.driver.installed()
        except FirewallError as exc:
            log.warning(f"firewall: cannot read back the rules: {exc}")
            return
        if found == self.applied:
            return
        missing, extra = self.applied.rules - found.rules, found.rules - self.applied.rules
        log.warning(f"firewall: rules changed outside containerboot ({len(missing)} missing, {len(extra)} "
                    "unexpected); restoring them")
        try:
            self.driver.apply(self.applied, full=True)
        except FirewallError as exc:
            log.error(f"firewall: restoring the rules failed: {exc}; retrying")

    # ---- shutdown ---------------------------------------------------------------------------------

    def unadvertise(self) -> None:
        try:
            prefs = self.api.json("GET", "/localapi/v0/prefs") or {}
        except (LocalAPIError, ValueError) as exc:
            log.info(f"Error ensuring services are not advertised: {exc}")
            return
        services = prefs.get("AdvertiseServices") if isinstance(prefs, dict) else None
        if not services:
            return
        log.info(f"unadvertising services: {services}")
        try:
            self.api.json("PATCH", "/localapi/v0/prefs", {"AdvertiseServicesSet": True, "AdvertiseServices": None})
        except LocalAPIError as exc:
            log.info(f"Error ensuring services are not advertised: {exc}")

    def shutdown(self, clean: bool) -> None:
        self.close_watch()
        if self.child is not None and self.child.proc.poll() is None:
            if clean:
                self.unadvertise()
            log.info("Sending SIGTERM to tailscaled")
            self.child.terminate(SHUTDOWN_TIMEOUT)
        if clean and self.driver is not None and self.applied is not None:
            try:
                self.driver.flush()
            except FirewallError as exc:
                log.warning(f"firewall: removing our rules failed: {exc}")
        for server in self.servers:
            server.shutdown()
            server.server_close()
            log.info(f"HTTP server at {server.server_address[0]}:{server.server_address[1]} closed")

    def run(self) -> int:
        for text in self.s.notes:
            log.info(text)
        code = 0
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.on_signal)
            self.prepare_host()
            self.env = self.prepare_firewall()
            log.info(self.summary())
            self.start()
            self.run_loop()
        except Exit as exc:
            code = exc.code
            if str(exc):
                (log.error if code else log.info)(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must still stop tailscaled and say what happened
            code = 1
            log.error(f"unexpected error: {type(exc).__name__}: {exc}")
        self.shutdown(clean=code == 0)
        return code


def main(s: Settings) -> int:
    return Boot(s).run()
