"""Fixtures for the netns layer: `lab`, namespaces of one test, removed with everything started in them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import need_root
from tests.lab.netns import Lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    need_root()
    lab = Lab("x")
    try:
        yield lab
    finally:
        lab.close()
