"""TS_* environment -> one frozen Settings (pure: the environment and files are inputs).

Upstream's variables, defaults, validation order and messages, plus what upstream lacks: a
malformed address, prefix, ip:port, boolean or duration is an error instead of a silent default,
`<SECRET>_FILE` reads a secret from a file, and an unknown TS_* variable draws a warning naming the
nearest known one. Every error is a ConfigError: one line naming the variable, the value given
(never a secret's) and what would be valid.
"""

from __future__ import annotations

import ipaddress
import json
import os
import posixpath
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from firewall.model import IPAddress

# tailcfg.CurrentCapabilityVersion of the pinned tailscale (versions.env); picks cap-<N>.hujson.
CAPABILITY_VERSION = 142

BOOL_TRUE = {"1", "t", "T", "TRUE", "true", "True", "yes", "Yes", "YES", "on", "On", "ON"}
BOOL_FALSE = {"0", "f", "F", "FALSE", "false", "False", "no", "No", "NO", "off", "Off", "OFF"}
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
    "TS_EXTRA_ARGS": "extra `tailscale up` flags, split on whitespace",
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
                  "TS_LOGS_DIR", "TS_CERT_SHARE_MODE", "TS_TEST_RECORD_ARGS", "TS_TEST_SOCKET"}
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


# ---- value parsers (each: str -> value, raising ValueError with the problem) -------------------------


def parse_bool(text: str) -> bool:
    if text in BOOL_TRUE:
        return True
    if text in BOOL_FALSE:
        return False
    raise ValueError("is not a boolean")


_UNITS_NS = {"ns": 1, "us": 1000, "µs": 1000, "μs": 1000, "ms": 1_000_000, "s": 1_000_000_000,
             "m": 60_000_000_000, "h": 3_600_000_000_000}
_DIGITS = "0123456789"
_MAX_NS = 1 << 63  # Go's Duration is an int64 of nanoseconds: at most 2562047h47m16.854775807s


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration (same grammar, same overflow rule), in seconds."""
    body = text[1:] if text[:1] in ("+", "-") else text
    negative = text.startswith("-")
    if body == "0":
        return 0.0
    if not body:
        raise ValueError("is not a duration")
    total = 0
    while body:
        if body[0] != "." and body[0] not in _DIGITS:
            raise ValueError("is not a duration")
        i = 0
        whole = 0
        while i < len(body) and body[i] in _DIGITS:
            whole = whole * 10 + _DIGITS.index(body[i])
            if whole > _MAX_NS:
                raise ValueError("is out of range (at most 2562047h47m16.854775807s)")
            i += 1
        pre, body = i > 0, body[i:]
        frac, scale, post = 0, 1.0, False
        if body[:1] == ".":
            body = body[1:]
            i, overflow = 0, False
            while i < len(body) and body[i] in _DIGITS:
                if not overflow:
                    nxt = frac * 10 + _DIGITS.index(body[i])
                    if nxt > _MAX_NS:
                        overflow = True
                    else:
                        frac, scale = nxt, scale * 10
                i += 1
            post, body = i > 0, body[i:]
        if not pre and not post:
            raise ValueError("is not a duration")
        i = 0
        while i < len(body) and body[i] != "." and body[i] not in _DIGITS:
            i += 1
        unit = _UNITS_NS.get(body[:i])
        if unit is None:
            raise ValueError("is not a duration" if i else "is not a duration (a number needs a unit: ns, us, ms, "
                                                            "s, m or h)")
        body = body[i:]
        if whole > _MAX_NS // unit:
            raise ValueError("is out of range (at most 2562047h47m16.854775807s)")
        value = whole * unit
        if frac:
            value += int(float(frac) * (float(unit) / scale))
        total += value
        if value > _MAX_NS or total > _MAX_NS:
            raise ValueError("is out of range (at most 2562047h47m16.854775807s)")
    if not negative and total > _MAX_NS - 1:
        raise ValueError("is out of range (at most 2562047h47m16.854775807s)")
    return (-total if negative else total) / 1e9


def parse_ip(text: str) -> IPAddress:
    if text != text.strip() or "/" in text or "%" in text:
        raise ValueError("is not an IP address")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("is not an IP address") from None


def parse_host_ip(text: str) -> IPAddress:
    """An address one host can have: parse_ip, and not unspecified (0.0.0.0, ::), the IPv4 broadcast
    address or a multicast address."""
    addr = parse_ip(text)
    if addr.is_unspecified:
        raise ValueError("is the unspecified address, not one host's")
    if addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError("is the broadcast address, not one host's")
    if addr.is_multicast:
        raise ValueError("is a multicast address, not one host's")
    return addr


def parse_addr_port(text: str) -> tuple[IPAddress, int]:
    """Go's netip.ParseAddrPort: an IP literal (IPv6 in brackets) and a port."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("is not ip:port")
        addr = parse_ip(host.split("%", 1)[0])
        if addr.version != 6:
            raise ValueError("has brackets around a non-IPv6 address")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("is not ip:port (IPv6 needs brackets, e.g. [::]:9002)")
        addr = parse_ip(host)
        if addr.version != 4:
            raise ValueError("is not ip:port")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError("has no valid port")
    return addr, int(port)


