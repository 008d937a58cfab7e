"""Logging: upstream's line shape by default, JSON lines on request (TS_LOG_FORMAT=json).

Text lines look like Go's log package with containerboot's prefix, `boot: 2026/08/22 11:19:51 <message>`,
message last, so searches written for the upstream program keep matching. Structured fields appear
only in JSON mode, where each line is one object with "time", "level" and "msg".
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import MutableMapping
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
