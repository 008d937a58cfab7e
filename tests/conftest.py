"""Shared test plumbing: where the project is, and how a missing prerequisite is reported.

On CI (CI=true) a missing prerequisite fails the test; elsewhere it skips, saying why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.lab.kubeapi import KubeAPI
from tests.lab.kubeapi import have_binaries as have_kube_binaries

if TYPE_CHECKING:
    from tests.lab.fakes import Root

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
IN_CI = os.environ.get("CI") == "true"


def need(condition: bool, why: str) -> None:
    if not condition:
        if IN_CI:
            pytest.fail(f"prerequisite missing on CI: {why}")
        pytest.skip(why)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root for network namespaces")
    need(shutil.which("ip") is not None, "needs iproute2")
    need(shutil.which("nft") is not None, "needs nftables (nft)")
    need(shutil.which("iptables-legacy") is not None, "needs iptables-legacy")


def containerboot_exe() -> str:
    exe = VENV_BIN / "containerboot"
    return str(exe) if exe.exists() else shutil.which("containerboot") or "containerboot"


def python_exe() -> str:
    exe = VENV_BIN / "python"
    return str(exe) if exe.exists() else "python3"


# ---- a real kube-apiserver (tests/lab/kubeapi.py), shared by the kube and e2e layers ----------------------
# `kubeapi`: one etcd and kube-apiserver for the whole session (about 3 s to start). `kns`: a fresh namespace
# for one test; it is not deleted afterwards, as deleting one would leave it Terminating (no controller-manager
# runs), and the whole server goes at the end of the session. The binaries come from scripts/build-go.sh.


@pytest.fixture(scope="session")
def kubeapi() -> Iterator[KubeAPI]:
    need(have_kube_binaries(), "needs etcd and kube-apiserver: run scripts/build-go.sh")
    with KubeAPI() as server:
        yield server


@pytest.fixture
def kns(kubeapi: KubeAPI) -> str:
    return kubeapi.create_namespace()


@pytest.fixture
def root() -> Iterator[Root]:
    """A test root laid out like upstream's, with the fake tailscaled, CLI and LocalAPI (tests/lab/fakes.py).
    Modules that need another one (extra prerequisites, real netfilter tools) define their own."""
    from tests.lab.fakes import temp_root

    with temp_root() as r:
        yield r