def parse_listen(text: str) -> str:
    """A Go listen address: [host]:port where the host may be empty or a name."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("is not host:port")
    if host.startswith("["):
        parse_addr_port(text)
    elif ":" in host:
        raise ValueError("is not host:port (IPv6 needs brackets)")
    return text


def parse_prefixes(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for part in text.split(","):
        if "/" not in part or part != part.strip():
            raise ValueError(f"has {shown(part)}, which is not a CIDR prefix")
        try:
            out.append(ipaddress.ip_network(part, strict=True))
        except ValueError:
            try:
                net = ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"has {shown(part)}, which is not a CIDR prefix") from None
            raise ValueError(f"has {part}, which has host bits set (did you mean {net}?)") from None
    return tuple(out)


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def parse_dns_name(text: str) -> str:
    if len(text) > 254 or not _DNS_NAME.fullmatch(text):
        raise ValueError("is not a DNS name")
    return text


def parse_hujson(text: str) -> object:
    """HuJSON (JSON with comments and trailing commas) -> a JSON value."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else n
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(c)
            i += 1
    return json.loads(re.sub(r",(\s*[}\]])", r"\1", "".join(out)))


# Fields of ipn.ConfigVAlpha in the pinned tailscale; tailscaled rejects others.
CONFIG_FIELDS = {f.lower() for f in (
    "Version Locked ServerURL AuthKey Enabled OperatorUser Hostname AcceptDNS AcceptRoutes ExitNode "
    "AllowLANWhileUsingExitNode AdvertiseRoutes AdvertiseExitNode DisableSNAT AdvertiseServices AppConnector "
    "NetfilterMode NoStatefulFiltering PostureChecking RunSSHServer RunWebClient ShieldsUp RemoteConfig "
    "AutoUpdate ServeConfigTemp StaticEndpoints RelayServerPort RelayServerStaticEndpoints").split()}


# ---- Settings --------------------------------------------------------------------------------------


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
        file_var = f"{name}_FILE"
        path = self.env.get(file_var, "")
        if not path:
            value = self.env.get(name, "")
            if value:
                problem = token_problem(value)
                if problem:
                    raise ConfigError(name, f"{name}=<redacted> {problem}; expected {VARIABLES[name]}")
            return value.strip()
        if self.env.get(name):
            raise ConfigError(file_var, f"{name} and {file_var} are both set; set only one of them")
        where = f"{file_var}={shown(path)}"
        try:
            value = read_file(path)
        except SecretFileError as exc:
            raise ConfigError(file_var, f"{where} {exc}; expected the path of a regular file of at most "
                                        f"{MAX_SECRET_BYTES} bytes holding {name}") from None
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(file_var, f"{where} cannot be read ({reason}); "
                                        f"expected the path of a readable file holding {name}") from None
        if not value.strip():
            raise ConfigError(file_var, f"{where} is an empty file; expected a file holding {name}")
        problem = token_problem(value)
        if problem:
            raise ConfigError(file_var, f"{where}: the file {problem}; expected a file holding {name} and "
                                        "nothing else (one token, surrounding whitespace ignored)")
        return value.strip()


