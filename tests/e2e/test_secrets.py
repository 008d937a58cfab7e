"""The auth key during a real login (tailscaled + headscale): in no process's command line, and not in
tailscaled's environment, sampled every few milliseconds from start to Running."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab.tailnet import Tailnet
from tests.lab.tailnet_boot import READY, Booted, site

pytestmark = pytest.mark.e2e


def scan(key: bytes, found: list[str], stop: threading.Event) -> int:
    """Reads every /proc/<pid>/cmdline and environ until `stop`; returns how many sweeps it made."""
    sweeps = 0
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            for part in ("cmdline", "environ"):
                try:
                    data = Path(f"/proc/{pid}/{part}").read_bytes()
                except OSError:
                    continue
                if key in data:
                    try:
                        name = Path(f"/proc/{pid}/comm").read_text().strip()
                        ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                        parent = Path(f"/proc/{ppid}/comm").read_text().strip()
                    except (OSError, IndexError):
                        name, ppid, parent = "?", "?", "?"
                    found.append(f"{pid} ({name}) {part} parent={ppid}:{parent}")
        sweeps += 1
    return sweeps


@pytest.mark.parametrize("given", ["variable", "file"])
def test_auth_key_stays_out_of_argv_and_environment(net: Tailnet, boot: Callable[..., Booted], tmp_path: Path,
                                                    given: str) -> None:
    ns, _, n = site(net, "secret")
    key = net.authkey(reusable=False)
    env = {"TS_AUTHKEY": key}
    if given == "file":
        secret = tmp_path / "authkey"
        secret.write_text(key + "\n")
        secret.chmod(0o600)
        env = {"TS_AUTHKEY": "", "TS_AUTHKEY_FILE": str(secret)}
    found: list[str] = []
    stop = threading.Event()
    sweeps: list[int] = []
    scanner = threading.Thread(target=lambda: sweeps.append(scan(key.encode(), found, stop)), daemon=True)
    scanner.start()
    try:
        node = boot(ns, f"secret{n}", wait=False, TS_USERSPACE="false", **env)
        node.run.wait_log(READY, timeout=60)
    finally:
        stop.set()
        scanner.join(10)
    # containerboot itself was given the key in its environment by the test (as a Pod spec would), and a
    # child between fork and exec still shows that same memory (comm "containerboot"); nothing it starts
    # may carry the key once it runs its own program. The harness's wrapper shell (the Popen pid, before
    # it execs containerboot) runs `mount` for the private /run first: that child of the wrapper carries
    # the test's environment too, and is not containerboot's.
    ours = {str(node.run.proc.pid)}
    # (Told apart by the parent's name at that moment: the wrapper is still `sh`, not containerboot.)
    harness = {f for f in found if f.split()[-1] == f"parent={node.run.proc.pid}:sh"}
    leaks = [f for f in found if f.split()[0] not in ours and "(containerboot)" not in f and f not in harness]
    assert sweeps and sweeps[0] > 10, "the scan did not run through the login"
    assert not leaks, leaks
    assert node.status().get("BackendState") == "Running"
