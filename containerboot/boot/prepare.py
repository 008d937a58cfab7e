"""Before tailscaled starts: the host's tun device and forwarding sysctls, the netfilter backend (kernel
mode), tailscaled's environment, and the one line that says how the boot is configured."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from containerboot import health, log, system
from containerboot.events import Exit
from containerboot.settings import Settings
from containerboot.tailscale import tailscaled, vipservices
from firewall.model import Driver
from firewall.tschains import ChainReader, reader

if TYPE_CHECKING:
    from firewall.detect import Detection  # imported when detection runs (kernel mode only)


def prepare_host(s: Settings) -> None:
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


@dataclass(frozen=True)
class Firewall:
    """The detected backend (None: userspace, or detection failed where no rules are ours), the driver
    for our rules (L3 proxies only), tailscaled's environment, and the reader of tailscaled's own chains
    in the backend it was handed (kernel mode; None where that backend is not ours to know)."""

    detection: Detection | None
    driver: Driver | None
    env: dict[str, str]
    chains: ChainReader | None = None


def prepare_firewall(s: Settings) -> Firewall:
    from firewall.detect import DetectionError, make_driver

    env = tailscaled.child_env(os.environ)  # no secret variable reaches tailscaled
    if s.cert_share:
        env["TS_CERT_SHARE_MODE"] = vipservices.cert_share_mode(s)
    if s.userspace and not s.is_l3_proxy:
        return Firewall(None, None, env)
    if s.userspace:
        # Only a ProxyGroup's services config gets here (every other proxy setting is refused in userspace
        # mode). Upstream still makes its netfilter runner for it, installs the services' rules and writes
        # their status (its test egress_svcs_config_kube); so do we, and say what that is worth.
        log.warning("[warning] ProxyGroup services with TS_USERSPACE=true: their rules are installed and their "
                    "status written as upstream does, but userspace networking sends no tailnet traffic through "
                    "the kernel's rules; set TS_USERSPACE=false")
    try:
        detection = system.detect_firewall(s)
    except DetectionError as exc:
        if s.is_l3_proxy:
            raise Exit(1, f"error creating new netfilter runner: {exc}") from exc
        log.warning(f"[warning] {exc}; tailscaled will pick its own backend")
        return Firewall(None, None, env)
    driver = make_driver(detection) if s.is_l3_proxy else None
    if s.userspace:
        return Firewall(detection, driver, env)  # tailscaled itself touches no netfilter in userspace mode
    if detection.fake:
        return Firewall(detection, driver, env)
    if not os.environ.get("TS_DEBUG_FIREWALL_MODE"):
        # tailscaled's own rules (ts-input, ts-forward, ...) land in the same backend as ours.
        env["TS_DEBUG_FIREWALL_MODE"] = detection.backend
    if detection.backend == "iptables":
        shim = system.legacy_xtables_path(s)
        if shim:
            env["PATH"] = f"{shim}:{env.get('PATH', '')}"
            log.info(f"tailscaled runs iptables as iptables-legacy (through {shim}), like our rules")
    # Watched where tailscaled writes in our backend (not where it was told `auto`, and chooses for itself).
    handed = env.get("TS_DEBUG_FIREWALL_MODE") == detection.backend
    return Firewall(detection, driver, env, reader(detection.backend, detection.families) if handed else None)


def _state_store(s: Settings) -> str:
    if s.config_file:
        return f"tailscaled config file {s.config_file}"
    if s.kube_secret:
        return f"Kubernetes Secret {s.kube_secret}"
    if s.state_dir:
        return f"directory {s.state_dir}"
    return "memory (a restart registers a new device; set TS_STATE_DIR to keep it)"


def summary(s: Settings, d: Detection | None) -> str:
    if s.userspace and d is None:
        firewall = "none (userspace networking: other processes reach the tailnet through the SOCKS5/HTTP proxy)"
    elif d is None:
        firewall = "undetected"
    else:
        firewall = f"{d.backend} ({d.variant}): {'; '.join(d.evidence)}"
    url = health.health_url(s) or "disabled (set TS_ENABLE_HEALTH_CHECK=true)"
    return f"Configuration: mode {s.mode}; firewall {firewall}; state {_state_store(s)}; health {url}"