MAX_SECRET_BYTES = 65536


class SecretFileError(ValueError):
    """A secret file that is no regular file or too large (the text says which; never the content)."""


def token_problem(value: str) -> str:
    """Why `value` does not look like one secret token, or "" (pure; never quotes the value).
    Surrounding whitespace is ignored; inside, only printable ASCII without spaces."""
    token = value.strip()
    if not token:
        return "is blank (only whitespace)"
    if len(token) > MAX_SECRET_BYTES:
        return f"is longer than {MAX_SECRET_BYTES} bytes"
    if any(c.isspace() for c in token):
        lines = len(token.splitlines())
        return f"holds {lines} lines, not one token" if lines > 1 else "has whitespace inside, not one token"
    if not all("!" <= c <= "~" for c in token):
        return "has characters other than printable ASCII, not one token"
    return ""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_secret_file(path: str) -> str:
    """A secret file's text: a regular file (or a symlink to one, as Kubernetes mounts Secrets) of at
    most MAX_SECRET_BYTES. Opened without blocking, so a FIFO or a device cannot hang us; raises
    SecretFileError naming the problem (never the content), OSError when it cannot be opened or read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
            raise SecretFileError(f"is {kind}, not a regular file")
        data = b""
        while len(data) <= MAX_SECRET_BYTES:
            chunk = os.read(fd, MAX_SECRET_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) > MAX_SECRET_BYTES:
            raise SecretFileError(f"is larger than {MAX_SECRET_BYTES} bytes")
    finally:
        os.close(fd)
    return data.decode("latin-1")  # every byte maps to one character; token_problem rejects non-ASCII


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


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


def _accept_dns(base: bool, extra: str, given: bool | None) -> tuple[bool | None, str, list[str]]:
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


CONFIG_DIR = "TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR"


def _config_error(cfg_dir: str, message: str) -> ConfigError:
    """Upstream's message, then the variable, its value and the valid form."""
    return ConfigError(CONFIG_DIR, f"{message} ({CONFIG_DIR}={json.dumps(cfg_dir)}; expected "
                                   f"{VARIABLES[CONFIG_DIR]})")


def _config_file(cfg_dir: str) -> tuple[str, str]:
    """The cap-<N>.hujson to use (largest N not above our capability version), and the log line.
    The directory is used as given, like upstream: the test root applies only to fixed system paths."""
    real = cfg_dir
    try:
        names = os.listdir(real)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise _config_error(cfg_dir, f"error reading tailscaled config directory {json.dumps(cfg_dir)}: "
                                     f"{reason}") from None
    best = -1
    for name in names:
        if os.path.isdir(os.path.join(real, name)):
            continue
        m = re.fullmatch(r"cap-(\d+)\.hujson", name)
        cap = int(m.group(1)) if m else (0 if name == "tailscaled" else -1)
        if best < cap <= CAPABILITY_VERSION:
            best = cap
    if best < 0:
        raise _config_error(cfg_dir, f"no tailscaled config file found in {json.dumps(cfg_dir)} for current "
                                     f"capability version {CAPABILITY_VERSION}")
    path = posixpath.normpath(posixpath.join(cfg_dir, f"cap-{best}.hujson"))
    return path, f"Using tailscaled config file {json.dumps(path)} to match current capability version {best}"


