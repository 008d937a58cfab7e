"""TS_* environment -> one frozen Settings (pure: the environment and files are inputs).

Upstream's variables, defaults, validation order and messages, plus what upstream lacks: a
malformed address, prefix, ip:port, boolean or duration is an error instead of a silent default,
`<SECRET>_FILE` reads a secret from a file, and an unknown TS_* variable draws a warning naming the
nearest known one. Every error is a ConfigError: one line naming the variable, the value given
(never a secret's) and what would be valid.

This module holds Settings and `load`, which reads the variables in upstream's order; the parts live
beside it: variables.py (the table, ConfigError), values.py (one value's parsers), secretfile.py
(secrets and their files), configfile.py (the versioned config dir's file), validate.py (checks across
variables). Their names are importable from here too, as they always were.
"""

from __future__ import annotations

import ipaddress
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from containerboot.settings import secretfile
from containerboot.settings.configfile import CAPABILITY_VERSION, CONFIG_DIR, CONFIG_FIELDS, pick_config_file
from containerboot.settings.secretfile import MAX_SECRET_BYTES, SecretFileError, read_secret_file, token_problem
from containerboot.settings.validate import accept_dns_override, validate
from containerboot.settings.values import (
    BOOL_FALSE,
    BOOL_TRUE,
    parse_addr_port,
    parse_bool,
    parse_dns_name,
    parse_duration,
    parse_host_ip,
    parse_hujson,
    parse_ip,
    parse_listen,
    parse_pod_ips,
    parse_prefixes,
)
from containerboot.settings.variables import (
    BOOL_FORM,
    FILE_VARIABLES,
    IGNORED,
    MAX_MESSAGE,
    PASSED_PREFIXES,
    PASSED_THROUGH,
    SECRETS,
    SHOWN_CHARS,
    VARIABLES,
    ConfigError,
    bad,
    shown,
    unknown_variable_notes,
)
from firewall.model import IPAddress

__all__ = [
    "BOOL_FALSE", "BOOL_FORM", "BOOL_TRUE", "CAPABILITY_VERSION", "CONFIG_DIR", "CONFIG_FIELDS", "FILE_VARIABLES",
    "IGNORED", "MAX_MESSAGE", "MAX_SECRET_BYTES", "PASSED_PREFIXES", "PASSED_THROUGH", "SECRETS", "SHOWN_CHARS",
    "VARIABLES", "ConfigError", "SecretFileError", "Settings", "bad", "load", "parse_addr_port", "parse_bool",
    "parse_dns_name", "parse_duration", "parse_host_ip", "parse_hujson", "parse_ip", "parse_listen",
    "parse_prefixes", "read_secret_file", "shown", "token_problem", "unknown_variable_notes",
]


@dataclass(frozen=True)
class Settings:
    """Every TS_* variable, parsed and checked once (`load`)."""

    authkey: str = field(default="", repr=False)
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    id_token: str = field(default="", repr=False)
    audience: str = ""
    hostname: str = ""
    routes: str | None = None  # None: unset; "" clears advertised routes
    route_prefixes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    dest_ip: IPAddress | None = None
    dest_dns_name: str = ""
    tailnet_target_ip: IPAddress | None = None
    tailnet_target_fqdn: str = ""
    tailscaled_extra_args: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()  # with any --accept-dns taken out (upstream 1.86+)
    userspace: bool = True
    state_dir: str = ""
    accept_dns: bool | None = None
    kube_secret: str = ""
    socks5_server: str = ""
    outbound_http_proxy_listen: str = ""
    socket: str = "/tmp/tailscaled.sock"
    auth_once: bool = False
    serve_config: str = ""
    config_dir: str = ""
    config_file: str = ""  # the cap-<N>.hujson chosen from config_dir
    healthcheck_addr_port: str = ""
    local_addr_port: str = "[::]:9002"
    enable_metrics: bool = False
    enable_health_check: bool = False
    debug_addr_port: str = ""
    enable_forwarding_optimizations: bool = False
    egress_proxies_config_path: str = ""
    ingress_proxies_config_path: str = ""
    cert_share: bool = False
    service_auto_advertisement: bool = True
    boot_timeout: float = 60.0
    kube_api_from_env: bool = False
    allow_cluster_traffic_via_ingress: bool = False
    pod_ip: IPAddress | None = None
    pod_ips: tuple[IPAddress, ...] = ()
    pod_uid: str = ""
    pod_name: str = ""
    in_kubernetes: bool = False
    firewall_mode: str = ""  # TS_DEBUG_FIREWALL_MODE: "", auto, iptables, nftables
    log_format: str = "text"
    root: str = "/"
    fake_netfilter: bool = False
    fake_netfilter_6: bool = True
    notes: tuple[str, ...] = ()  # warnings to log at start (never a secret)

    @property
    def is_l3_proxy(self) -> bool:
        return bool(self.dest_ip or self.dest_dns_name or self.tailnet_target_ip or self.tailnet_target_fqdn
                    or self.allow_cluster_traffic_via_ingress or self.egress_proxies_config_path
                    or self.ingress_proxies_config_path)

    @property
    def needs_forwarding(self) -> bool:
        return not self.userspace and bool(self.dest_ip or self.dest_dns_name or self.routes is not None
                                           or self.tailnet_target_ip or self.tailnet_target_fqdn)

    @property
    def mode(self) -> str:
        if self.userspace:
            return "userspace"
        if self.dest_ip or self.dest_dns_name:
            return "proxy"
        if self.tailnet_target_ip or self.tailnet_target_fqdn:
            return "egress"
        return "sidecar"

    def root_path(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.root, path.lstrip("/")))


