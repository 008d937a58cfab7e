"""The boot: start tailscaled, log the node in, then follow the IPN bus and keep the rules in step.

Everything arrives as an event in one inbox (IPN notifications from the bus reader, tailscaled's exit
from the thread that waits for it, signals, config watches) or as a one-second tick, and the main thread
handles them one at a time, in three phases:

1. start: tailscaled, its socket, the health endpoints, login (`tailscale up`, or nothing where a config
   file logs in), then wait until the backend is Running; a config file whose key was refused asks the
   operator for a new one and restarts;
2. follow (`run`): each netmap is folded into the Node and reconciled (below); the tick retries what
   waits (a busy netfilter lock, a status write), re-resolves the DNS backends and checks for drift;
3. shutdown: stop advertising, let tailscaled finish its state, SIGTERM it, remove our rules, close the
   endpoints. Where tailscaled's own netfilter chains were removed under it, the same steps stop it
   without removing our rules, and a new Boot begins (tailscaled_rules.py says why).

The ordering rules live in `on_netmap`: the device ID goes to the Secret before any rule, so that the
operator can delete the device of a proxy whose rules keep failing; name and addresses only once the
rules are live, because the operator publishes them as the Service's endpoint and trusts them to mean
"traffic can flow". The collaborators (bus.py, keeper.py, targets.py, kube/state.py,
proxygroup/services.py) each own one concern; this module decides when each is asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from containerboot import health, log, proxy, rules, system
from containerboot.events import (
    BusError,
    Cancel,
    Clock,
    ConfigChanged,
    Event,
    Exit,
    Notify,
    RestartTailscaled,
    ServicesChanged,
    Signal,
    TailscaledExit,
    stop_now,
)
from containerboot.httpserver import Server
from containerboot.kube import configdir
from containerboot.kube import state as kube_state
from containerboot.kube.podevents import REASON_AUTH_KEY_REISSUE, Recorder
from containerboot.kube.secret import StateStore
from containerboot.metrics import Metrics
from containerboot.proxygroup.services import ProxyGroupServices
from containerboot.settings import Settings
from containerboot.tailscale import ipn, serve, tailscaled, vipservices
from containerboot.tailscale.localapi import LocalAPIError, TailscaledAPI
from containerboot.tailscale.tailscaled import Child, Launch, RunCLI

from .bus import BusSession
from .keeper import RuleKeeper
from .prepare import Firewall
from .tailscaled_rules import TailscaledRules
from .targets import Targets

SHUTDOWN_TIMEOUT = 25.0
REISSUE_WAIT = 600.0  # how long a proxy whose key was refused waits for the operator's new one
REISSUE_POLL = 5.0


@dataclass
class Lasting:
    """What outlives one tailscaled (a restart of it in-process keeps these): the figures, our rules'
    keeper (the rules stay, so does what it knows of them), and the watch over tailscaled's chains."""

    metrics: Metrics
    keeper: RuleKeeper | None
    tailscaled_rules: TailscaledRules | None


