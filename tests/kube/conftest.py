"""Fixtures for tests against a real kube-apiserver (tests/lab/kubeapi.py).

`kubeapi`: one etcd and kube-apiserver for the whole session (about 3 s to start). `kns`: a fresh namespace
for one test; it is not deleted afterwards, as deleting one would leave it Terminating (no controller-manager
runs), and the whole server goes at the end of the session. Mark tests `kube`.
The binaries come from scripts/build-go.sh (`make test` runs it first); without them the tests skip, or fail
on CI.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import need
from tests.lab.kubeapi import KubeAPI, have_binaries


@pytest.fixture(scope="session")
def kubeapi() -> Iterator[KubeAPI]:
    need(have_binaries(), "needs etcd and kube-apiserver: run scripts/build-go.sh")
    with KubeAPI() as server:
        yield server


@pytest.fixture
def kns(kubeapi: KubeAPI) -> str:
    return kubeapi.create_namespace()