def _check_config_file(cfg_dir: str, path: str) -> None:
    real = path
    contents = "error validating tailscaled configfile contents"
    try:
        doc = parse_hujson(_read_text(real))
    except OSError as exc:
        raise _config_error(cfg_dir, f"error validating whether tailscaled config directory "
                                     f"{json.dumps(posixpath.dirname(path))} contains tailscaled config for current "
                                     f"capability version {json.dumps(posixpath.basename(path))}: {exc.strerror}. "
                                     "If this is a Tailscale Kubernetes operator proxy, please ensure that the "
                                     "version of the operator is not older than the version of the proxy") from None
    except (ValueError, RecursionError) as exc:
        raise _config_error(cfg_dir, f"{contents}: {exc}") from None
    if not isinstance(doc, dict):
        raise _config_error(cfg_dir, f"{contents}: not a JSON object")
    unknown = sorted(k for k in doc if k.lower() not in CONFIG_FIELDS)
    if unknown:
        raise _config_error(cfg_dir, f"{contents}: unknown field {unknown[0]!r}")
    version = next((v for k, v in doc.items() if k.lower() == "version"), None)
    if version != "alpha0":
        raise _config_error(cfg_dir, f'{contents}: unsupported Version {json.dumps(version)}, want "alpha0"')


def _pod_ips(text: str) -> tuple[IPAddress, ...]:
    parts = text.split(",")
    if len(parts) > 2:
        raise ValueError(f"has {len(parts)} addresses (POD_IPs can contain at most 2 IPs)")
    out: list[IPAddress] = []
    for part in parts:
        try:
            out.append(parse_ip(part))
        except ValueError:
            raise ValueError(f"has {shown(part)}, which is not an IP address") from None
    return tuple(out)


