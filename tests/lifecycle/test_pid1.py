"""containerboot as PID 1 of its own PID namespace, as in a container.

A PID 1 that reaps with waitpid(-1) steals the exit statuses `subprocess` waits for, and a
failing `tailscale up` then looks like success. These tests run the real program as PID 1 with a
CLI that fails after a moment, and signal it from outside as a container runtime does.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.lab.fakes import SECRET, Root, Run, child_pid, netmap, temp_root
from tests.lab.wait import wait_for

SLOW_FAILING_CLI = """#!/usr/bin/env bash
echo "$0 $@" >> "$TS_TEST_RECORD_ARGS"
( sleep 0.1 ) &   # a grandchild that outlives nothing in particular
sleep 0.5
exit 3
"""


@pytest.fixture
def root() -> Iterator[Root]:
    need(os.geteuid() == 0 and shutil.which("unshare") is not None, "needs root and unshare for a PID namespace")
    with temp_root() as r:
        yield r


def as_pid1(root: Root, **env: str) -> Run:
    return Run(root.env(**env), prefix=["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"])


def pid1_of(run: Run) -> int:
    """The host pid of the namespace's PID 1 (the child of `unshare`)."""
    def find() -> int | None:
        for pid in os.listdir("/proc"):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == run.proc.pid:
                return int(pid)
        return None
    return int(wait_for(find))


def test_subprocess_sees_true_exit_status_beside_the_reaper(root: Root) -> None:
    root.write("usr/bin/tailscale", SLOW_FAILING_CLI)
    run = as_pid1(root, TS_AUTHKEY=SECRET)
    try:
        assert run.wait_exit(20) == 1
        run.wait_log("failed to auth tailscale: tailscale up failed: exit status 3")
    finally:
        run.stop()
    assert SECRET not in run.output


def test_sigterm_to_pid1_exits_0(root: Root) -> None:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = as_pid1(root)
    try:
        run.wait_log("Startup complete, waiting for shutdown signal")
        os.kill(pid1_of(run), signal.SIGTERM)
        assert run.wait_exit(15) == 0
        run.wait_log("Sending SIGTERM to tailscaled")
    finally:
        run.stop()


def test_sigkill_of_tailscaled_under_pid1_exits_nonzero(root: Root) -> None:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = as_pid1(root)
    try:
        run.wait_log("Startup complete, waiting for shutdown signal")
        os.kill(child_pid(pid1_of(run), "tailscaled"), signal.SIGKILL)
        assert run.wait_exit(15) == 128 + signal.SIGKILL
        run.wait_contains("tailscaled exited unexpectedly (killed by SIGKILL)")
    finally:
        run.stop()
