"""The proxy's state Secret (`TS_KUBE_SECRET`).

The Tailscale operator reads back what a proxy writes into its Secret: the device's stable ID to delete it
later, its MagicDNS name and addresses once traffic can flow, the capability version and Pod UID that tell
it which of those fields it may trust. Keys follow upstream's `cmd/containerboot/kube.go`; the decisions
about what to write are pure functions here (`reset_patch`, `clear_reissue_patch`, `consistent`), the
calls go through client.py's `Client`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from containerboot.kube.client import Client, KubeError
from containerboot.settings import CAPABILITY_VERSION
from firewall.model import IPAddress

KEY_DEVICE_ID = "device_id"
KEY_DEVICE_FQDN = "device_fqdn"
KEY_DEVICE_IPS = "device_ips"
KEY_POD_UID = "pod_uid"
KEY_CAPVER = "tailscale_capver"
KEY_REISSUE = "reissue_authkey"
KEY_HTTPS_ENDPOINT = "https_endpoint"
KEY_AUTHKEY = "authkey"
KEY_EGRESS_SERVICES = "egress-services"
KEY_INGRESS_CONFIG = "ingress-config.json"
# tailscaled's own keys (ipn.CurrentProfileStateKey, KnownProfilesStateKey, MachineKeyStateKey).
KEY_CURRENT_PROFILE = "_current-profile"
KEY_PROFILES = "_profiles"
KEY_MACHINE_KEY = "_machinekey"

Patch = dict[str, bytes | None]  # a Secret data patch: None deletes the key


# ---- pure decisions ---------------------------------------------------------------------------------


def reset_patch(existing: Mapping[str, bytes], pod_uid: str, config_authkey: str) -> Patch:
    """What a fresh start clears (upstream's resetContainerbootState): the operator must not trust the
    previous Pod's status fields. Device identity stays so the operator can still delete the old device;
    a reissue request stays until the operator has answered it (the config holds a different key)."""
    patch: Patch = {
        KEY_CAPVER: str(CAPABILITY_VERSION).encode(),
        KEY_HTTPS_ENDPOINT: None,
        KEY_EGRESS_SERVICES: None,
        KEY_INGRESS_CONFIG: None,
    }
    if pod_uid:
        patch[KEY_POD_UID] = pod_uid.encode()
    broken = existing.get(KEY_REISSUE)
    if broken is not None and config_authkey and broken.decode(errors="replace") != config_authkey:
        patch[KEY_REISSUE] = None
    return patch


def clear_reissue_patch(existing: Mapping[str, bytes]) -> Patch:
    """After a new key arrives: forget the request and the old node's identity and tailscaled state, so
    the restart logs in as a new node with the new key."""
    patch: Patch = dict.fromkeys((KEY_REISSUE, KEY_DEVICE_ID, KEY_DEVICE_FQDN, KEY_DEVICE_IPS, KEY_MACHINE_KEY,
                                  KEY_CURRENT_PROFILE, KEY_PROFILES))
    profile = existing.get(KEY_CURRENT_PROFILE, b"").decode(errors="replace")
    if profile:
        patch[profile] = None
    return patch


def endpoints_patch(fqdn: str, addrs: Iterable[IPAddress]) -> Patch:
    """`device_fqdn` (with its trailing dot, as tailscaled reports it) and `device_ips` as Go's
    json.Marshal of a []string writes them (`null` when there are none)."""
    ips = [str(a) for a in addrs]
    return {KEY_DEVICE_FQDN: fqdn.encode(),
            KEY_DEVICE_IPS: json.dumps(ips or None, separators=(",", ":")).encode()}


def consistent(data: Mapping[str, bytes]) -> bool:
    """tailscaled has written all of its login state, or none of it (upstream's hasConsistentState)."""
    profiles = sum(1 for k in data if k.startswith("profile-"))
    if profiles > 1:
        return False
    present = [KEY_CURRENT_PROFILE in data, KEY_PROFILES in data, KEY_MACHINE_KEY in data, profiles == 1]
    return all(present) or not any(present)



# ---- the state Secret ---------------------------------------------------------------------------------


class StateStore(Protocol):
    """The state Secret as the boot reads and writes it (SecretStore; a fake in the loop's tests).
    Failures are KubeError."""

    name: str
    can_patch: bool

    def get(self, deadline: float | None = None) -> dict[str, bytes] | None:
        """The Secret's data, or None when it does not exist."""
        ...

    def patch(self, data: Mapping[str, bytes | None]) -> None: ...

    def delete_authkey(self) -> None: ...

    def set_deadline(self, deadline: float | None) -> None:
        """Bound every call by `deadline` (the boot's), or by each call's own timeout only (None)."""
        ...


class SecretStore:
    """The proxy's view of its state Secret: permission checks at start, then the keys it writes."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name
        self.can_patch = False
        self.can_create = False

    def check_permissions(self, log_info: Callable[[str], None]) -> None:
        """get and update must be allowed (else an error naming what is missing); patch and create are
        probed, and an error asking is taken as "no" (upstream's CheckSecretPermissions). The four
        reviews are independent, so they are asked at once, one connection each: one round trip of
        start-up instead of four (about 40 ms through a Pod's network)."""
        verbs = ("get", "update", "patch", "create")
        answers: dict[str, bool | KubeError] = {}

        def ask(verb: str, client: Client) -> None:
            try:
                answers[verb] = client.allowed(verb, "secrets", self.name)
            except KubeError as exc:
                answers[verb] = exc

        siblings = [self.client.sibling() for _ in verbs[1:]]
        threads = [threading.Thread(target=ask, args=(verb, c), name=f"ssar-{verb}", daemon=True)
                   for verb, c in zip(verbs[1:], siblings, strict=True)]
        for t in threads:
            t.start()
        ask("get", self.client)
        for t in threads:
            t.join()  # each call is bounded by the client's timeout and deadline
        for c in siblings:
            c.close()
        missing = []
        for verb in ("get", "update"):
            answer = answers[verb]
            if isinstance(answer, KubeError):
                log_info(f"error checking {verb} permission on secret {self.name}: {answer}")
            elif not answer:
                missing.append(f"missing {verb} permission on secret {json.dumps(self.name)}")
        if missing:
            raise KubeError("some Kubernetes permissions are missing, please check your RBAC configuration: "
                            + "; ".join(missing))
        for verb in ("patch", "create"):
            answer = answers[verb]
            if isinstance(answer, KubeError):
                log_info(f"error checking {verb} permission on secret {self.name}: {answer}")
                self.can_patch = self.can_create = False
                return
            setattr(self, f"can_{verb}", answer)

    def get(self, deadline: float | None = None) -> dict[str, bytes] | None:
        """The Secret's data, or None when it does not exist."""
        try:
            return self.client.get_secret(self.name, deadline)
        except KubeError as exc:
            if exc.not_found:
                return None
            raise

    def patch(self, data: Mapping[str, bytes | None]) -> None:
        self.client.patch_secret(self.name, data)

    def set_deadline(self, deadline: float | None) -> None:
        self.client.deadline = deadline

    def delete_authkey(self) -> None:
        try:
            self.client.json_patch_secret(self.name, [{"op": "remove", "path": f"/data/{KEY_AUTHKEY}"}])
        except KubeError as exc:
            if exc.code != 422:  # the key is already gone: nothing to do
                raise