def load(env: Mapping[str, str], read_file: Callable[[str], str] = read_secret_file) -> Settings:
    """Parse and validate; raises ConfigError (the first problem, in upstream's order)."""
    e = _Env(env)
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
    accept_dns, extra, dns_notes = _accept_dns(bool(accept_dns_given), e.text("TS_EXTRA_ARGS"), accept_dns_given)
    notes += dns_notes
    mode = e.text("TS_DEBUG_FIREWALL_MODE").strip().lower()
    if mode not in ("", "auto", "iptables", "nftables"):
        raise bad("TS_DEBUG_FIREWALL_MODE", env["TS_DEBUG_FIREWALL_MODE"], "is not a firewall mode")
    log_format = e.text("TS_LOG_FORMAT", "text").lower()
    if log_format not in ("text", "json"):
        raise bad("TS_LOG_FORMAT", env["TS_LOG_FORMAT"], "is not a log format")
    kube_secret = env.get("TS_KUBE_SECRET", "tailscale") if in_k8s else e.text("TS_KUBE_SECRET")
    for name in ("TS_SOCKS5_SERVER", "TS_OUTBOUND_HTTP_PROXY_LISTEN"):
        e.parsed(name, parse_listen, "")
    boot_timeout = e.parsed("TS_BOOT_TIMEOUT", parse_duration, 60.0)
    if boot_timeout <= 0:
        raise bad("TS_BOOT_TIMEOUT", env["TS_BOOT_TIMEOUT"], "is not positive")
    no_ips: tuple[IPAddress, ...] = ()
    pod_ips = e.parsed("POD_IPS", _pod_ips, no_ips)
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

    config_dir = e.text("TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR")
    config_file = ""
    if config_dir:
        config_file, line = _config_file(config_dir)
        notes.append(line)

    s = Settings(
        authkey=authkey,
        client_id=e.text("TS_CLIENT_ID"),
        client_secret=client_secret,
        id_token=id_token,
        audience=e.text("TS_AUDIENCE"),
        hostname=e.text("TS_HOSTNAME"),
        routes=routes,
        route_prefixes=route_prefixes,
        dest_ip=e.parsed("TS_DEST_IP", parse_host_ip, None),
        dest_dns_name=e.parsed("TS_EXPERIMENTAL_DEST_DNS_NAME", parse_dns_name, ""),
        tailnet_target_ip=e.parsed("TS_TAILNET_TARGET_IP", parse_host_ip, None),
        tailnet_target_fqdn=e.parsed("TS_TAILNET_TARGET_FQDN", parse_dns_name, ""),
        tailscaled_extra_args=tuple(e.text("TS_TAILSCALED_EXTRA_ARGS").split()),
        extra_args=tuple(extra.split()),
        userspace=userspace,
        state_dir=e.text("TS_STATE_DIR"),
        accept_dns=accept_dns,
        kube_secret=kube_secret,
        socks5_server=e.text("TS_SOCKS5_SERVER"),
        outbound_http_proxy_listen=e.text("TS_OUTBOUND_HTTP_PROXY_LISTEN"),
        socket=e.text("TS_SOCKET", "/tmp/tailscaled.sock"),
        auth_once=e.flag("TS_AUTH_ONCE"),
        serve_config=e.text("TS_SERVE_CONFIG"),
        config_dir=config_dir,
        config_file=config_file,
        healthcheck_addr_port=e.text("TS_HEALTHCHECK_ADDR_PORT"),
        local_addr_port=local,
        enable_metrics=e.flag("TS_ENABLE_METRICS"),
        enable_health_check=e.flag("TS_ENABLE_HEALTH_CHECK"),
        debug_addr_port=e.text("TS_DEBUG_ADDR_PORT"),
        enable_forwarding_optimizations=e.flag("TS_EXPERIMENTAL_ENABLE_FORWARDING_OPTIMIZATIONS"),
        egress_proxies_config_path=e.text("TS_EGRESS_PROXIES_CONFIG_PATH"),
        ingress_proxies_config_path=e.text("TS_INGRESS_PROXIES_CONFIG_PATH"),
        cert_share=e.flag("TS_EXPERIMENTAL_CERT_SHARE"),
        service_auto_advertisement=e.flag("TS_EXPERIMENTAL_SERVICE_AUTO_ADVERTISEMENT", True),
        boot_timeout=boot_timeout,
        kube_api_from_env=e.flag("TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV"),
        allow_cluster_traffic_via_ingress=e.flag("EXPERIMENTAL_ALLOW_PROXYING_CLUSTER_TRAFFIC_VIA_INGRESS"),
        pod_ip=e.parsed("POD_IP", parse_ip, None),
        pod_ips=pod_ips,
        pod_uid=e.text("POD_UID"),
        pod_name=e.text("POD_NAME"),
        in_kubernetes=in_k8s,
        firewall_mode=mode,
        log_format=log_format,
        root=root,
        fake_netfilter=e.flag("TS_TEST_FAKE_NETFILTER"),
        fake_netfilter_6=e.flag("TS_TEST_FAKE_NETFILTER_6", True),
        notes=tuple(notes),
    )
    return _validate(s)


