"""System resolver lookups for TS_EXPERIMENTAL_DEST_DNS_NAME."""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading

from firewall.model import IPAddress, addr_key

LOOKUP_TIMEOUT = 5.0

_busy = threading.Lock()  # at most one lookup thread at a time, however slow the resolver


class ResolveError(OSError):
    pass


def lookup_bounded(name: str, timeout: float = LOOKUP_TIMEOUT) -> tuple[IPAddress, ...]:
    """`lookup` with a bound: getaddrinfo cannot be interrupted or timed out, so it runs in a thread of
    its own and the caller waits at most `timeout` (a signal handler may raise out of the wait). A lookup
    still running from an earlier call is not doubled: the call fails at once and is retried later."""
    if not _busy.acquire(blocking=False):
        raise ResolveError(f"the previous lookup of {name} has not finished yet")
    answer: queue.SimpleQueue[tuple[IPAddress, ...] | Exception] = queue.SimpleQueue()

    def work() -> None:
        try:
            answer.put(lookup(name))
        except Exception as exc:  # noqa: BLE001 - carried to the waiting caller
            answer.put(exc)
        finally:
            _busy.release()

    threading.Thread(target=work, name="dns-lookup", daemon=True).start()
    try:
        got = answer.get(timeout=timeout)
    except queue.Empty:
        raise ResolveError(f"no answer for {name} within {timeout:g}s") from None
    if isinstance(got, Exception):
        raise got
    return got


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