class Boot:
    def __init__(self, s: Settings, api: TailscaledAPI, fw: Firewall, store: StateStore | None, events: Recorder,
                 cancel: Cancel, clock: Clock, deadline: float, launch: Launch = tailscaled.Tailscaled,
                 cli: RunCLI = tailscaled.run_cli, lasting: Lasting | None = None) -> None:
        self.s = s
        self.events = events
        self.api = api
        self.fw = fw
        self.cancel = cancel
        self.clock = clock
        self.inbox = cancel.inbox
        self.launch = launch
        self.cli = cli
        self.deadline = deadline  # the boot's: the set-up, tailscaled's start and the login share it
        self.health = health.Health(s)
        d = fw.detection
        if lasting is None:  # the first boot
            metrics = Metrics(firewall=(d.backend, d.variant, "; ".join(d.evidence)) if d else None, clock=clock.now)
            keeper = RuleKeeper(fw.driver, cancel, clock, metrics, events) if fw.driver else None
            watch = TailscaledRules(fw.chains, s, clock, api, metrics, events) if fw.chains else None
            lasting = Lasting(metrics, keeper, watch)
        self.lasting = lasting
        self.metrics, self.keeper = lasting.metrics, lasting.keeper
        self.node = ipn.Node()
        self.child: Child | None = None
        self.servers: list[Server] = []
        self.started = False
        self.up_ran = False  # login() ran `tailscale up` in this boot: after_login names what only a login applies
        self.notes: set[str] = set()
        self.state = kube_state.StateKeeper(s, store, cancel, clock)
        self.bus = BusSession(api, self.inbox, cancel, clock, s.boot_timeout)
        self.targets = Targets(s, cancel, clock, self.note)
        self.services = ProxyGroupServices(s, self.state, self.inbox, cancel, clock, self.metrics, events)
        self.vip = vipservices.Services(s, api)  # Tailscale Services: cert share loops, advertisement
        self.serve = serve.ServeWatcher(s.serve_config, api, on_change=self.vip.on_serve_config) \
            if s.serve_config else None
        self.config = configdir.Follower(s.config_file, api, self.inbox) if s.config_file else None
        self.config_authkey = configdir.authkey(s.config_file) if s.config_file else ""
        cancel.on_repeat = self.vip.interrupt  # a second signal: stop waiting for the Services' failover

    # ---- phase 1: start ------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def start(self) -> None:
        s = self.s
        log.info("Starting tailscaled")
        if tailscaled.remove_stale_socket(s.socket):
            log.info(f"removed the stale tailscaled socket {s.socket} (nothing listened on it)")
        self.child = self.launch(tailscaled.tailscaled_argv(s), self.fw.env,
                                 lambda code: self.inbox.put(TailscaledExit(code)))
        log.info(f"Waiting for tailscaled socket at {s.socket}")
        problem = tailscaled.wait_for_socket(s.socket, self.deadline, self.alive, stop=self.cancel.requested)
        if self.cancel.requested():
            stop_now(self.cancel.signum)
        if problem:
            if not self.child.alive():
                self.dispatch(TailscaledExit(self.child.returncode or 0))
            raise Exit(1, problem)
        try:
            self.servers = health.start(s, self.health, self.api,
                                        self.services.drain.answer if self.services.drain else None, self.metrics)
        except OSError as exc:
            raise Exit(1, f"failed to listen on the health/metrics address: {exc}") from exc
        if s.enable_forwarding_optimizations:
            try:
                self.api.json("POST", "/localapi/v0/set-udp-gro-forwarding")
            except LocalAPIError as exc:
                log.info(f"[unexpected] error enabling UDP GRO forwarding: {exc}")
        self.bus.open(ipn.watch_mask(self.follows_peers(), first=True), self.deadline, self.alive)
        warning = system.link_socket(s)
        if warning:
            log.warning(warning)
        if not s.config_file and not s.auth_once:
            self.bus.close()
            self.login()
            self.bus.open(ipn.watch_mask(self.follows_peers()), self.deadline, self.alive)
        self.await_running()
        self.bus.close()
        self.after_login()

    def follows_peers(self) -> bool:
        """Whether rules depend on peers (upstream's condition for watching peer changes)."""
        return bool(self.s.tailnet_target_fqdn or self.s.egress_proxies_config_path)

    def login(self) -> None:
        log.info("Running 'tailscale up'")
        problem = self.cli(tailscaled.up_argv(self.s), max(0.1, self.deadline - self.clock.now()),
                           self.cancel.requested)
        if self.cancel.requested():
            stop_now(self.cancel.signum)
        if problem:
            raise Exit(1, f"failed to auth tailscale: tailscale up failed: {problem}")
        self.up_ran = True

    def await_running(self) -> None:
        logged_in = False
        while True:
            if self.clock.now() >= self.deadline:
                raise self.bus.deadline_exit()
            ev = self.bus.next_event(self.deadline)
            if ev is None:
                continue
            if not isinstance(ev, Notify):
                self.dispatch(ev)
                continue
            note = ev.note
            if note.state:
                self.metrics.backend_state = note.state
            if note.netmap:
                self.metrics.netmap_at = ev.at
                self.node = ipn.update(self.node, note.body)
            if note.state == "Running":
                return
            if note.state == "NeedsLogin":
                if self.s.config_file:
                    if self.state.writable is not None:
                        self.reissue("Auth key missing or invalid (NeedsLogin state), disconnecting from control and "
                                     "requesting new key from operator")
                    raise Exit(1, "invalid state: tailscaled daemon started with a config file, but tailscale is "
                                  "not logged in: ensure you pass a valid auth key in the config file")
                if self.s.auth_once and not logged_in:
                    logged_in = True
                    self.login()
                    continue
            if note.state == "NeedsMachineAuth":
                log.info("machine authorization required, please visit the admin panel")
            elif note.state:
                log.info(f'tailscaled in state "{note.state}", waiting')
            if note.login_warning and self.s.config_file and self.state.writable is not None:
                # The config's key was refused (single-use and used, expired) and the node state is gone.
                self.reissue("Auth key failed to authenticate (may be expired or single-use), disconnecting from "
                             "control and requesting new key from operator")

    def reissue(self, reason: str) -> None:
        """The config file's key was refused: ask the operator for a new one and wait for it (10 min);
        a new key ends the program with 0, so that the restarted container uses it."""
        assert self.config is not None
        log.info(reason)
        try:
            self.api.json("POST", "/localapi/v0/disconnect-control")
        except LocalAPIError as exc:
            raise Exit(1, f"failed to get a reissued authkey: error disconnecting from control: error disconnecting "
                          f"control: {exc}") from exc
        self.state.request_reissue(self.config_authkey)
        self.metrics.reissues += 1
        self.events.emit(REASON_AUTH_KEY_REISSUE, f"{reason}; waiting up to 10m0s for it", warning=True)
        self.config.start()
        watch = self.config.watch
        if watch is not None and watch.mode == "inotify":
            log.info("auth key reissue: watching for config changes via fsnotify")
        elif watch is not None:
            log.info(f"auth key reissue: fsnotify unavailable, using polling: {watch.problem}")
        log.info("Waiting for operator to provide new auth key (max wait: 10m0s)")
        start = self.clock.now()
        deadline = start + REISSUE_WAIT
        next_poll = start + REISSUE_POLL
        while True:
            if self.clock.now() >= deadline:
                raise Exit(1, "failed to get a reissued authkey: failed to receive new auth key: timeout waiting for "
                              "auth key reissue after 10m0s")
            ev = self.bus.next_event(min(deadline, next_poll))
            if ev is not None and not isinstance(ev, ConfigChanged | Notify | BusError):
                self.dispatch(ev)
            if not isinstance(ev, ConfigChanged):
                if self.clock.now() < next_poll:
                    continue
                next_poll = self.clock.now() + REISSUE_POLL
            key = configdir.authkey(self.s.config_file)
            if key and key != self.config_authkey:
                waited = log.go_duration(round(self.clock.now() - start))
                log.info(f"New auth key received from operator after {waited}")
                self.state.clear_reissue()
                raise Exit(0, "Successfully received new auth key, restarting to apply configuration")
            if watch is None or watch.mode != "inotify":
                log.info(f"Waiting for new auth key from operator ({log.go_duration(round(self.clock.now() - start))} "
                         "elapsed)")

    def after_login(self) -> None:
        s = self.s
        # TS_AUTH_ONCE: upstream's `set`, with TS_EXTRA_ARGS; otherwise only for flags `tailscale up` refuses.
        then = tailscaled.after_login_set(s, lambda: tailscaled.read_prefs(self.api), self.up_ran)
        if then.argv is not None:
            for line in then.lines:
                (log.warning if line.startswith("[warning]") else log.info)(line)
            problem = self.cli(then.argv, 60, self.cancel.requested)
            if problem:
                raise Exit(1, f"failed to auth tailscale: tailscale set failed: {problem}")
        if s.serve_config:
            log.info("serve proxy: unsetting previous config")
            try:
                self.api.json("POST", "/localapi/v0/serve-config", {})
            except LocalAPIError as exc:
                raise Exit(1, f"failed to unset serve config: {exc}") from exc
        if s.auth_once and not s.config_file:
            self.state.delete_authkey()
        self.bus.open(ipn.watch_mask(self.follows_peers()), self.deadline, self.alive)
        if self.config is not None:
            self.config.start()
        self.vip.start()
        self.state.steady()

    # ---- phase 2: follow -----------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            ev = self.bus.next_event()
            if ev is None:
                self.tick()
            elif not isinstance(ev, Notify):
                self.dispatch(ev)
            else:
                self.on_notify(ev)

    def on_notify(self, ev: Notify) -> None:
        note = ev.note
        if note.state:
            self.metrics.backend_state = note.state
        if note.state and note.state != "Running":
            raise Exit(1, f'tailscaled left running state (now in state "{note.state}"), exiting')
        if note.netmap:
            self.metrics.netmap_at = ev.at
            self.node = ipn.update(self.node, note.body)
            if self.node.self_known:
                self.on_netmap(self_changed=note.self_change)
        elif note.err_message is not None:
            log.info(f"tailscaled IPN bus error: {note.err_message}")

    def dispatch(self, ev: Event) -> None:
        """Events other than notifications, the same way in every phase."""
        if isinstance(ev, Signal):
            stop_now(ev.signum)
        if isinstance(ev, TailscaledExit):
            code = ev.code
            raise Exit(code if 0 < code < 256 else 128 - code if code < 0 else 1,
                       f"tailscaled exited unexpectedly ({tailscaled.exit_status(code)}); exiting so that the "
                       "container is restarted")
        if isinstance(ev, BusError):
            if self.alive():
                self.clock.sleep(0.2)  # tailscaled dying closes the stream first: report its exit instead
            if self.child is not None and not self.child.alive():
                self.dispatch(TailscaledExit(self.child.returncode or 0))
            self.bus.dropped(ev.message)
        if isinstance(ev, ConfigChanged) and self.started and self.config is not None:
            self.config.on_changed()
        if isinstance(ev, ServicesChanged) and self.services.reload() and self.node.addrs:
            self.reconcile()

    def on_netmap(self, self_changed: bool = False) -> None:
        self.state.store_device_id(self.node)  # before any rule (see the module's docstring)
        self.targets.resolve_egress(self.node)
        if self_changed and (self.serve is not None or self.services.wants_dns_config()):
            self.refresh_dns_config()
        # Like upstream: an egress name that does not resolve yet means no rules and no device_fqdn for
        # now (the next netmap tries again), but the startup check below still runs.
        if not self.targets.egress_waiting:
            self.targets.resolve_backends(force=self.keeper is None or self.keeper.applied is None)
            if self.node.addrs:
                self.reconcile()
            if not self.pending:  # name and addresses say "traffic can flow": only once the rules are in
                self.state.store_endpoints(self.node)
            self.health.set(bool(self.node.addrs) and not self.pending)
            if self.serve:
                self.poll_serve()
        self.vip.on_netmap(self_changed)
        self.maybe_started()

    @property
    def pending(self) -> bool:
        return self.keeper is not None and self.keeper.pending

    def maybe_started(self) -> None:
        if self.pending:
            return  # upstream would still be inside the rule install
        if not self.started and (not self.s.is_l3_proxy or self.state.published):
            self.started = True
            log.info("Startup complete, waiting for shutdown signal")
            if self.services.start() and self.node.addrs:
                self.reconcile()

    def refresh_dns_config(self) -> None:
        """After a SelfChange: the DNS config's cert domains and extra records (upstream asks the same)."""
        try:
            cfg = self.api.json("GET", "/localapi/v0/dns-config", timeout=5)
        except (LocalAPIError, ValueError) as exc:
            log.info(f"error refreshing DNS config from tailscaled: {exc}")
            return
        self.node = ipn.with_dns_config(self.node, cfg)

    def poll_serve(self) -> None:
        assert self.serve is not None
        try:
            updated = self.serve.poll(self.node.cert_domain)
        except LocalAPIError as exc:
            raise Exit(1, f"serve proxy: failed to apply serve config: {exc}") from exc
        if updated:
            self.state.store_https_endpoint(self.node.cert_domain)

    def tick(self) -> None:
        keeper = self.keeper
        if keeper is not None and keeper.retry_due():
            self.reconcile()
            if not keeper.pending:
                self.state.store_endpoints(self.node)
                self.health.set(bool(self.node.addrs))
                self.maybe_started()
        if not self.started:
            return
        if self.serve:
            self.poll_serve()
        if self.services.poll_due() and self.services.reload() and self.node.addrs:
            self.reconcile()
        if self.services.retry_due() and not self.pending:
            self.services.write_status()
        if self.targets.dns_due() and self.targets.resolve_backends():
            self.reconcile()
        if keeper is not None and keeper.check_due():
            keeper.check_drift()
        watch = self.lasting.tailscaled_rules
        if watch is not None and watch.check_due():
            watch.check()  # raises RestartTailscaled when they are gone

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.add(text)
            log.info(text)

    def reconcile(self) -> None:
        """Make the kernel's rules equal to the plan for the node as it is now, then write the services'
        status (the operator trusts it to mean "rules are live")."""
        keeper, detection = self.keeper, self.fw.detection
        if keeper is None or detection is None:
            return
        s = self.s
        egress_targets = proxy.egress_targets(s, self.targets.egress)
        resolved, ingress_cfg, notes = self.services.inputs(self.node, detection.families)
        inputs = rules.Inputs(proxy.Inputs(self.node.addrs, egress_targets, self.targets.backends), resolved,
                              ingress_cfg)
        try:
            plan, more = rules.plan(s, inputs, detection.families)
        except rules.ProxyError as exc:
            raise Exit(1, str(exc)) from exc
        for text in notes + more:
            self.note(text)
        if plan != keeper.applied:
            if s.dest_ip or s.dest_dns_name:
                log.info("Installing proxy rules")
            for target in egress_targets:
                log.info(f"Installing forwarding rules for destination {target}")
            if s.allow_cluster_traffic_via_ingress and s.serve_config and s.pod_ip:
                log.info(f"installing rules to forward traffic for {s.pod_ip} to node's tailnet IP")
            if not keeper.apply(plan):
                return
            log.info(f"firewall: {len(plan.rules)} rules live in {detection.backend} for "
                     f"{', '.join(map(str, self.node.addrs)) or 'no addresses'}",
                     ms_after_netmap=round((self.clock.now() - (self.metrics.netmap_at or 0.0)) * 1000, 2))
        self.services.applied(resolved)

    # ---- phase 3: shutdown ---------------------------------------------------------------------------

    def shutdown(self, clean: bool, restart: bool = False) -> bool:
        """Stop everything; with `restart`, keep our rules and the Events: True when a new Boot is to begin."""
        self.cancel.shutdown()
        self.services.close()  # first of all: a pre-stop drain in progress answers now
        self.bus.close()
        if self.config is not None:
            self.config.close()
        self.vip.stop()  # before the unadvertise below: no advertisement may land after it
        if self.child is not None and self.child.alive():
            deadline = self.clock.now() + SHUTDOWN_TIMEOUT
            failover = 0.0
            if clean and self.bus.heard:  # a tailscaled that never answered has nothing advertised
                failover = self.vip.unadvertise(deadline)
            # Stopping tailscaled between its login and its last state write would leave a Secret
            # it cannot recover from; upstream waits for all-or-nothing state, and so do we (during
            # the failover wait: both must be over before tailscaled stops).
            self.state.wait_consistent(deadline)
            self.vip.wait_failover(failover)
            log.info("Sending SIGTERM to tailscaled")
            self.child.terminate(max(1.0, deadline - self.clock.now()))
        restart = restart and not self.cancel.requested()  # a signal meanwhile: this is the shutdown
        if clean and self.keeper is not None and not restart:
            self.keeper.flush()
        for server in self.servers:
            server.shutdown()
            server.server_close()
            log.info(f"HTTP server at {server.addr_port} closed")
        if restart:
            self.cancel.resume()
            return True
        self.events.close(1.0)  # what is still queued gets a second
        return False

    def again(self) -> Boot:
        """The next boot after a restart: the same collaborators, a new tailscaled, a new deadline."""
        return Boot(self.s, self.api, self.fw, self.state.store, self.events, self.cancel, self.clock,
                    self.clock.now() + self.s.boot_timeout, self.launch, self.cli, self.lasting)

    def boot(self) -> int | None:
        """Start, follow until told to stop, shut down: the exit code (None: boot again, see `again`)."""
        code, restart = 0, False
        try:
            self.start()
            self.run()
        except RestartTailscaled:
            restart = True
        except Exit as exc:
            code = ended(exc)
        except Exception as exc:  # noqa: BLE001 - a bug must still stop tailscaled and say what happened
            code = unexpected(exc)
        return None if self.shutdown(clean=code == 0, restart=restart) else code


def ended(exc: Exit) -> int:
    if str(exc):
        (log.error if exc.code else log.info)(str(exc))
    return exc.code


def unexpected(exc: Exception) -> int:
    log.error(f"unexpected error: {type(exc).__name__}: {exc}")
    return 1
