"""What the boot follows after startup, against the fake LocalAPI: a dropped IPN bus stream is reopened,
and a tailscaled config published the way kubelet publishes a mounted Secret is reloaded."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.lab.fakes import Root, Run, kubelet_publish, netmap
from tests.lab.wait import wait_for


@pytest.fixture
def start(root: Root) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def _start(**env: str) -> Run:
        run = Run(root.env(**env))
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.stop()


def test_dropped_bus_stream_is_reopened_and_followed(root: Root, start: Callable[..., Run]) -> None:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(TS_USERSPACE="false", TS_DEST_IP="10.0.0.9")
    run.wait_log("Startup complete, waiting for shutdown signal")
    run.wait_contains("firewall: 2 rules live in")
    root.api.restart(down=0.5)
    run.wait_contains("IPN bus watch ended; reconnecting:")
    run.wait_log("IPN bus watch reconnected", timeout=10)
    assert run.proc.poll() is None, run.output
    # The new stream is followed: an address change after the reconnect moves the rules.
    root.api.notify(netmap(["100.64.0.2/32"]))
    run.wait_contains("for 100.64.0.2", timeout=5)
    assert run.proc.poll() is None


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "polling"])
def test_config_published_by_kubelet_is_reloaded(root: Root, start: Callable[..., Run], inotify: bool) -> None:
    cfg = root.d / "cfg"
    cfg.mkdir()
    kubelet_publish(cfg, {"cap-95.hujson": '{"Version":"alpha0","AuthKey":"k1","Hostname":"a"}'}, 1)
    root.api.notify(netmap(["100.64.0.1/32"]))
    env = {} if inotify else {"TS_TEST_NO_INOTIFY": "1"}
    run = start(TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR=str(cfg), **env)
    run.wait_log("Startup complete, waiting for shutdown signal")
    # Another file of the mount changing, or the same bytes published again, reloads nothing.
    kubelet_publish(cfg, {"cap-95.hujson": '{"Version":"alpha0","AuthKey":"k1","Hostname":"a"}'}, 2)
    kubelet_publish(cfg, {"cap-95.hujson": '{"Version":"alpha0","AuthKey":"k1","Hostname":"b",'
                                          '"AdvertiseRoutes":["10.1.0.0/24"]}'}, 3)
    run.wait_log("tailscaled config watch: config was reloaded", timeout=3 if inotify else 8)
    assert len(root.api.posted("/localapi/v0/reload-config")) == 1
    run.wait_log("tailscaled config watch: ensuring that config is up to date")
    if not inotify:
        run.wait_contains("tailscaled config watch: failed to create fsnotify watcher, timer-only mode")
    assert wait_for(lambda: run.proc.poll() is None, 0.5)