T = TypeVar("T")


class _Env:
    """Reads variables with upstream's "empty means unset" rule and typed, named errors."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str = "") -> str:
        return self.env.get(name) or default

    def parsed(self, name: str, parse: Callable[[str], T], default: T) -> T:
        value = self.env.get(name, "")
        if value == "":
            return default
        try:
            return parse(value)
        except ValueError as exc:
            raise bad(name, value, str(exc)) from None

    def flag(self, name: str, default: bool = False) -> bool:
        return self.parsed(name, parse_bool, default)

    def secret(self, name: str, read_file: Callable[[str], str]) -> str:
        return secretfile.secret(self.env, name, read_file)


def load(env: Mapping[str, str], read_file: Callable[[str], str] = read_secret_file) -> Settings:
    """Parse and validate; raises ConfigError (the first problem, in upstream's order)."""
    e = _Env(env)
    # Three passes, each reading its variables in upstream's order, so the first problem is upstream's first.
    s = _login(e, read_file)
    s = _local(e, s)
    return validate(_rest(e, s))


def _login(e: _Env, read_file: Callable[[str], str]) -> Settings:
    """What `tailscale up` gets (credentials, routes, DNS, extra args), and where the node runs."""
    env = e.env
    in_k8s = bool(env.get("KUBERNETES_SERVICE_HOST"))
    root = e.text("TS_TEST_ONLY_ROOT", "/")
    notes = unknown_variable_notes(env)

    authkey = e.secret("TS_AUTHKEY", read_file) or e.secret("TS_AUTH_KEY", read_file)
    client_secret = e.secret("TS_CLIENT_SECRET", read_file)
    id_token = e.secret("TS_ID_TOKEN", read_file)
    userspace = e.flag("TS_USERSPACE", True)
    routes = env.get("TS_ROUTES")
    no_prefixes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    route_prefixes = e.parsed("TS_ROUTES", parse_prefixes, no_prefixes)
    accept_dns_given = e.parsed("TS_ACCEPT_DNS", parse_bool, None)
    accept_dns, extra, dns_notes = accept_dns_override(bool(accept_dns_given), e.text("TS_EXTRA_ARGS"),
                                                       accept_dns_given)
    notes += dns_notes
    kube_secret = env.get("TS_KUBE_SECRET", "tailscale") if in_k8s else e.text("TS_KUBE_SECRET")
    return Settings(authkey=authkey, client_secret=client_secret, id_token=id_token, routes=routes,
                    route_prefixes=route_prefixes, extra_args=tuple(extra.split()), userspace=userspace,
                    accept_dns=accept_dns, kube_secret=kube_secret, in_kubernetes=in_k8s, root=root,
                    notes=tuple(notes))


def _local(e: _Env, s: Settings) -> Settings:
    """This container's side: firewall mode, log format, local listeners, boot timeout, Pod IPs, config dir."""
    env = e.env
    mode = e.text("TS_DEBUG_FIREWALL_MODE").strip().lower()
    if mode not in ("", "auto", "iptables", "nftables"):
        raise bad("TS_DEBUG_FIREWALL_MODE", env["TS_DEBUG_FIREWALL_MODE"], "is not a firewall mode")
    log_format = e.text("TS_LOG_FORMAT", "text").lower()
    if log_format not in ("text", "json"):
        raise bad("TS_LOG_FORMAT", env["TS_LOG_FORMAT"], "is not a log format")
    for name in ("TS_SOCKS5_SERVER", "TS_OUTBOUND_HTTP_PROXY_LISTEN"):
        e.parsed(name, parse_listen, "")
    boot_timeout = e.parsed("TS_BOOT_TIMEOUT", parse_duration, 60.0)
    if boot_timeout <= 0:
        raise bad("TS_BOOT_TIMEOUT", env["TS_BOOT_TIMEOUT"], "is not positive")
    no_ips: tuple[IPAddress, ...] = ()
    pod_ips = e.parsed("POD_IPS", parse_pod_ips, no_ips)
    local = e.text("TS_LOCAL_ADDR_PORT", "[::]:9002")
    v6 = next((ip for ip in pod_ips if ip.version == 6), None)
    if v6 and str(v6) in local and "[" not in local:  # upstream: bracket the Pod's IPv6 address
        local = local.replace(str(v6), f"[{v6}]")
    try:
        parse_addr_port(local)
    except ValueError as exc:
        raise bad("TS_LOCAL_ADDR_PORT", env.get("TS_LOCAL_ADDR_PORT", ""), str(exc)) from None
    for name in ("TS_HEALTHCHECK_ADDR_PORT", "TS_DEBUG_ADDR_PORT"):
        e.parsed(name, parse_addr_port, None)

    config_dir = e.text(CONFIG_DIR)
    config_file = ""
    notes = s.notes
    if config_dir:
        config_file, line = pick_config_file(config_dir)
        notes += (line,)
    return replace(s, firewall_mode=mode, log_format=log_format, socks5_server=e.text("TS_SOCKS5_SERVER"),
                   outbound_http_proxy_listen=e.text("TS_OUTBOUND_HTTP_PROXY_LISTEN"), boot_timeout=boot_timeout,
                   pod_ips=pod_ips, local_addr_port=local, healthcheck_addr_port=e.text("TS_HEALTHCHECK_ADDR_PORT"),
                   debug_addr_port=e.text("TS_DEBUG_ADDR_PORT"), config_dir=config_dir, config_file=config_file,
                   notes=notes)


def _rest(e: _Env, s: Settings) -> Settings:
    """Everything else: the proxy targets, the feature flags, Pod identity and the test switches."""
    return replace(
        s,
        client_id=e.text("TS_CLIENT_ID"),
        audience=e.text("TS_AUDIENCE"),
        hostname=e.text("TS_HOSTNAME"),
        dest_ip=e.parsed("TS_DEST_IP", parse_host_ip, None),
        dest_dns_name=e.parsed("TS_EXPERIMENTAL_DEST_DNS_NAME", parse_dns_name, ""),
        tailnet_target_ip=e.parsed("TS_TAILNET_TARGET_IP", parse_host_ip, None),
        tailnet_target_fqdn=e.parsed("TS_TAILNET_TARGET_FQDN", parse_dns_name, ""),
        tailscaled_extra_args=tuple(e.text("TS_TAILSCALED_EXTRA_ARGS").split()),
        state_dir=e.text("TS_STATE_DIR"),
        socket=e.text("TS_SOCKET", "/tmp/tailscaled.sock"),
        auth_once=e.flag("TS_AUTH_ONCE"),
        serve_config=e.text("TS_SERVE_CONFIG"),
        enable_metrics=e.flag("TS_ENABLE_METRICS"),
        enable_health_check=e.flag("TS_ENABLE_HEALTH_CHECK"),
        enable_forwarding_optimizations=e.flag("TS_EXPERIMENTAL_ENABLE_FORWARDING_OPTIMIZATIONS"),
        egress_proxies_config_path=e.text("TS_EGRESS_PROXIES_CONFIG_PATH"),
        ingress_proxies_config_path=e.text("TS_INGRESS_PROXIES_CONFIG_PATH"),
        cert_share=e.flag("TS_EXPERIMENTAL_CERT_SHARE"),
        service_auto_advertisement=e.flag("TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT", True),
        kube_api_from_env=e.flag("TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV"),
        allow_cluster_traffic_via_ingress=e.flag("EXPERIMENTAL_ALLOW_PROXYING_CLUSTER_TRAFFIC_VIA_INGRESS"),
        pod_ip=e.parsed("POD_IP", parse_ip, None),
        pod_uid=e.text("POD_UID"),
        pod_name=e.text("POD_NAME"),
        fake_netfilter=e.flag("TS_TEST_FAKE_NETFILTER"),
        fake_netfilter_6=e.flag("TS_TEST_FAKE_NETFILTER_6", True),
    )
