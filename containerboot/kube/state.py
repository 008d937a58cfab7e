"""The state Secret as a collaborator of the boot: opened once (permissions, a stored auth key, the
previous Pod's fields cleared), then written as the node comes up (device ID, name and addresses, the
HTTPS endpoint), waited on before tailscaled stops, and used to ask the operator for a new auth key.

What to write is decided in secret.py (pure); this module makes the calls and turns a failure into the
line and exit code upstream gives for it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace

from containerboot import log
from containerboot.events import Cancel, Clock, Exit, stop_now
from containerboot.kube import client as kube
from containerboot.kube import secret
from containerboot.kube.secret import SecretStore, StateStore
from containerboot.settings import Settings
from containerboot.tailscale.ipn import Node
from firewall.model import IPAddress


def open_store(s: Settings, cancel: Cancel, deadline: float, config_authkey: str) -> tuple[SecretStore, Settings]:
    """Upstream's newKubeClient + setupKube + resetContainerbootState, with its messages: the store, and
    the settings with the auth key the Secret holds (when none was given otherwise)."""
    try:
        host, port = kube.server_address(s, os.environ)
        client = kube.Client(s.root_path(kube.SA_DIR), host, port, stop=cancel.requested)
    except kube.KubeError as exc:
        raise Exit(1, f"error initializing kube client: {exc}") from exc
    client.deadline = deadline
    store = secret.SecretStore(client, s.kube_secret)
    try:
        with cancel.blocking():
            store.check_permissions(log.info)
            existing = store.get()
        if existing is None and not store.can_create:
            raise kube.KubeError(
                f"tailscale state Secret {s.kube_secret} does not exist and we don't have permissions to create "
                "it. If you intend to store tailscale state elsewhere than a Kubernetes Secret, you can explicitly "
                "set TS_KUBE_SECRET env var to an empty string. Else ensure that RBAC is set up that allows the "
                "service account associated with this installation to create Secrets.")
    except kube.KubeError as exc:
        if cancel.requested():
            stop_now(cancel.signum)
        text = str(exc)
        if exc.code and not text.startswith("getting Tailscale state Secret"):
            text = f"getting Tailscale state Secret {s.kube_secret}: {text}"
        raise Exit(1, f"error setting up for running on Kubernetes: {text}") from exc
    if not store.can_patch:
        log.info(f"no patch permission on Secret {json.dumps(s.kube_secret)}: containerboot writes nothing to it "
                 "(tailscaled still keeps its state there)")
    if not (s.authkey or s.client_id or s.client_secret or s.config_file):
        s = _authkey_from_secret(s, store, existing)
    if writable(store, s) and existing is not None:
        try:
            with cancel.blocking():
                store.patch(secret.reset_patch(existing, s.pod_uid, config_authkey))
        except kube.KubeError as exc:
            raise Exit(1, f"error clearing previous state from Secret: failed to read state Secret "
                          f"{json.dumps(s.kube_secret)} to reset state: {exc}") from exc
    return store, s


def writable(store: StateStore | None, s: Settings) -> bool:
    """Whether containerboot may write to the state Secret (upstream's hasKubeStateStore: in Kubernetes, with
    patch rights)."""
    return store is not None and store.can_patch and s.in_kubernetes


def _authkey_from_secret(s: Settings, store: StateStore, existing: dict[str, bytes] | None) -> Settings:
    if existing is None:
        log.info("TS_AUTHKEY not provided and state Secret does not exist, login will be interactive if needed.")
        return s
    raw = existing.get(secret.KEY_AUTHKEY, b"")
    if raw:
        if not store.can_patch:
            raise Exit(1, "error setting up for running on Kubernetes: authkey found in TS_KUBE_SECRET, but the "
                          "pod doesn't have patch permissions on the Secret to manage the authkey.")
        key = raw.decode("utf-8", errors="replace").strip()
        if not key or any(c.isspace() or not c.isprintable() for c in key):
            raise Exit(1, f"error setting up for running on Kubernetes: the authkey in Secret "
                          f"{json.dumps(s.kube_secret)} is not one printable token ({len(raw)} bytes); "
                          "expected an auth key such as tskey-auth-...")
        s = replace(s, authkey=key)
    # Upstream logs this line whether or not a key was found; searches for it keep working.
    log.info("No authkey found in state Secret and TS_AUTHKEY not provided, login will be interactive if needed.")
    return s


class Opening:
    """open_store in a thread of its own: the Kubernetes round trips and the host's preparation and
    detection (netfilter probes) do not depend on each other, and both finish before tailscaled starts,
    as upstream orders them (measured: 60-100 ms of start-up saved in the kube lab)."""

    def __init__(self, s: Settings, cancel: Cancel, deadline: float, config_authkey: str) -> None:
        self._cancel = cancel
        self._result: tuple[SecretStore, Settings] | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._work, args=(s, deadline, config_authkey), name="kube-setup",
                                        daemon=True)
        self._thread.start()

    def _work(self, s: Settings, deadline: float, config_authkey: str) -> None:
        try:
            self._result = open_store(s, self._cancel, deadline, config_authkey)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self._failure = exc

    def result(self) -> tuple[SecretStore, Settings]:
        with self._cancel.blocking():  # the calls are bounded by the boot deadline; a signal ends the wait
            self._thread.join()
        if self._failure is not None:
            raise self._failure
        assert self._result is not None
        return self._result


class StateKeeper:
    """What containerboot writes to the state Secret, each key once per value. `store` is None outside
    Kubernetes; `writable` is the store only where containerboot may write (`writable()`)."""

    def __init__(self, s: Settings, store: StateStore | None, cancel: Cancel, clock: Clock) -> None:
        self.s = s
        self.store = store
        self.cancel = cancel
        self.clock = clock
        self.writable = store if writable(store, s) else None
        self.stored_id: str | None = None
        self.stored_endpoints: tuple[str, tuple[IPAddress, ...]] | None = None

    @property
    def published(self) -> bool:
        """Device ID and endpoints are in the Secret (always true where nothing is written)."""
        return self.writable is None or (self.stored_id is not None and self.stored_endpoints is not None)

    def _patch(self, data: secret.Patch, failure: str) -> bool:
        """Write `data`; a failure ends the program with `failure: <error>`. False where nothing is written."""
        if self.writable is None:
            return False
        try:
            with self.cancel.blocking():
                self.writable.patch(data)
        except kube.KubeError as exc:
            raise Exit(1, f"{failure}: {exc}") from exc
        return True

    def store_device_id(self, node: Node) -> None:
        if node.stable_id != self.stored_id and self._patch({secret.KEY_DEVICE_ID: node.stable_id.encode()},
                                                            "storing device ID in Kubernetes Secret"):
            self.stored_id = node.stable_id

    def store_endpoints(self, node: Node) -> None:
        endpoints = (node.name, node.addrs)
        if endpoints != self.stored_endpoints and self._patch(secret.endpoints_patch(*endpoints),
                                                              "storing device IPs and FQDN in Kubernetes Secret"):
            self.stored_endpoints = endpoints

    def store_https_endpoint(self, domain: str) -> None:
        self._patch({secret.KEY_HTTPS_ENDPOINT: domain.encode()}, "serve proxy: error storing HTTPS endpoint")

    def delete_authkey(self) -> None:
        """The key is no longer needed once the node is logged in; a reusable one should not linger."""
        if self.writable is None:
            return
        log.info("Deleting authkey from Kubernetes Secret")
        try:
            with self.cancel.blocking():
                self.writable.delete_authkey()
        except kube.KubeError as exc:
            raise Exit(1, f"deleting authkey from Kubernetes Secret: {exc}") from exc

    def steady(self) -> None:
        """After the boot: each call is bounded by its own timeout, not the boot deadline."""
        if self.store is not None:
            self.store.set_deadline(None)

    def request_reissue(self, old_key: str) -> None:
        assert self.writable is not None
        self.writable.set_deadline(None)  # the wait for a new key has its own 10 minutes, not the boot deadline
        log.info("Requesting a new auth key from operator")
        try:
            with self.cancel.blocking():
                self.writable.patch({secret.KEY_REISSUE: old_key.encode()})
        except kube.KubeError as exc:
            raise Exit(1, "failed to get a reissued authkey: failed to set reissue_authkey in Kubernetes Secret: "
                          f"{exc}") from exc

    def clear_reissue(self) -> None:
        assert self.writable is not None
        try:
            with self.cancel.blocking():
                existing = self.writable.get() or {}
                self.writable.patch(secret.clear_reissue_patch(existing))
        except kube.KubeError as exc:
            log.info(f"Warning: failed to clear reissue request: error getting state secret: {exc}")

    def wait_consistent(self, deadline: float) -> None:
        """Before SIGTERM: let tailscaled finish writing its login state (all keys or none), bounded."""
        store = self.writable
        if store is None:
            return
        log.info("Checking for consistent state")
        logged, delay = False, 0.1
        while self.clock.now() < deadline:
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
            self.clock.sleep(max(0.0, min(delay, deadline - self.clock.now())))
            delay = min(delay * 2, 2.0)
        log.info("Error waiting for consistent state on shutdown: context deadline exceeded")
