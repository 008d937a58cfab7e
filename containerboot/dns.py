"""System resolver lookups for TS_EXPERIMENTAL_DEST_DNS_NAME."""

from __future__ import annotations

import ipaddress
import socket

from firewall.model import IPAddress, addr_key


class ResolveError(OSError):
    pass


def lookup(name: str) -> tuple[IPAddress, ...]:
    """IPv4 and IPv6 addresses of `name`; "not found" for one family is not an error."""
    found: set[IPAddress] = set()
    errors = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = socket.getaddrinfo(name, None, fam, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno not in (socket.EAI_NONAME, socket.EAI_NODATA, getattr(socket, "EAI_ADDRFAMILY", -9)):
                errors.append(f"error looking up IPv{4 if fam == socket.AF_INET else 6} addresses: {exc}")
            continue
        found |= {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
    if errors:
        raise ResolveError("; ".join(errors))
    if not found:
        raise ResolveError(f"no IPv4 or IPv6 addresses found for host: {name}")
    return tuple(sorted(found, key=addr_key))
