"""Shared test plumbing: where the project is, and how a missing prerequisite is reported.

On CI (CI=true) a missing prerequisite fails the test; elsewhere it skips, saying why.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
