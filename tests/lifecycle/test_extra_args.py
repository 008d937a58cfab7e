"""TS_EXTRA_ARGS against the fake CLI, which records each command line (tailscale/tailscale#18437, #20728):
flags only `tailscale set` takes reach tailscaled through `tailscale set` after login, a flag neither command
takes is one line and exit 1 before anything starts, and with TS_AUTH_ONCE=true a TS_EXTRA_ARGS changed since
the node logged in reaches it through upstream's `tailscale set`. Command lines of the cases upstream can boot
stay upstream's (test_boot.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.lab.fakes import SECRET, Root, Run, netmap, state
from tests.lifecycle.test_boot import SOCK, TAILSCALED, UP, wait_args

SET = f"/usr/bin/tailscale {SOCK} set"
STATEFUL = f"/usr/bin/tailscaled {SOCK} --statedir=/var/lib --tun=userspace-networking"
READY = "Startup complete, waiting for shutdown signal"
# What real tailscaled answers for prefs after `tailscale up --accept-routes --login-server=...` (the fields read).
LOGGED_IN = {"ControlURL": "https://control.example", "RouteAll": True, "ExitNodeID": "", "ExitNodeIP": "",
             "ExitNodeAllowLANAccess": False, "CorpDNS": False, "RunSSH": False, "ShieldsUp": False,
             "AdvertiseTags": None, "Hostname": "", "AdvertiseRoutes": None, "NoSNAT": False,
             "NoStatefulFiltering": True, "NetfilterMode": 2, "AppConnector": {"Advertise": False},
             "PostureChecking": False}


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


def test_set_only_flag_goes_to_set_after_login(root: Root, start: Callable[..., Run]) -> None:
    run = start(TS_AUTHKEY=SECRET, TS_EXTRA_ARGS="--accept-routes --update-check=false --webclient")
    up = f"{UP} --authkey={SECRET} --accept-routes"  # up gets what it takes, as before
    wait_args(root, [TAILSCALED, up])
    root.api.notify(netmap(["100.64.0.1/32"]))
    wait_args(root, [TAILSCALED, up, f"{SET} --update-check=false --webclient"])
    run.wait_log("Running 'tailscale set --update-check=false --webclient': TS_EXTRA_ARGS flags 'tailscale up' "
                 "does not take")
    run.wait_log(READY)


def test_up_flags_only_keep_upstreams_command_lines(root: Root, start: Callable[..., Run]) -> None:
    run = start(TS_AUTHKEY=SECRET, TS_EXTRA_ARGS="--login-server=https://control.example --accept-routes "
                                                 "--advertise-tags tag:proxy")
    root.api.notify(netmap(["100.64.0.1/32"]))
    run.wait_log(READY)
    assert root.args() == [TAILSCALED, f"{UP} --authkey={SECRET} --login-server=https://control.example "
                                       "--accept-routes --advertise-tags tag:proxy"]  # and no `tailscale set`


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


def test_auth_once_restart_applies_a_changed_extra_args(root: Root, start: Callable[..., Run]) -> None:
    # The node logged in with --accept-routes at an earlier start; now TS_EXTRA_ARGS no longer has it and
    # asks for a set-only flag: no login, so upstream's `tailscale set` carries both.
    root.api.prefs = dict(LOGGED_IN)
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(TS_AUTHKEY=SECRET, TS_AUTH_ONCE="true", TS_STATE_DIR="/var/lib", TS_HOSTNAME="h",
                TS_EXTRA_ARGS="--login-server=https://control.example --update-check=false")
    run.wait_log(READY)
    assert root.args() == [STATEFUL, f"{SET} --accept-dns=false --hostname=h --update-check=false "
                                     "--accept-routes=false"]
    run.wait_log("TS_EXTRA_ARGS through 'tailscale set' (TS_AUTH_ONCE=true): --update-check=false; settings no "
                 "variable gives any more, back to 'tailscale up' defaults: --accept-routes=false")
    run.wait_log("Running 'tailscale set'")
    assert "would need a new login" not in run.output  # same login server, no tags


def test_auth_once_names_what_needs_a_new_login(root: Root, start: Callable[..., Run]) -> None:
    root.api.prefs = dict(LOGGED_IN)
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(TS_AUTH_ONCE="true", TS_STATE_DIR="/var/lib",
                TS_EXTRA_ARGS="--login-server=https://other.example --advertise-tags=proxy --force-reauth "
                              "--accept-routes")
    run.wait_log(READY)
    assert root.args() == [STATEFUL, f"{SET} --accept-dns=false --accept-routes"]  # up-only flags: not to set
    run.wait_log("[warning] TS_EXTRA_ARGS --force-reauth, --login-server=https://other.example (the node's is "
                 "https://control.example), --advertise-tags=tag:proxy (the node's: none): would need a new login, "
                 "which TS_AUTH_ONCE=true makes only when the node needs one; not applied (TS_AUTH_ONCE=false runs "
                 "'tailscale up' at every start)")


def test_auth_once_login_in_this_boot_needs_no_warning(root: Root, start: Callable[..., Run]) -> None:
    run = start(TS_AUTHKEY=SECRET, TS_AUTH_ONCE="true", TS_EXTRA_ARGS="--force-reauth --update-check=false")
    wait_args(root, [TAILSCALED])
    root.api.notify(state("NeedsLogin"))
    wait_args(root, [TAILSCALED, f"{UP} --authkey={SECRET} --force-reauth"])
    root.api.notify(netmap(["100.64.0.1/32"]))
    wait_args(root, [TAILSCALED, f"{UP} --authkey={SECRET} --force-reauth",
                     f"{SET} --accept-dns=false --update-check=false"])
    run.wait_log(READY)
    assert "would need a new login" not in run.output


def test_auth_once_with_unknown_prefs_changes_only_what_is_given(root: Root, start: Callable[..., Run]) -> None:
    # Upstream's fake answers {} for prefs: nothing is known, so nothing is put back.
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(TS_AUTH_ONCE="true", TS_STATE_DIR="/var/lib", TS_EXTRA_ARGS="--shields-up")
    run.wait_log(READY)
    assert root.args() == [STATEFUL, f"{SET} --accept-dns=false --shields-up"]
    run.wait_log("TS_EXTRA_ARGS through 'tailscale set' (TS_AUTH_ONCE=true): --shields-up")