def _validate(s: Settings) -> Settings:
    """Upstream's cross-variable checks, in its order and with its messages (plus the fix)."""
    user = f"(TS_USERSPACE={str(s.userspace).lower()}; set TS_USERSPACE=false for kernel networking)"
    fail = ConfigError

    if s.config_file:
        _check_config_file(s.config_dir, s.config_file)
    if s.dest_ip and s.userspace:
        raise fail("TS_DEST_IP", f"TS_DEST_IP is not supported with TS_USERSPACE {user}")
    if s.dest_dns_name and s.userspace:
        raise fail("TS_EXPERIMENTAL_DEST_DNS_NAME",
                   f"TS_EXPERIMENTAL_DEST_DNS_NAME is not supported with TS_USERSPACE {user}")
    if s.dest_dns_name and s.dest_ip:
        raise fail("TS_EXPERIMENTAL_DEST_DNS_NAME", "TS_EXPERIMENTAL_DEST_DNS_NAME and TS_DEST_IP cannot both be set")
    if s.tailnet_target_ip and s.userspace:
        raise fail("TS_TAILNET_TARGET_IP", f"TS_TAILNET_TARGET_IP is not supported with TS_USERSPACE {user}")
    if s.tailnet_target_fqdn and s.userspace:
        raise fail("TS_TAILNET_TARGET_FQDN", f"TS_TAILNET_TARGET_FQDN is not supported with TS_USERSPACE {user}")
    if s.tailnet_target_fqdn and s.tailnet_target_ip:
        raise fail("TS_TAILNET_TARGET_FQDN",
                   "Both TS_TAILNET_TARGET_IP and TS_TAILNET_FQDN cannot be set (set TS_TAILNET_TARGET_IP or "
                   "TS_TAILNET_TARGET_FQDN, not both)")
    if s.config_dir and (s.accept_dns is not None or s.authkey or s.routes is not None or s.extra_args
                         or s.hostname or s.client_id or s.client_secret or s.id_token or s.audience):
        raise fail(CONFIG_DIR,
                   "TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR cannot be set in combination with TS_HOSTNAME, "
                   "TS_EXTRA_ARGS, TS_AUTHKEY, TS_ROUTES, TS_ACCEPT_DNS, TS_CLIENT_ID, TS_CLIENT_SECRET, "
                   "TS_ID_TOKEN, TS_AUDIENCE.")
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
            raise fail(var, msg)
    flag = "EXPERIMENTAL_ALLOW_PROXYING_CLUSTER_TRAFFIC_VIA_INGRESS"
    if s.allow_cluster_traffic_via_ingress:
        if s.userspace:
            raise fail(flag, f"{flag} is not supported in userspace mode {user}")
        if not s.serve_config:
            raise fail(flag, f"{flag} is set but this is not a cluster ingress proxy (TS_SERVE_CONFIG is not set)")
        if not s.pod_ip:
            raise fail(flag, f"{flag} is set but POD_IP is not set")
    if s.enable_forwarding_optimizations and s.userspace:
        raise fail("TS_EXPERIMENTAL_ENABLE_FORWARDING_OPTIMIZATIONS",
                   f"TS_EXPERIMENTAL_ENABLE_FORWARDING_OPTIMIZATIONS is not supported in userspace mode {user}")
    notes = list(s.notes)
    if s.healthcheck_addr_port:
        notes.append("[warning] TS_HEALTHCHECK_ADDR_PORT is deprecated and will be removed in 1.82.0. Please use "
                     "TS_ENABLE_HEALTH_CHECK and optionally TS_LOCAL_ADDR_PORT instead.")
    if s.enable_health_check and s.healthcheck_addr_port:
        raise fail("TS_HEALTHCHECK_ADDR_PORT",
                   "TS_HEALTHCHECK_ADDR_PORT is deprecated and will be removed in 1.82.0, use "
                   "TS_ENABLE_HEALTH_CHECK and optionally TS_LOCAL_ADDR_PORT")
    in_kube_store = s.in_kubernetes and bool(s.kube_secret)
    if s.egress_proxies_config_path and not in_kube_store:
        raise fail("TS_EGRESS_PROXIES_CONFIG_PATH",
                   "TS_EGRESS_PROXIES_CONFIG_PATH is only supported for Tailscale running on Kubernetes")
    if s.ingress_proxies_config_path and not in_kube_store:
        raise fail("TS_INGRESS_PROXIES_CONFIG_PATH",
                   "TS_INGRESS_PROXIES_CONFIG_PATH is only supported for Tailscale running on Kubernetes")
    if s.state_dir == "" and not s.kube_secret and not s.config_dir and (s.authkey or s.client_secret):
        notes.append("[warning] TS_STATE_DIR is not set: node state is kept in memory, so every restart "
                     "registers a new device; mount a volume and set TS_STATE_DIR to keep the node")
    return replace(s, notes=tuple(notes))
