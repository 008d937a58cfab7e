"""Logging: upstream's line shape by default, JSON lines on request (TS_LOG_FORMAT=json).

Text lines look like Go's log package with containerboot's prefix, `boot: 2026/08/22 11:19:51 <message>`,
message last, so searches written for the upstream program keep matching. Structured fields appear
only in JSON mode, where each line is one object with "time", "level" and "msg".
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, MutableMapping
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TextIO

import structlog


def _text(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(event.get("ts", time.time())))
    return f"boot: {stamp} {event['event']}"


def _json(_: Any, method: str, event: MutableMapping[str, Any]) -> str:
    ts = event.pop("ts", time.time())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"
    out = {"time": stamp + time.strftime("%z", time.localtime(ts)),
           "level": method if method != "msg" else "info", "msg": event.pop("event")}
    out.update({k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in event.items()})
    return json.dumps(out)


def _stamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("ts", time.time())
    return event


def go_duration(seconds: float) -> str:
    """A whole number of seconds as Go's time.Duration prints it: 0s, 45s, 1m5s, 1h0m0s."""
    total = int(seconds)
    h, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    return f"{m}m{sec}s" if m else f"{sec}s"


def go_list(items: Iterable[object]) -> str:
    """A slice as Go's %v prints it: [a b c]."""
    return "[" + " ".join(map(str, items)) + "]"


def go_prefixes(addrs: Iterable[IPv4Address | IPv6Address]) -> str:
    """Single addresses as the []netip.Prefix upstream prints: [100.64.0.1/32 fd7a:115c:a1e0::1/128]."""
    return go_list(f"{a}/{a.max_prefixlen}" for a in addrs)


def setup(fmt: str = "text", stream: TextIO | None = None) -> None:
    structlog.configure(
        processors=[_stamp, _json if fmt == "json" else _text],
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def info(message: str, **fields: Any) -> None:
    structlog.get_logger().info(message, **fields)


def warning(message: str, **fields: Any) -> None:
    structlog.get_logger().warning(message, **fields)


def error(message: str, **fields: Any) -> None:
    structlog.get_logger().error(message, **fields)
