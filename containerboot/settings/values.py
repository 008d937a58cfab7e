"""One variable's text -> its value, each parser pure: str in, value out, or ValueError with the problem.

Stricter than upstream where upstream silently falls back to a default: a boolean, a Go duration, an IP
address, ip:port, a listen address, CIDR prefixes, a DNS name, HuJSON. Apart from __init__.py because
these know nothing of variables or of each other's order: the loader names the variable in the error
(`bad`), and other modules (the subcommands, the config dir watch, the health endpoint) parse with them.
"""

from __future__ import annotations

import ipaddress
import json
import re

from containerboot.settings.variables import shown
from firewall.model import IPAddress

BOOL_TRUE = {"1", "t", "T", "TRUE", "true", "True", "yes", "Yes", "YES", "on", "On", "ON"}
BOOL_FALSE = {"0", "f", "F", "FALSE", "false", "False", "no", "No", "NO", "off", "Off", "OFF"}


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


def parse_pod_ips(text: str) -> tuple[IPAddress, ...]:
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
