"""The boot program: start tailscaled, log the node in, follow the IPN bus, keep the rules in step.

Everything arrives as an event on one queue (IPN notifications from a reader thread, tailscaled's
exit from the thread that waits for it, signals, a one-second tick), and the main thread handles
events one at a time. Decisions about rules are the pure `rules.plan` (proxy settings, egress and
ingress services in one Plan); this module applies them and writes the services' status.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from containerboot import health, log, proxy, rules, startup, system
from containerboot.dns import ResolveError, lookup_bounded
from containerboot.events import BusError, ConfigChanged, Event, Notify, ServicesChanged, Signal, TailscaledExit
from containerboot.kube import client as kube
from containerboot.kube import configdir, secret
from containerboot.proxygroup import egress, ingress
from containerboot.settings import Settings
from containerboot.tailscale import ipn, localapi, serve, tailscaled, vipservices
from containerboot.tailscale.localapi import BusWatch, LocalAPI, LocalAPIError
from firewall.model import Driver, FirewallBusy, FirewallError, IPAddress, Plan

if TYPE_CHECKING:
    from firewall.detect import Detection  # imported when detection runs (kernel mode only)

DRIFT_CHECK_SECONDS = 2.0
DNS_REFRESH_SECONDS = 600.0
SHUTDOWN_TIMEOUT = 25.0
REISSUE_WAIT = 600.0  # how long a proxy whose key was refused waits for the operator's new one
REISSUE_POLL = 5.0
BUS_MAX_BACKOFF = 30.0
T = TypeVar("T", bound=Sized)  # a parsed service config (a tuple of services)
REFUSED_RETRY = 0.05  # a first watch refused (tailscaled not listening yet) is tried again this often
BUS_MAX_DIAL_FAILURE = 60.0  # a watch that cannot be reopened for this long means tailscaled is gone
LOGIN_STATE_WARNING = "login-state"  # health.LoginStateWarnable's code
STATUS_RETRY_SECONDS = 5.0
SERVICES_POLL_SECONDS = 10.0  # the service configs are also re-read this often (a write that is no kubelet swap)


class Exit(Exception):
    """End the program with `code`, logging `message` (if any) first."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code


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
        self.api = LocalAPI(s.socket, guard=self.interruptible)
        self.health = health.Health(s)
        self.node = ipn.Node()
        self.driver: Driver | None = None
        self.detection: Detection | None = None
        self.child: tailscaled.Tailscaled | None = None
        self.watch: BusWatch | None = None
        self.watch_id = 0
        self.servers: list[health.Server] = []
        self.ts_services = vipservices.Services(s, self.api)  # Tailscale Services: cert share loops, advertisement
        self.serve = serve.ServeWatcher(s.serve_config, self.api, on_change=self.ts_services.on_serve_config) \
            if s.serve_config else None
        self.applied: Plan | None = None
        self.pending = False  # a plan that could not be applied yet (lock busy): retried on the tick
        self.notes: set[str] = set()
        self.egress: tuple[IPAddress, ...] = ()
        self.backends: tuple[IPAddress, ...] = ()
        self.next_dns = 0.0
        self.dns_failures = 0
        self.next_drift = 0.0
        self.env: dict[str, str] = {}
        self.netmap_at = 0.0
        self.stop_requested = 0  # the signal that asked us to stop, seen by blocking CLI calls
        self.blocking = False  # inside interruptible(): a signal raises Exit(0) right there
        self.shutting_down = False
        self.heard_from_tailscaled = False  # any notification arrived
        self.boot_deadline = time.monotonic() + s.boot_timeout  # set again when the boot starts
        self.started = False
        # Kubernetes state Secret: usable only in Kubernetes with patch rights (upstream's hasKubeStateStore).
        self.kube: secret.SecretStore | None = None
        self.stored_id: str | None = None
        self.stored_endpoints: tuple[str, tuple[IPAddress, ...]] | None = None
        self.config_authkey = configdir.authkey(s.config_file) if s.config_file else ""
        self.config_watch: configdir.DirWatch | None = None
        self.config_bytes: bytes | None = None
        # IPN bus reconnection (upstream's reconnectingIPNBusWatcher).
        self.watch_mask = ipn.watch_mask(self.follows_peers())
        self.watch_opened = 0.0
        self.reconnect_at: float | None = None
        self.bus_backoff = 0.0
        self.dial_failing_since: float | None = None
        # ProxyGroup services: the configs in force (the last good ones), the bytes they were read from,
        # what the netmap says beyond ipn.Node, and the status last written to the Secret.
        self.services_on = False
        self.service_watches: list[configdir.DirWatch] = []
        self.egress_cfg: egress.Configs | None = None
        self.ingress_cfg: ingress.Configs | None = None
        self.service_files: dict[str, bytes | str | None] = {}  # by path: the bytes last read, or the error
        self.egress_resolved: list[egress.Resolved] | None = None
        self.egress_written: dict[str, Any] | None = None
        self.ingress_written: dict[str, Any] | None = None
        self.status_retry = False
        self.status_inputs: object = None
        self.next_status_retry = 0.0
        self.next_services_poll = 0.0
        self.pod = egress.pod_ips(s.pod_ips)
        self.drain_stop = threading.Event()
        self.drain: egress.Drain | None = None
        if s.egress_proxies_config_path:
            sleep = float(os.environ.get("TS_TEST_ONLY_EGRESS_SLEEP") or 1.0)  # upstream's testSleepDuration
            self.drain = egress.Drain(s.egress_proxies_config_path, self.pod, self.drain_stop, short=sleep,
                                      long=sleep * 10, log=log.info)

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
        from firewall.detect import DetectionError, make_driver

        env = tailscaled.child_env(os.environ)  # no secret variable reaches tailscaled
        s = self.s
        if s.cert_share:
            env["TS_CERT_SHARE_MODE"] = vipservices.cert_share_mode(s)
        if s.userspace:
            return env
        try:
            self.detection = startup.detect_firewall(s)
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

    # ---- Kubernetes state Secret --------------------------------------------------------------------

    @property
    def kube_store(self) -> secret.SecretStore | None:
        """The state Secret when containerboot may write to it: in Kubernetes with patch rights."""
        k = self.kube
        return k if k is not None and k.can_patch and self.s.in_kubernetes else None

    def setup_kube(self) -> None:
        """Upstream's newKubeClient + setupKube + resetContainerbootState, with its messages."""
        s = self.s
        if not s.kube_secret:
            return
        try:
            host, port = kube.server_address(s, os.environ)
            client = kube.Client(s.root_path(kube.SA_DIR), host, port, stop=lambda: bool(self.stop_requested))
        except kube.KubeError as exc:
            raise Exit(1, f"error initializing kube client: {exc}") from exc
        client.deadline = self.boot_deadline
        store = secret.SecretStore(client, s.kube_secret)
        try:
            with self.interruptible():
                store.check_permissions(log.info)
                existing = store.get()
            if existing is None and not store.can_create:
                raise kube.KubeError(
                    f"tailscale state Secret {s.kube_secret} does not exist and we don't have permissions to create "
                    "it. If you intend to store tailscale state elsewhere than a Kubernetes Secret, you can explicitly "
                    "set TS_KUBE_SECRET env var to an empty string. Else ensure that RBAC is set up that allows the "
                    "service account associated with this installation to create Secrets.")
        except kube.KubeError as exc:
            if self.stop_requested:
                self.common(Signal(self.stop_requested))
            text = str(exc)
            if exc.code and not text.startswith("getting Tailscale state Secret"):
                text = f"getting Tailscale state Secret {s.kube_secret}: {text}"
            raise Exit(1, f"error setting up for running on Kubernetes: {text}") from exc
        self.kube = store
        if not store.can_patch:
            log.info(f"no patch permission on Secret {json.dumps(s.kube_secret)}: containerboot writes nothing to it "
                     "(tailscaled still keeps its state there)")
        if not (s.authkey or s.client_id or s.client_secret or s.config_file):
            self.authkey_from_secret(existing)
        if self.kube_store is not None and existing is not None:
            try:
                with self.interruptible():
                    store.patch(secret.reset_patch(existing, s.pod_uid, self.config_authkey))
            except kube.KubeError as exc:
                raise Exit(1, f"error clearing previous state from Secret: failed to read state Secret "
                              f"{json.dumps(s.kube_secret)} to reset state: {exc}") from exc

    def start_kube_setup(self) -> tuple[threading.Thread, list[BaseException]] | None:
        if not self.s.kube_secret:
            return None
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.setup_kube()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                failure.append(exc)

        thread = threading.Thread(target=work, name="kube-setup", daemon=True)
        thread.start()
        return thread, failure

    def finish_kube_setup(self, started: tuple[threading.Thread, list[BaseException]] | None) -> None:
        if started is None:
            return
        thread, failure = started
        with self.interruptible():  # the calls are bounded by the boot deadline; a signal ends the wait
            thread.join()
        if failure:
            raise failure[0]

    def authkey_from_secret(self, existing: dict[str, bytes] | None) -> None:
        assert self.kube is not None
        if existing is None:
            log.info("TS_AUTHKEY not provided and state Secret does not exist, login will be interactive if needed.")
            return
        raw = existing.get(secret.KEY_AUTHKEY, b"")
        if raw:
            if not self.kube.can_patch:
                raise Exit(1, "error setting up for running on Kubernetes: authkey found in TS_KUBE_SECRET, but the "
                              "pod doesn't have patch permissions on the Secret to manage the authkey.")
            key = raw.decode("utf-8", errors="replace").strip()
            if not key or any(c.isspace() or not c.isprintable() for c in key):
                raise Exit(1, f"error setting up for running on Kubernetes: the authkey in Secret "
                              f"{json.dumps(self.s.kube_secret)} is not one printable token ({len(raw)} bytes); "
                              "expected an auth key such as tskey-auth-...")
            self.s = replace(self.s, authkey=key)
        # Upstream logs this line whether or not a key was found; searches for it keep working.
        log.info("No authkey found in state Secret and TS_AUTHKEY not provided, login will be interactive if needed.")

    def store_device_id(self) -> None:
        store = self.kube_store
        if store is None or self.node.stable_id == self.stored_id:
            return
        try:
            with self.interruptible():
                store.patch({secret.KEY_DEVICE_ID: self.node.stable_id.encode()})
        except kube.KubeError as exc:
            raise Exit(1, f"storing device ID in Kubernetes Secret: {exc}") from exc
        self.stored_id = self.node.stable_id

    def store_device_endpoints(self) -> None:
        store = self.kube_store
        endpoints = (self.node.name, self.node.addrs)
        if store is None or endpoints == self.stored_endpoints:
            return
        try:
            with self.interruptible():
                store.patch(secret.endpoints_patch(*endpoints))
        except kube.KubeError as exc:
            raise Exit(1, f"storing device IPs and FQDN in Kubernetes Secret: {exc}") from exc
        self.stored_endpoints = endpoints

    def wait_consistent_state(self, deadline: float) -> None:
        """Before SIGTERM: let tailscaled finish writing its login state (all keys or none), bounded."""
        store = self.kube_store
        if store is None:
            return
        log.info("Checking for consistent state")
        logged, delay = False, 0.1
        while time.monotonic() < deadline:
            try:
                data = store.get(deadline)
            except kube.KubeError as exc:
                log.info(f'Error waiting for consistent state on shutdown: getting Secret "{self.s.kube_secret}": '
                         f"{exc}")
                return
            if data is None or secret.consistent(data):
                return
            if not logged:
                log.info(f'Waiting for tailscaled to finish writing state to Secret "{self.s.kube_secret}"')
                logged = True
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
        log.info("Error waiting for consistent state on shutdown: context deadline exceeded")

    # ---- auth key reissue (one-step config, Kubernetes state) ---------------------------------------

    def reissue(self, reason: str) -> None:
        """The config file's key was refused: ask the operator for a new one and wait for it (10 min)."""
        store = self.kube_store
        assert store is not None
        store.client.deadline = None  # the wait for a new key has its own 10 minutes, not the boot deadline
        log.info(reason)
        try:
            self.api.json("POST", "/localapi/v0/disconnect-control")
        except LocalAPIError as exc:
            raise Exit(1, f"failed to get a reissued authkey: error disconnecting from control: error disconnecting "
                          f"control: {exc}") from exc
        log.info("Requesting a new auth key from operator")
        try:
            with self.interruptible():
                store.patch({secret.KEY_REISSUE: self.config_authkey.encode()})
        except kube.KubeError as exc:
            raise Exit(1, "failed to get a reissued authkey: failed to set reissue_authkey in Kubernetes Secret: "
                          f"{exc}") from exc
        self.start_config_watch()
        watch = self.config_watch
        if watch is not None and watch.mode == "inotify":
            log.info("auth key reissue: watching for config changes via fsnotify")
        elif watch is not None:
            log.info(f"auth key reissue: fsnotify unavailable, using polling: {watch.problem}")
        log.info("Waiting for operator to provide new auth key (max wait: 10m0s)")
        start = time.monotonic()
        deadline = start + REISSUE_WAIT
        next_poll = start + REISSUE_POLL
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise Exit(1, "failed to get a reissued authkey: failed to receive new auth key: timeout waiting for "
                              "auth key reissue after 10m0s")
            ev = self.next_event(min(deadline, next_poll))
            if ev is not None and not isinstance(ev, ConfigChanged | Notify | BusError):
                self.common(ev)
            if not isinstance(ev, ConfigChanged):
                if time.monotonic() < next_poll:
                    continue
                next_poll = time.monotonic() + REISSUE_POLL
            key = configdir.authkey(self.s.config_file)
            if key and key != self.config_authkey:
                waited = log.go_duration(round(time.monotonic() - start))
                log.info(f"New auth key received from operator after {waited}")
                try:
                    with self.interruptible():
                        existing = store.get() or {}
                        store.patch(secret.clear_reissue_patch(existing))
                except kube.KubeError as exc:
                    log.info(f"Warning: failed to clear reissue request: error getting state secret: {exc}")
                raise Exit(0, "Successfully received new auth key, restarting to apply configuration")
            if watch is None or watch.mode != "inotify":
                log.info(f"Waiting for new auth key from operator ({log.go_duration(round(time.monotonic() - start))} "
                         "elapsed)")

    # ---- tailscaled config file (TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR) -------------------------------

    def start_config_watch(self) -> None:
        if self.config_watch is not None or not self.s.config_file:
            return
        self.config_bytes = configdir.read_bytes(self.s.config_file)
        self.config_watch = configdir.DirWatch(os.path.dirname(self.s.config_file),
                                               lambda: self.events.put(ConfigChanged()),
                                               use_inotify=not os.environ.get("TS_TEST_NO_INOTIFY"))
        if self.config_watch.mode != "inotify":
            log.info("tailscaled config watch: failed to create fsnotify watcher, timer-only mode: "
                     f"{self.config_watch.problem}")

    def on_config_changed(self) -> None:
        data = configdir.read_bytes(self.s.config_file)
        if data is None:
            raise Exit(1, f"error reading configfile: open {self.s.config_file}: no such file or directory")
        if data == self.config_bytes:
            return  # the mount holds other files too: reload only when ours changed
        self.config_bytes = data
        log.info("tailscaled config watch: ensuring that config is up to date")
        try:
            answer = self.api.json("POST", "/localapi/v0/reload-config")
        except LocalAPIError as exc:
            raise Exit(1, f"error reloading tailscaled config: {exc}") from exc
        if isinstance(answer, dict) and answer.get("Err"):
            raise Exit(1, f"error reloading tailscaled config: {answer['Err']}")
        if isinstance(answer, dict) and answer.get("Reloaded"):
            log.info("tailscaled config watch: config was reloaded")

    # ---- events ------------------------------------------------------------------------------------

    def on_signal(self, signum: int, _frame: Any) -> None:
        if self.shutting_down:
            self.ts_services.interrupt()  # a second signal: stop waiting for the Services' failover
        self.stop_requested = signum
        self.events.put(Signal(signum))
        if self.blocking:
            # The main thread is inside a network call that may block for seconds (an API server that
            # accepts and never answers): raising here aborts the system call, so SIGTERM is honoured now.
            self.blocking = False
            raise Exit(0, f"Received {signal.Signals(signum).name}, shutting down")

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A blocking call in the main thread that a shutdown signal may abort. While shutting down,
        calls run to their own timeouts: the signal has been handled already. In another thread (the
        Kubernetes setup runs beside detection) calls are bounded by their timeouts and deadline only."""
        if self.shutting_down or threading.current_thread() is not threading.main_thread():
            yield
            return
        if self.stop_requested:
            raise Exit(0, f"Received {signal.Signals(self.stop_requested).name}, shutting down")
        outer, self.blocking = self.blocking, True
        try:
            yield
        finally:
            self.blocking = outer

    def follows_peers(self) -> bool:
        """Whether rules depend on peers (upstream's condition for watching peer changes)."""
        return bool(self.s.tailnet_target_fqdn or self.s.egress_proxies_config_path)

    def on_tailscaled_exit(self, code: int) -> None:
        self.events.put(TailscaledExit(code))

    def open_watch(self, mask: int) -> None:
        self.close_watch()
        self.watch_mask = mask
        self.reconnect_at = None
        self.bus_backoff = 0.0
        while True:
            # Before Running, the boot deadline bounds the wait for tailscaled's answer too.
            timeout = localapi.WATCH_OPEN_TIMEOUT
            if not self.started:
                timeout = max(0.05, min(timeout, self.boot_deadline - time.monotonic()))
            try:
                watch = self.api.watch(mask, timeout)
                break
            except LocalAPIError as exc:
                # tailscaled's socket file can exist a moment before it listens (a restart's old file, or
                # bind before listen): refused or gone is retried until the boot deadline, every 50 ms.
                not_yet = isinstance(exc.__cause__, (ConnectionRefusedError, FileNotFoundError))
                if (not_yet and not self.started and not self.stop_requested
                        and time.monotonic() + REFUSED_RETRY < self.boot_deadline
                        and self.child is not None and self.child.proc.poll() is None):
                    time.sleep(REFUSED_RETRY)
                    continue
                if not self.started and time.monotonic() >= self.boot_deadline:
                    raise Exit(1, "reading tailscaled IPN bus: context deadline exceeded (TS_BOOT_TIMEOUT="
                                  f"{self.s.boot_timeout:g}s)") from exc
                raise Exit(1, f"failed to watch tailscaled for updates: {exc}") from exc
        self._attach(watch)

    def _attach(self, watch: BusWatch) -> None:
        self.watch_id += 1
        self.watch = watch
        self.watch_opened = time.monotonic()
        self.dial_failing_since = None
        threading.Thread(target=self._read, args=(watch, self.watch_id), name="ipn-bus", daemon=True).start()

    def on_bus_error(self, message: str) -> None:
        """A dropped stream is reopened with backoff, like upstream's reconnecting watcher: the new watch
        starts with a full status, so nothing is missed. tailscaled dying is reported as its exit."""
        if self.child and self.child.proc.poll() is None:
            time.sleep(0.2)  # tailscaled dying closes the stream first: report its exit instead
        if self.child and self.child.proc.poll() is not None:
            self.common(TailscaledExit(self.child.proc.returncode))
        self.close_watch()
        log.info(f"IPN bus watch ended; reconnecting: {message}")
        if time.monotonic() - self.watch_opened >= 30:
            self.bus_backoff = 0.0
        self.schedule_reconnect()

    def schedule_reconnect(self) -> None:
        self.bus_backoff = min(BUS_MAX_BACKOFF, max(0.1, self.bus_backoff * 2))
        self.reconnect_at = time.monotonic() + self.bus_backoff

    def maybe_reconnect(self) -> None:
        if self.reconnect_at is None or time.monotonic() < self.reconnect_at:
            return
        try:
            watch = self.api.watch(self.watch_mask)
        except LocalAPIError as exc:
            now = time.monotonic()
            if self.dial_failing_since is None:
                self.dial_failing_since = now
            elif now - self.dial_failing_since >= BUS_MAX_DIAL_FAILURE:
                raise Exit(1, f"reading tailscaled IPN bus: {exc}") from exc
            self.schedule_reconnect()
            return
        self.reconnect_at = None
        self._attach(watch)
        log.info("IPN bus watch reconnected")

    def _read(self, watch: BusWatch, wid: int) -> None:
        try:
            for notify in watch:
                self.heard_from_tailscaled = True
                self.events.put(Notify(notify, wid))
        except LocalAPIError as exc:
            self.events.put(BusError(str(exc), wid))

    def close_watch(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
            self.watch_id += 1  # anything still queued from it is stale

    def next_event(self, deadline: float | None = None) -> Event | None:
        """The next live event, or None on a tick (at most one second, or at the deadline)."""
        while True:
            self.maybe_reconnect()
            wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            if self.reconnect_at is not None:
                wait = min(wait, max(0.0, self.reconnect_at - time.monotonic()))
            try:
                ev = self.events.get(timeout=wait)
            except queue.Empty:
                return None
            if isinstance(ev, Notify | BusError) and ev.watch != self.watch_id:
                continue
            return ev

    def common(self, ev: Event) -> None:
        """Events that end the program the same way in every phase."""
        if isinstance(ev, Signal):
            log.info(f"Received {signal.Signals(ev.signum).name}, shutting down")
            raise Exit(0)
        if isinstance(ev, TailscaledExit):
            code = ev.code
            raise Exit(code if 0 < code < 256 else 128 - code if code < 0 else 1,
                       f"tailscaled exited unexpectedly ({tailscaled.exit_status(code)}); exiting so that the "
                       "container is restarted")
        if isinstance(ev, BusError):
            self.on_bus_error(ev.message)
        if isinstance(ev, ConfigChanged) and self.started:
            self.on_config_changed()
        if isinstance(ev, ServicesChanged) and self.services_on:
            self.on_services_changed()

    # ---- phases ------------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.s
        deadline = self.boot_deadline
        log.info("Starting tailscaled")
        if tailscaled.remove_stale_socket(s.socket):
            log.info(f"removed the stale tailscaled socket {s.socket} (nothing listened on it)")
        self.child = tailscaled.Tailscaled(tailscaled.tailscaled_argv(s), self.env, self.on_tailscaled_exit)
        log.info(f"Waiting for tailscaled socket at {s.socket}")
        problem = tailscaled.wait_for_socket(s.socket, deadline, lambda: self.child is not None
                                             and self.child.proc.poll() is None,
                                             stop=lambda: bool(self.stop_requested))
        if self.stop_requested:
            self.common(Signal(self.stop_requested))
        if problem:
            if self.child.proc.poll() is not None:
                self.common(TailscaledExit(self.child.proc.returncode))
            raise Exit(1, problem)
        try:
            self.servers = health.start(s, self.health, self.api, self.drain.answer if self.drain else None)
        except OSError as exc:
            raise Exit(1, f"failed to listen on the health/metrics address: {exc}") from exc
        if s.enable_forwarding_optimizations:
            try:
                self.api.json("POST", "/localapi/v0/set-udp-gro-forwarding")
            except LocalAPIError as exc:
                log.info(f"[unexpected] error enabling UDP GRO forwarding: {exc}")
        self.open_watch(ipn.watch_mask(self.follows_peers(), first=True))
        warning = system.link_socket(s)
        if warning:
            log.warning(warning)
        if not s.config_file and not s.auth_once:
            self.close_watch()
            self.login(deadline)
            self.open_watch(ipn.watch_mask(self.follows_peers()))
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
        store = self.kube_store
        if store is not None and s.auth_once and not s.config_file:
            # The key is no longer needed once the node is logged in; a reusable one should not linger.
            log.info("Deleting authkey from Kubernetes Secret")
            try:
                with self.interruptible():
                    store.delete_authkey()
            except kube.KubeError as exc:
                raise Exit(1, f"deleting authkey from Kubernetes Secret: {exc}") from exc
        self.open_watch(ipn.watch_mask(self.follows_peers()))
        self.start_config_watch()
        self.ts_services.start()
        if self.kube is not None:
            self.kube.client.deadline = None  # steady state: each call bounded by its own timeout only

    def login(self, deadline: float) -> None:
        log.info("Running 'tailscale up'")
        problem = tailscaled.run_cli(tailscaled.up_argv(self.s), timeout=max(0.1, deadline - time.monotonic()),
                                     stop=lambda: bool(self.stop_requested))
        if self.stop_requested:
            self.common(Signal(self.stop_requested))
        if problem:
            raise Exit(1, f"failed to auth tailscale: tailscale up failed: {problem}")

    def await_running(self, deadline: float) -> None:
        logged_in = False
        while True:
            if time.monotonic() >= deadline:
                raise Exit(1, "reading tailscaled IPN bus: context deadline exceeded (TS_BOOT_TIMEOUT="
                              f"{self.s.boot_timeout:g}s)")
            ev = self.next_event(deadline)
            if ev is None:
                continue
            if not isinstance(ev, Notify):
                self.common(ev)
                continue
            if ipn.is_netmap(ev.value):
                self.node = ipn.update(self.node, ev.value)
            state = ipn.state_of(ev.value)
            if state == "Running":
                return
            if state == "NeedsLogin":
                if self.s.config_file:
                    if self.kube_store is not None:
                        self.reissue("Auth key missing or invalid (NeedsLogin state), disconnecting from control and "
                                     "requesting new key from operator")
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
            warnings = (ev.value.get("Health") or {}).get("Warnings") if isinstance(ev.value.get("Health"), dict) \
                else None
            if (isinstance(warnings, dict) and LOGIN_STATE_WARNING in warnings and self.s.config_file
                    and self.kube_store is not None):
                # The config's key was refused (single-use and used, expired) and the node state is gone.
                self.reissue("Auth key failed to authenticate (may be expired or single-use), disconnecting from "
                             "control and requesting new key from operator")

    def run_loop(self) -> None:
        while True:
            ev = self.next_event()
            if ev is None:
                self.tick()
                continue
            if not isinstance(ev, Notify):
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
            elif isinstance(ev.value.get("ErrMessage"), str):
                log.info(f"tailscaled IPN bus error: {ev.value['ErrMessage']}")

    # ---- netmap processing ------------------------------------------------------------------------

    def wants_dns_config(self) -> bool:
        """Whether anything reads what a SelfChange may have changed in the DNS config: the serve config's
        cert domains, or an egress service named by a name (a Tailscale Service is an extra record)."""
        return bool(self.serve) or bool(self.services_on and self.egress_cfg
                                        and any(svc.fqdn and not svc.ip for svc in self.egress_cfg))

    def refresh_dns_config(self) -> None:
        """After a SelfChange: the DNS config's cert domains and extra records (upstream asks the same)."""
        try:
            cfg = self.api.json("GET", "/localapi/v0/dns-config", timeout=5)
        except (LocalAPIError, ValueError) as exc:
            log.info(f"error refreshing DNS config from tailscaled: {exc}")
            return
        self.node = ipn.with_dns_config(self.node, cfg)

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
            with self.interruptible():
                found = lookup_bounded(name)
        except (ResolveError, OSError) as exc:
            delay = min(2.0 ** self.dns_failures, DNS_REFRESH_SECONDS)
            self.dns_failures += 1
            log.info(f"[unexpected] error resolving DNS name {name}: {exc}")
            log.info("reconfigureTimer: last DNS resolution attempt failed, next DNS resolution attempt in "
                     f"{log.go_duration(delay)}")
            self.next_dns = time.monotonic() + delay
            return
        self.dns_failures = 0
        self.next_dns = time.monotonic() + DNS_REFRESH_SECONDS
        if found != self.backends:
            if self.backends:
                log.info(f"Backend address change detected, installing proxy rules for backends {log.go_list(found)}")
            else:
                log.info(f"installing ingress proxy rules for backends {log.go_list(found)}")
            self.backends = found

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.add(text)
            log.info(text)

    def reconcile(self) -> None:
        """Make the kernel's rules equal to the plan for the node as it is now, then write the services'
        status (the operator trusts it to mean "rules are live")."""
        if self.driver is None or self.detection is None:
            return
        s = self.s
        egress_targets = proxy.egress_targets(s, self.egress)
        families = self.detection.families
        resolved, ingress_cfg, notes = self.service_inputs(families)
        inputs = rules.Inputs(proxy.Inputs(self.node.addrs, egress_targets, self.backends), resolved, ingress_cfg)
        try:
            plan, more = rules.plan(s, inputs, families)
        except rules.ProxyError as exc:
            raise Exit(1, str(exc)) from exc
        for text in notes + more:
            self.note(text)
        if plan != self.applied:
            if s.dest_ip or s.dest_dns_name:
                log.info("Installing proxy rules")
            for target in egress_targets:
                log.info(f"Installing forwarding rules for destination {target}")
            if s.allow_cluster_traffic_via_ingress and s.serve_config and s.pod_ip:
                log.info(f"installing rules to forward traffic for {s.pod_ip} to node's tailnet IP")
            try:
                with self.interruptible():
                    self.driver.apply(plan)
            except FirewallBusy as exc:
                # Another program holds the netfilter lock: not an error of ours; the next tick tries again.
                self.pending = True
                log.warning(f"firewall: {exc}; retrying")
                return
            except FirewallError as exc:
                raise Exit(1, f"installing proxy rules: {exc}") from exc
            self.pending = False
            self.applied = plan
            self.next_drift = time.monotonic() + DRIFT_CHECK_SECONDS
            log.info(f"firewall: {len(plan.rules)} rules live in {self.detection.backend} for "
                     f"{', '.join(map(str, self.node.addrs)) or 'no addresses'}",
                     ms_after_netmap=round((time.monotonic() - self.netmap_at) * 1000, 2))
        if self.services_on:
            self.egress_resolved = resolved
            self.write_service_status()

    # ---- ProxyGroup services (egress and ingress) ----------------------------------------------------

    def service_inputs(self, families: Iterable[int]) -> tuple[list[egress.Resolved], ingress.Configs, list[str]]:
        if not self.services_on:
            return [], (), []
        resolved: list[egress.Resolved] = []
        notes: list[str] = []
        if self.egress_cfg:
            resolved, notes = egress.targets(self.egress_cfg, self.node, families)
        return resolved, self.ingress_cfg or (), notes

    def start_services(self) -> None:
        """Upstream starts its egress and ingress proxies once startup is complete; so do we."""
        s = self.s
        if self.services_on or not (s.egress_proxies_config_path or s.ingress_proxies_config_path):
            return
        self.services_on = True
        use_inotify = not os.environ.get("TS_TEST_NO_INOTIFY")
        for what, path, directory in (
                ("egress", s.egress_proxies_config_path, s.egress_proxies_config_path),
                ("ingress", s.ingress_proxies_config_path, os.path.dirname(s.ingress_proxies_config_path))):
            if not path:
                continue
            log.info(f"configuring {what} proxy using configuration file at {path}")
            watch = configdir.DirWatch(directory or ".", lambda: self.events.put(ServicesChanged()),
                                       use_inotify=use_inotify)
            if watch.mode != "inotify":
                log.info(f"{what} services config watch: failed to create fsnotify watcher, timer-only mode: "
                         f"{watch.problem}")
            self.service_watches.append(watch)
        self.load_services()
        self.next_services_poll = time.monotonic() + SERVICES_POLL_SECONDS
        if self.node.addrs:
            self.reconcile()

    def load_services(self) -> bool:
        """Read the config files again; True when the configs in force changed. A file that cannot be used
        is logged in one line (once, until it changes) and the last good config stays in force."""
        s = self.s
        changed = False
        if s.egress_proxies_config_path:
            path = os.path.join(s.egress_proxies_config_path, egress.KEY_CONFIG)
            got = self.reload("egress", path, egress.SETTING, egress.parse, len(self.egress_cfg or ()))
            if got is not None:
                changed = changed or got[0] != self.egress_cfg
                self.egress_cfg = got[0]
        if s.ingress_proxies_config_path:
            igot = self.reload("ingress", s.ingress_proxies_config_path, ingress.SETTING, ingress.parse,
                               len(self.ingress_cfg or ()))
            if igot is not None:
                # None (no file) and () (an empty object) differ: upstream writes a status for the latter.
                changed = changed or igot[0] != self.ingress_cfg
                self.ingress_cfg = igot[0]
        return changed

    def reload(self, kind: str, path: str, setting: str, parse: Callable[[bytes, str], T | None],
               in_force: int) -> tuple[T | None] | None:
        """A service config file read again: (the config,) when its bytes changed and it is usable (None
        in it: no file, or an empty one), else None. A file that cannot be read, is too large or does not
        parse is said once and keeps the `in_force` services; an unreadable file is not taken for a
        missing one, which would remove every service."""
        try:
            data: bytes | str | None = egress.read_file(path, setting)
        except egress.ConfigError as exc:
            data = str(exc)
        if data == self.service_files.get(path):  # (a file missing from the start is no change)
            return None
        self.service_files[path] = data
        try:
            if isinstance(data, str):
                raise egress.ConfigError(data)
            cfg = parse(data, path) if data is not None else None
        except egress.ConfigError as exc:
            log.error(f"{exc}; keeping the {in_force} {kind} services in force")
            return None
        log.info(f"{kind} services config: {len(cfg) if cfg is not None else 0} services")
        return (cfg,)

    def on_services_changed(self) -> None:
        self.next_services_poll = time.monotonic() + SERVICES_POLL_SECONDS
        if self.load_services() and self.node.addrs:
            self.reconcile()

    def write_service_status(self) -> None:
        """The `egress-services` and `ingress-config.json` keys, when they differ from what was written."""
        store = self.kube_store
        if store is None:
            return
        # Every netmap reconciles; the status (about 6 ms to build for 1,000 services) only when its inputs moved.
        inputs = (tuple(self.egress_resolved or ()), self.egress_resolved is None, self.ingress_cfg)
        if inputs == self.status_inputs and not self.status_retry:
            return
        s = self.s
        patch: dict[str, bytes | None] = {}
        new_egress = new_ingress = None
        if s.egress_proxies_config_path and self.egress_resolved is not None:
            new_egress = egress.status(self.egress_resolved, self.pod)
            if egress.wants_write(new_egress, self.egress_written):
                patch[secret.KEY_EGRESS_SERVICES] = egress.status_bytes(new_egress)
        if s.ingress_proxies_config_path:
            new_ingress = ingress.status(self.ingress_cfg, self.pod)
            if ingress.wants_write(self.ingress_cfg, new_ingress, self.ingress_written):
                patch[secret.KEY_INGRESS_CONFIG] = egress.status_bytes(new_ingress)
        if not patch:
            self.status_retry = False
            self.status_inputs = inputs
            return
        try:
            with self.interruptible():
                store.patch(patch)
        except kube.KubeError as exc:
            # The rules are live; the status tells the operator so. Not worth the proxy's life: try again.
            self.status_retry = True
            self.next_status_retry = time.monotonic() + STATUS_RETRY_SECONDS
            log.warning(f"writing services status to Secret {json.dumps(s.kube_secret)}: {exc}; retrying in "
                        f"{STATUS_RETRY_SECONDS:g}s")
            return
        self.status_retry = False
        self.status_inputs = inputs
        if secret.KEY_EGRESS_SERVICES in patch:
            self.egress_written = new_egress
            n = len((new_egress or {}).get("services") or {})
            log.info(f"egress services: status of {n} services written to the state Secret")
        if secret.KEY_INGRESS_CONFIG in patch:
            self.ingress_written = new_ingress
            n = len((new_ingress or {}).get("configs") or {})
            log.info(f"ingress services: status of {n} services written to the state Secret")

    def on_netmap(self, self_changed: bool = False) -> None:
        # The device ID goes to the Secret before any rule, so that the operator can delete the device
        # of a proxy whose rules keep failing; name and addresses only once the rules are live, because
        # the operator publishes them as the Service's endpoint.
        self.store_device_id()
        self.resolve_egress()
        if self_changed and self.wants_dns_config():
            self.refresh_dns_config()
        # Like upstream: an egress name that does not resolve yet means no rules and no device_fqdn for
        # now (the next netmap tries again), but the startup check below still runs.
        if not (self.s.tailnet_target_fqdn and not self.egress):
            self.resolve_backends(force=self.applied is None)
            if self.node.addrs:
                self.reconcile()
            if not self.pending:  # name and addresses say "traffic can flow": only once the rules are in
                self.store_device_endpoints()
            self.health.set(bool(self.node.addrs) and not self.pending)
            if self.serve:
                self.poll_serve()
        self.ts_services.on_netmap(self_changed)
        self.maybe_started()

    def maybe_started(self) -> None:
        if self.pending:
            return  # upstream would still be inside the rule install
        if not self.started and (not self.s.is_l3_proxy or self.kube_store is None
                                 or (self.stored_id is not None and self.stored_endpoints is not None)):
            self.started = True
            log.info("Startup complete, waiting for shutdown signal")
            self.start_services()

    def poll_serve(self) -> None:
        assert self.serve is not None
        try:
            updated = self.serve.poll(self.node.cert_domain)
        except LocalAPIError as exc:
            raise Exit(1, f"serve proxy: failed to apply serve config: {exc}") from exc
        store = self.kube_store
        if updated and store is not None:
            try:
                with self.interruptible():
                    store.patch({secret.KEY_HTTPS_ENDPOINT: self.node.cert_domain.encode()})
            except kube.KubeError as exc:
                raise Exit(1, f"serve proxy: error storing HTTPS endpoint: {exc}") from exc

    def tick(self) -> None:
        if self.pending and time.monotonic() >= self.next_drift:
            self.next_drift = time.monotonic() + DRIFT_CHECK_SECONDS
            self.reconcile()
            if not self.pending:
                self.store_device_endpoints()
                self.health.set(bool(self.node.addrs))
                self.maybe_started()
        if not self.started:
            return
        if self.serve:
            self.poll_serve()
        if self.services_on and time.monotonic() >= self.next_services_poll:
            self.on_services_changed()
        if self.status_retry and not self.pending and time.monotonic() >= self.next_status_retry:
            self.write_service_status()
        if self.s.dest_dns_name and time.monotonic() >= self.next_dns:
            before = self.backends
            self.resolve_backends()
            if self.backends != before:
                self.reconcile()
        if self.applied is not None and not self.pending and time.monotonic() >= self.next_drift:
            self.next_drift = time.monotonic() + DRIFT_CHECK_SECONDS
            self.check_drift()

    def check_drift(self) -> None:
        """Put back rules that somebody removed (`nft flush ruleset`, `iptables -t nat -F`, a firewall reload)."""
        assert self.applied is not None and self.driver is not None
        try:
            with self.interruptible():
                found = self.driver.installed()
        except (FirewallError, OSError) as exc:
            # Not being able to read (out of file descriptors, a busy lock) says nothing about the rules:
            # unknown, so nothing is "restored" on a guess; the next check tries again.
            log.warning(f"firewall: cannot read back the rules: {exc}; checking again in {DRIFT_CHECK_SECONDS:g}s")
            return
        if found == self.applied:
            return
        missing, extra = self.applied.rules - found.rules, found.rules - self.applied.rules
        log.warning(f"firewall: rules changed outside containerboot ({len(missing)} missing, {len(extra)} "
                    "unexpected); restoring them")
        try:
            with self.interruptible():
                self.driver.apply(self.applied, full=True)
        except (FirewallError, OSError) as exc:
            log.error(f"firewall: restoring the rules failed: {exc}; retrying")

    # ---- shutdown ---------------------------------------------------------------------------------

    def shutdown(self, clean: bool) -> None:
        self.shutting_down = True
        self.blocking = False
        self.drain_stop.set()  # a pre-stop drain in progress answers now
        self.close_watch()
        if self.config_watch is not None:
            self.config_watch.close()
        for watch in self.service_watches:
            watch.close()
        self.ts_services.stop()  # first: no advertisement may land after the unadvertise below
        if self.child is not None and self.child.proc.poll() is None:
            deadline = time.monotonic() + SHUTDOWN_TIMEOUT
            failover = 0.0
            if clean and self.heard_from_tailscaled:  # a tailscaled that never answered has nothing advertised
                failover = self.ts_services.unadvertise(deadline)
            # Stopping tailscaled between its login and its last state write would leave a Secret
            # it cannot recover from; upstream waits for all-or-nothing state, and so do we (during
            # the failover wait: both must be over before tailscaled stops).
            self.wait_consistent_state(deadline)
            self.ts_services.wait_failover(failover)
            log.info("Sending SIGTERM to tailscaled")
            self.child.terminate(max(1.0, deadline - time.monotonic()))
        if clean and self.driver is not None and self.applied is not None:
            try:
                self.driver.lock_wait = min(self.driver.lock_wait, 1.0)  # shutdown: quickly, or not at all
                self.driver.flush()
            except FirewallError as exc:
                log.warning(f"firewall: removing our rules failed: {exc}")
        for server in self.servers:
            server.shutdown()
            server.server_close()
            log.info(f"HTTP server at {server.addr_port} closed")

    def run(self) -> int:
        for text in self.s.notes:
            log.info(text)
        code = 0
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.on_signal)
            # Like upstream's bootCtx: the Kubernetes setup, tailscaled's start and the login share one deadline.
            self.boot_deadline = time.monotonic() + self.s.boot_timeout
            # The Kubernetes setup (API round trips) and the host's preparation and detection (netfilter
            # probes) do not depend on each other: done side by side, and both finished before tailscaled
            # starts, as upstream orders them (measured: 60-100 ms of start-up saved in the kube lab).
            kube_setup = self.start_kube_setup()
            self.prepare_host()
            self.env = self.prepare_firewall()
            log.info(self.summary())
            self.finish_kube_setup(kube_setup)
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
