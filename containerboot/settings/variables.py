"""The TS_* variables containerboot reads, and how an error about one of them reads.

The table (each variable's valid form, shown in its errors and checked against the README), the
secrets (never quoted), the names passed through to tailscaled, the warning for an unknown TS_*
variable, and ConfigError. Apart from __init__.py so that the parsers (values.py), the secret
files (secretfile.py) and the checks (validate.py) can name variables without importing the
loader, and so that what the program reads can be read at a glance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

BOOL_FORM = "a boolean: true/false, 1/0, t/f, yes/no or on/off"

SECRETS = ("TS_AUTHKEY", "TS_AUTH_KEY", "TS_CLIENT_SECRET", "TS_ID_TOKEN")

# Every variable read here, with the valid form shown in errors. Order = documentation order.
VARIABLES: dict[str, str] = {
    "TS_AUTHKEY": "an auth key (tskey-auth-...), or file:/path",
    "TS_AUTH_KEY": "alias of TS_AUTHKEY",
    "TS_CLIENT_ID": "an OAuth client id",
    "TS_CLIENT_SECRET": "an OAuth client secret",
    "TS_ID_TOKEN": "an identity token for workload identity federation",
    "TS_AUDIENCE": "an audience for workload identity federation",
    "TS_HOSTNAME": "the node's hostname",
    "TS_ROUTES": "comma-separated CIDR prefixes, e.g. 10.0.0.0/24,fd00::/64 (empty clears)",
    "TS_DEST_IP": "an IPv4 or IPv6 address, e.g. 10.0.0.5",
    "TS_EXPERIMENTAL_DEST_DNS_NAME": "a DNS name, e.g. backend.default.svc.cluster.local",
    "TS_TAILNET_TARGET_IP": "a tailnet IPv4 or IPv6 address, e.g. 100.64.0.7",
    "TS_TAILNET_TARGET_FQDN": "a MagicDNS name, e.g. db.tailnet.ts.net",
    "TS_TAILSCALED_EXTRA_ARGS": "extra tailscaled flags, split on whitespace",
    "TS_EXTRA_ARGS": "extra `tailscale up` or `tailscale set` flags, split on whitespace",
    "TS_USERSPACE": BOOL_FORM,
    "TS_STATE_DIR": "a directory for tailscaled state",
    "TS_ACCEPT_DNS": BOOL_FORM,
    "TS_KUBE_SECRET": "a Kubernetes Secret name",
    "TS_SOCKS5_SERVER": "a listen address host:port, e.g. :1055",
    "TS_OUTBOUND_HTTP_PROXY_LISTEN": "a listen address host:port, e.g. :1055",
    "TS_SOCKET": "a path for tailscaled's LocalAPI socket",
    "TS_AUTH_ONCE": BOOL_FORM,
    "TS_SERVE_CONFIG": "the path of a serve config JSON file",
    "TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR": "a directory holding cap-<N>.hujson files",
    "TS_HEALTHCHECK_ADDR_PORT": "ip:port, e.g. 0.0.0.0:9002 or [::]:9002",
    "TS_LOCAL_ADDR_PORT": "ip:port, e.g. 0.0.0.0:9002 or [::]:9002",
    "TS_ENABLE_METRICS": BOOL_FORM,
    "TS_ENABLE_HEALTH_CHECK": BOOL_FORM,
    "TS_DEBUG_ADDR_PORT": "ip:port, e.g. 127.0.0.1:9001",
    "TS_EXPERIMENTAL_ENABLE_FORWARDING_OPTIMIZATIONS": BOOL_FORM,
    "TS_EGRESS_PROXIES_CONFIG_PATH": "a directory",
    "TS_INGRESS_PROXIES_CONFIG_PATH": "a file path",
    "TS_EXPERIMENTAL_CERT_SHARE": BOOL_FORM,
    "TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT": BOOL_FORM,
    "TS_BOOT_TIMEOUT": "a positive duration, e.g. 60s, 2m or 1m30s",
    "TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV": BOOL_FORM,
    "EXPERIMENTAL_ALLOW_PROXYING_CLUSTER_TRAFFIC_VIA_INGRESS": BOOL_FORM,
    "POD_IP": "an IPv4 or IPv6 address",
    "POD_IPS": "at most two comma-separated addresses",
    "POD_UID": "the Pod's UID",
    "POD_NAME": "the Pod's name",
    "TS_DEBUG_FIREWALL_MODE": "iptables, nftables or auto",
    "TS_LOG_FORMAT": "text or json",
    "TS_TEST_ONLY_ROOT": "a directory (tests only)",
    "TS_TEST_FAKE_NETFILTER": BOOL_FORM + " (tests only)",
    "TS_TEST_FAKE_NETFILTER_6": BOOL_FORM + " (tests only)",
}
FILE_VARIABLES = {f"{name}_FILE": name for name in SECRETS}
# Read by tailscaled itself (inherited environment), so not unknown even though unused here.
PASSED_THROUGH = {"TS_INTERNAL_APP", "TS_STATE", "TS_PERMIT_CERT_UID", "TS_NO_LOGS_NO_SUPPORT", "TS_LOG_TARGET",
                  "TS_LOGS_DIR", "TS_CERT_SHARE_MODE", "TS_TEST_RECORD_ARGS", "TS_TEST_SOCKET",
                  # Set by operators from v1.104 for tailscaled (serve listening on every interface; the ACME
                  # account key kept in a Secret). The pinned tailscaled does not read them yet; a newer one
                  # in the image does, so they pass unchanged and without a warning.
                  "TS_SERVE_ALLOW_ALL_INTERFACES", "TS_ACME_ACCOUNT_SECRET_NAME", "TS_ACME_ACCOUNT_FIELD"}
PASSED_PREFIXES = ("TS_DEBUG_", "TS_TEST_")
# Set by the operator and read by nobody: the pinned operator still sets the name deprecated in 1.80
# (proxygroup_specs.go) beside TS_EGRESS_PROXIES_CONFIG_PATH, which is the one containerboot reads.
IGNORED = {"TS_EGRESS_SERVICES_CONFIG_PATH"}


SHOWN_CHARS = 64  # a rejected value is echoed up to this many characters
MAX_MESSAGE = 1000  # and no error line is longer than this


class ConfigError(ValueError):
    """One line for people: which variable, what it was, what would be valid."""

    def __init__(self, variable: str, message: str) -> None:
        if len(message) > MAX_MESSAGE:  # a long value in a message that did not cut it: keep both ends
            message = message[:MAX_MESSAGE * 2 // 3] + "…" + message[-MAX_MESSAGE // 3:]
        super().__init__(message)
        self.variable = variable


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """A value as quoted in an error: JSON-quoted (so one line), cut to `limit` characters."""
    if len(value) <= limit:
        return json.dumps(value)
    return f"{json.dumps(value[:limit])[:-1]}…\" ({len(value)} characters)"


def _shown(name: str, value: str) -> str:
    return "<redacted>" if name in SECRETS else shown(value)


def bad(name: str, value: str, problem: str, valid: str | None = None) -> ConfigError:
    return ConfigError(name, f"{name}={_shown(name, value)} {problem}; expected {valid or VARIABLES[name]}")


def unknown_variable_notes(env: Mapping[str, str]) -> list[str]:
    known = set(VARIABLES) | set(FILE_VARIABLES) | PASSED_THROUGH | IGNORED
    notes = []
    for name in sorted(env):
        if name.startswith("TS_") and name not in known and not name.startswith(PASSED_PREFIXES):
            import difflib  # only for a misspelt variable

            near = difflib.get_close_matches(name, sorted(set(VARIABLES) | set(FILE_VARIABLES)), n=1, cutoff=0.75)
            hint = f" (did you mean {near[0]}?)" if near else ""
            notes.append(f"[warning] {name} is not a variable containerboot reads{hint}; it is passed to "
                         "tailscaled unchanged")
    return notes

