"""The soak layer: containerboot left running for minutes against a real tailnet while someone keeps removing
its rules, with its threads, file descriptors, memory and children sampled from /proc (tests/lab/procfs.py).

The tailnet lab (headscale, a client node, `boot`) is the e2e layer's (tests/lab/tailnet_boot.py), imported
here so that the two layers share one definition. How long and the hard deadline: tests/soak/test_soak.py.
"""

from __future__ import annotations

import pytest

from tests.lab.tailnet_boot import boot, client, net  # noqa: F401 - fixtures, shared with the e2e layer


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: a long run of containerboot (SOAK_SECONDS, short without it)")
