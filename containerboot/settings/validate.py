"""Checks across variables: upstream's, in its order and with its messages (plus the fix), and the
--accept-dns flag in TS_EXTRA_ARGS that overrides TS_ACCEPT_DNS.

Apart from __init__.py because each check reads several variables at once, after each variable has been
parsed on its own: the order here is upstream's order of checks, which decides the one error reported.
The warnings these checks add go into Settings.notes, logged at start.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from containerboot.settings.configfile import CONFIG_DIR, check_config_file
from containerboot.settings.values import parse_bool
from containerboot.settings.variables import ConfigError, bad, shown
from containerboot.tailscale import cliflags

if TYPE_CHECKING:  # __init__.py imports this module to finish load(); only the type is needed here
    from containerboot.settings import Settings

def accept_dns_override(base: bool, extra: str, given: bool | None) -> tuple[bool | None, str, list[str]]:
    """Upstream 1.86+: an --accept-dns flag inside TS_EXTRA_ARGS overrides TS_ACCEPT_DNS and is removed."""
    if "--accept-dns" not in extra:
        return given, extra, []
    fields = extra.split()
    flag = next((f for f in fields if f.startswith("--accept-dns")), None)
    if flag is None:
        return given, extra, []
    if flag == "--accept-dns":
        value = True
    elif flag.startswith("--accept-dns="):
        raw = flag.split("=", 1)[1]
        try:
            value = parse_bool(raw)
        except ValueError:
            return given, extra, [f"TS_EXTRA_ARGS contains --accept-dns={shown(raw)}, which is not a valid "
                                  "boolean value, ignoring it"]
    else:
        return given, extra, ["TS_EXTRA_ARGS contains --accept-dns, but it is not in the expected format "
                              "--accept-dns=<true|false>, ignoring it"]
    fields.remove(flag)
    notes = []
    if value != base:
        notes.append(f"TS_EXTRA_ARGS contains --accept-dns={str(value).lower()}, which overrides "
                     f"TS_ACCEPT_DNS={str(base).lower()}")
    return (value if value != base else given), " ".join(fields), notes


def validate(s: Settings) -> Settings:
    """Upstream's cross-variable checks, in its order and with its messages (plus the fix); returns `s` with
    the warnings they add to its notes. Raises ConfigError at the first problem."""
    user = f"(TS_USERSPACE={str(s.userspace).lower()}; set TS_USERSPACE=false for kernel networking)"
    if s.config_file:
        check_config_file(s.config_dir, s.config_file)
    _check_targets(s, user)
    _check_config_dir_alone(s)
    _check_credentials(s)
    _check_kernel_only(s, user)
    s = _check_endpoints_and_stores(s)
    _check_extra_args(s)  # after upstream's checks, which never look at the flags: its first error stays first
    return s


def _check_targets(s: Settings, user: str) -> None:
    """Where traffic goes (TS_DEST_IP, a DNS name, a tailnet target): kernel networking only, one of each."""
    if s.dest_ip and s.userspace:
        raise ConfigError("TS_DEST_IP", f"TS_DEST_IP is not supported with TS_USERSPACE {user}")
    if s.dest_dns_name and s.userspace:
        raise ConfigError("TS_EXPERIMENTAL_DEST_DNS_NAME",
                          f"TS_EXPERIMENTAL_DEST_DNS_NAME is not supported with TS_USERSPACE {user}")
    if s.dest_dns_name and s.dest_ip:
        raise ConfigError("TS_EXPERIMENTAL_DEST_DNS_NAME",
                          "TS_EXPERIMENTAL_DEST_DNS_NAME and TS_DEST_IP cannot both be set")
    if s.tailnet_target_ip and s.userspace:
        raise ConfigError("TS_TAILNET_TARGET_IP", f"TS_TAILNET_TARGET_IP is not supported with TS_USERSPACE {user}")
    if s.tailnet_target_fqdn and s.userspace:
        raise ConfigError("TS_TAILNET_TARGET_FQDN",
                          f"TS_TAILNET_TARGET_FQDN is not supported with TS_USERSPACE {user}")
    if s.tailnet_target_fqdn and s.tailnet_target_ip:
        raise ConfigError("TS_TAILNET_TARGET_FQDN",
                          "Both TS_TAILNET_TARGET_IP and TS_TAILNET_FQDN cannot be set (set TS_TAILNET_TARGET_IP or "
                          "TS_TAILNET_TARGET_FQDN, not both)")


def _check_config_dir_alone(s: Settings) -> None:
    """A versioned config dir holds the login settings: none of them may also come from a variable."""
    if s.config_dir and (s.accept_dns is not None or s.authkey or s.routes is not None or s.extra_args
                         or s.hostname or s.client_id or s.client_secret or s.id_token or s.audience):
        raise ConfigError(CONFIG_DIR,
                          "TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR cannot be set in combination with TS_HOSTNAME, "
                          "TS_EXTRA_ARGS, TS_AUTHKEY, TS_ROUTES, TS_ACCEPT_DNS, TS_CLIENT_ID, TS_CLIENT_SECRET, "
                          "TS_ID_TOKEN, TS_AUDIENCE.")


def _check_credentials(s: Settings) -> None:
    """An auth key, or an OAuth client (with a secret, or an ID token or audience for workload identity)."""
    for cond, var, msg in (
        (s.id_token and not s.client_id, "TS_ID_TOKEN", "TS_ID_TOKEN is set but TS_CLIENT_ID is not set"),
        (s.audience and not s.client_id, "TS_AUDIENCE", "TS_AUDIENCE is set but TS_CLIENT_ID is not set"),
        (s.id_token and s.client_secret, "TS_ID_TOKEN", "TS_ID_TOKEN and TS_CLIENT_SECRET cannot both be set"),
        (s.id_token and s.audience, "TS_ID_TOKEN", "TS_ID_TOKEN and TS_AUDIENCE cannot both be set"),
        (s.audience and s.client_secret, "TS_AUDIENCE", "TS_AUDIENCE and TS_CLIENT_SECRET cannot both be set"),
        (s.authkey and (s.client_id or s.client_secret or s.id_token or s.audience), "TS_AUTHKEY",
         "TS_AUTHKEY cannot be used with TS_CLIENT_ID, TS_CLIENT_SECRET, TS_ID_TOKEN, or TS_AUDIENCE."),
    ):
        if cond:
            raise ConfigError(var, msg)


def _check_kernel_only(s: Settings, user: str) -> None:
    """Cluster traffic via ingress and forwarding optimizations need kernel networking (the first also an
    ingress proxy's serve config and the Pod's IP)."""
    flag = "EXPERIMENTAL_ALLOW_PROXYING_CLUSTER_TRAFFIC_VIA_INGRESS"
    if s.allow_cluster_traffic_via_ingress:
        if s.userspace:
            raise ConfigError(flag, f"{flag} is not supported in userspace mode {user}")
        if not s.serve_config:
            raise ConfigError(flag, f"{flag} is set but this is not a cluster ingress proxy (TS_SERVE_CONFIG is "
                                    "not set)")
        if not s.pod_ip:
            raise ConfigError(flag, f"{flag} is set but POD_IP is not set")
    if s.enable_forwarding_optimizations and s.userspace:
        raise ConfigError("TS_EXPERIMENTAL_ENABLE_FORWARDING_OPTIMIZATIONS",
                          f"TS_EXPERIMENTAL_ENABLE_FORWARDING_OPTIMIZATIONS is not supported in userspace mode {user}")


def _check_endpoints_and_stores(s: Settings) -> Settings:
    """The deprecated health endpoint, the proxy config paths that need the Kubernetes store, and where state
    is kept; returns `s` with the warnings added to its notes."""
    notes = list(s.notes)
    if s.healthcheck_addr_port:
        notes.append("[warning] TS_HEALTHCHECK_ADDR_PORT is deprecated and will be removed in 1.82.0. Please use "
                     "TS_ENABLE_HEALTH_CHECK and optionally TS_LOCAL_ADDR_PORT instead.")
    if s.enable_health_check and s.healthcheck_addr_port:
        raise ConfigError("TS_HEALTHCHECK_ADDR_PORT",
                          "TS_HEALTHCHECK_ADDR_PORT is deprecated and will be removed in 1.82.0, use "
                          "TS_ENABLE_HEALTH_CHECK and optionally TS_LOCAL_ADDR_PORT")
    in_kube_store = s.in_kubernetes and bool(s.kube_secret)
    if s.egress_proxies_config_path and not in_kube_store:
        raise ConfigError("TS_EGRESS_PROXIES_CONFIG_PATH",
                          "TS_EGRESS_PROXIES_CONFIG_PATH is only supported for Tailscale running on Kubernetes")
    if s.ingress_proxies_config_path and not in_kube_store:
        raise ConfigError("TS_INGRESS_PROXIES_CONFIG_PATH",
                          "TS_INGRESS_PROXIES_CONFIG_PATH is only supported for Tailscale running on Kubernetes")
    if s.state_dir == "" and not s.kube_secret and not s.config_dir and (s.authkey or s.client_secret):
        notes.append("[warning] TS_STATE_DIR is not set: node state is kept in memory, so every restart "
                     "registers a new device; mount a volume and set TS_STATE_DIR to keep the node")
    return replace(s, notes=tuple(notes))


# The flags containerboot itself gives `tailscale up`, by the variable that gives them (tailscaled.up_argv).
OWN_FLAGS = {"auth-key": "TS_AUTHKEY", "client-id": "TS_CLIENT_ID", "client-secret": "TS_CLIENT_SECRET",
             "id-token": "TS_ID_TOKEN", "audience": "TS_AUDIENCE", "advertise-routes": "TS_ROUTES",
             "hostname": "TS_HOSTNAME"}


def _check_extra_args(s: Settings) -> None:
    """Each TS_EXTRA_ARGS flag must be one `tailscale up` or `tailscale set` takes, given as the CLI reads it,
    once: the CLI would refuse anything else at every boot (upstream's container then restarts for ever,
    tailscale/tailscale#18437). A flag a variable already gives is the CLI's "flag provided multiple times"."""
    valid = (f"flags of 'tailscale up' or 'tailscale set' (tailscale {cliflags.PINNED}: `tailscale up --help`, "
             "`tailscale set --help`)")
    value = cliflags.shown(s.extra_args)
    try:
        given = cliflags.parse(s.extra_args)
    except cliflags.FlagError as exc:
        raise bad("TS_EXTRA_ARGS", value, f"has {exc}", valid) from None
    own = {"auth-key": s.authkey, "client-id": s.client_id, "client-secret": s.client_secret, "id-token": s.id_token,
           "audience": s.audience, "advertise-routes": s.routes is not None, "hostname": s.hostname}
    for g in given:
        if own.get(g.name):
            var = OWN_FLAGS[g.name]
            raise bad("TS_EXTRA_ARGS", value, f"has --{g.name}, which {var} already gives 'tailscale up' (the CLI "
                                              "refuses a flag given twice)", f"--{g.name} in one of them")
