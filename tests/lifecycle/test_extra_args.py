"""TS_EXTRA_ARGS against the fake CLI, which records each command line (tailscale/tailscale#18437, #20728):
flags only `tailscale set` takes reach tailscaled through `tailscale set` after login, a flag neither command
takes is one line and exit 1 before anything starts, and with TS_AUTH_ONCE=true a TS_EXTRA_ARGS changed since
the node logged in reaches it through upstream's `tailscale set`. Command lines of the cases upstream can boot
stay upstream's (test_boot.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.lab.fakes import SECRET, Root, Run


@pytest.fixture
def start(root: Root) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def _start(**env: str) -> Run:
        runs.append(Run(root.env(**env)))
        return runs[-1]

    yield _start
    for run in runs:
        run.stop()
        assert SECRET not in run.output, "the auth key appeared in the output"


@pytest.mark.parametrize(("extra", "flag"), [("--auto-updates", "--auto-updates"), ("--accept-routes false", '"false"'),
                                             (f"--authkey {SECRET} --bogus", "--bogus")])
def test_flag_neither_takes_is_one_line_before_anything_starts(root: Root, start: Callable[..., Run], extra: str,
                                                               flag: str) -> None:
    run = start(TS_EXTRA_ARGS=extra)
    assert run.wait_exit() == 1
    assert len(run.lines) == 1, run.output
    line = run.wait_contains("invalid configuration: TS_EXTRA_ARGS=")
    assert f"has {flag}" in line and "expected flags of 'tailscale up' or 'tailscale set'" in line
    assert root.args() == [], "nothing may start"
