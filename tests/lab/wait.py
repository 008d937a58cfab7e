"""Waiting in tests: `wait_for` polls a condition until it holds or the time is up.

The one poll loop of the test suite; the labs build on it (e.g. `Cluster.wait_for`, which raises instead).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(fn: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Call `fn` every `interval` seconds until it returns something truthy, at most `timeout` seconds;
    its last value (falsy when the time ran out)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
