"""Logging: upstream's line shape by default, JSON lines on request (TS_LOG_FORMAT=json).

Text lines look like Go's log package with containerboot's prefix, `boot: 2026/08/22 11:19:51 <message>`,
message last, so searches written for the upstream program keep matching. Structured fields appear
only in JSON mode, where each line is one object with "time", "level" and "msg".

Written with the standard library alone: structlog, used before, cost 11 MiB of resident memory and
~40 ms of start-up on the boot path (it imports asyncio and more) for two fixed line formats.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TextIO

_format = "text"
_stream: TextIO | None = None  # None: sys.stderr at the time of writing
_lock = threading.Lock()  # lines from the reader threads and the main thread never interleave


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
    global _format, _stream
    _format = "json" if fmt == "json" else "text"
    _stream = stream


def _text(ts: float, message: str) -> str:
    return f"boot: {time.strftime('%Y/%m/%d %H:%M:%S', time.localtime(ts))} {message}"


def _json(ts: float, level: str, message: str, fields: dict[str, Any]) -> str:
    local = time.localtime(ts)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{int(ts % 1 * 1000):03d}" + time.strftime("%z", local)
    out: dict[str, Any] = {"time": stamp, "level": level, "msg": message}
    out.update({k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in fields.items()})
    return json.dumps(out)


def _emit(level: str, message: str, fields: dict[str, Any]) -> None:
    ts = time.time()
    line = _json(ts, level, message, fields) if _format == "json" else _text(ts, message)
    stream = _stream or sys.stderr
    with _lock:
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not end the program


def info(message: str, **fields: Any) -> None:
    _emit("info", message, fields)


def warning(message: str, **fields: Any) -> None:
    _emit("warning", message, fields)


def error(message: str, **fields: Any) -> None:
    _emit("error", message, fields)
