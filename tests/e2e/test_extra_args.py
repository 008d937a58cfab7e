"""TS_EXTRA_ARGS with real tailscaled and headscale, beside upstream's Go containerboot (tailscale/tailscale#18437,
#20728): a flag only `tailscale set` takes, and an auth-once restart whose TS_EXTRA_ARGS lost --accept-routes.
Prefs are read back from tailscaled's LocalAPI (`tailscale debug prefs`)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.fakes import Run
from tests.lab.netns import IP, sh
from tests.lab.tailnet import CONTROL, Node, Tailnet
from tests.lab.tailnet_boot import READY, Booted, site

pytestmark = pytest.mark.e2e

# The flag of tailscale/tailscale#18437: `tailscale set` only (set.go), not in up.go's newUpFlagSet. The lab's
# tailscaled (a plain build) takes it; the image's, built without client updates, would refuse the pref.
SET_ONLY = "--auto-update"


def prefs(net: Tailnet, ns: str, name: str) -> dict[str, object]:
    node = Node(name, ns, "", str(net.dir / f"{name}.sock"))
    return dict(json.loads(net.cli(node, "debug", "prefs")))


def upstream(net: Tailnet, ns: str, name: str, **env: str) -> Run:
    """Upstream's containerboot (built by scripts/build-go.sh) in `ns`, as the lab boots ours."""
    return Run(net.containerboot_env(name, **env), argv=net.private_run(ns, [net.bins["containerboot-upstream"]]))


def end_leftovers(ns: str) -> None:
    """Upstream's containerboot exits on a failed `tailscale up` without stopping its tailscaled: end what is
    left in the namespace (ours, by pid), so the next boot there starts clean."""
    for pid in sh(IP, "netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_set_only_flag(net: Tailnet, boot: Callable[..., Booted]) -> None:
    extra = f"--login-server={CONTROL} {SET_ONLY}"
    ns, _, n = site(net, "setonly")
    theirs = upstream(net, ns, f"theirs{n}", TS_EXTRA_ARGS=extra)
    try:
        code = theirs.wait_exit(60)
    finally:
        theirs.stop()
        end_leftovers(ns)
    line = theirs.wait_contains("flag provided but not defined")
    print(f"\nupstream: exit {code}: {line}\n" + theirs.wait_contains("tailscale up failed"))
    assert code != 0 and line == "flag provided but not defined: -auto-update"

    ours = boot(ns, f"ours{n}", TS_EXTRA_ARGS=extra)
    said = ours.run.wait_log(f"Running 'tailscale set {SET_ONLY}': TS_EXTRA_ARGS flags 'tailscale up' does not take")
    got = prefs(net, ns, f"ours{n}")
    print(f"ours: {said}\nours: prefs AutoUpdate {got['AutoUpdate']}")
    assert got["AutoUpdate"] == {"Check": True, "Apply": True}, got["AutoUpdate"]
    assert ours.status()["BackendState"] == "Running"


@pytest.mark.parametrize("impl", ["upstream", "ours"])
def test_auth_once_restart_follows_extra_args(net: Tailnet, boot: Callable[..., Booted], tmp_path: Path,
                                              impl: str) -> None:
    ns, _, n = site(net, "once")
    name = f"once{n}"
    state = tmp_path / "state"
    state.mkdir()
    env = {"TS_AUTH_ONCE": "true", "TS_STATE_DIR": str(state)}
    before, after = f"--login-server={CONTROL} --accept-routes", f"--login-server={CONTROL}"
    route_all = []
    for extra in (before, after):
        if impl == "upstream":
            run = upstream(net, ns, name, TS_EXTRA_ARGS=extra, **env)
            try:
                run.wait_log(READY, timeout=60)
                route_all.append(prefs(net, ns, name)["RouteAll"])
            finally:
                run.stop()
                end_leftovers(ns)
        else:
            node = boot(ns, name, TS_EXTRA_ARGS=extra, **env)
            run = node.run
            route_all.append(prefs(net, ns, name)["RouteAll"])
            node.run.proc.send_signal(signal.SIGTERM)
            assert node.run.wait_exit(15) == 0
        print(f"\n{impl}: TS_EXTRA_ARGS={extra!r}: RouteAll {route_all[-1]}")
        if impl == "ours" and extra == before:
            # A login in this boot: up set everything, so nothing differs from what `up` would set (this checks
            # the reading of real prefs), and the `set` carries --accept-routes again.
            run.wait_log("TS_EXTRA_ARGS through 'tailscale set' (TS_AUTH_ONCE=true): --accept-routes")
        if impl == "ours" and extra == after:
            assert "Running 'tailscale up'" not in run.output  # the node stayed logged in
            run.wait_log("TS_EXTRA_ARGS through 'tailscale set' (TS_AUTH_ONCE=true): no flag; settings no variable "
                         "gives any more, back to 'tailscale up' defaults: --accept-routes=false")
            assert "would need a new login" not in run.output
    # Upstream's auth-once path never gives TS_EXTRA_ARGS to a logged-in node (#20728); ours does.
    assert route_all == ([True, True] if impl == "upstream" else [True, False])
