"""A resolver that never answers must not hold the boot: the lookup is bounded and a signal ends the wait."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT, need, need_root

pytestmark = pytest.mark.root

# In a private network and mount namespace: a nameserver on 127.0.0.1:53 that reads queries and never
# answers, and a resolv.conf pointing at it; then a bounded lookup, then one interrupted by SIGTERM.
SCRIPT = textwrap.dedent("""
    import os, signal, socket, sys, tempfile, threading, time
    sys.path.insert(0, sys.argv[1])
    os.system("ip link set lo up")
    conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
    conf.write("nameserver 127.0.0.1\\noptions timeout:5 attempts:3\\n"); conf.close()
    os.system(f"mount --bind {conf.name} /etc/resolv.conf")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); silent.bind(("127.0.0.1", 53))
    threading.Thread(target=lambda: [silent.recv(512) for _ in iter(int, 1)], daemon=True).start()
    from containerboot.dns import ResolveError, lookup_bounded
    class Stop(Exception):
        pass
    def handler(*_):
        raise Stop()
    signal.signal(signal.SIGTERM, handler)
    if sys.argv[2] == "signal":  # the way the boot's handler raises out of a blocked call
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    t = time.monotonic()
    try:
        lookup_bounded("stuck.example.invalid", timeout=1.0 if sys.argv[2] == "bound" else 30)
        print("answered")
    except ResolveError as exc:
        print(f"bounded {time.monotonic() - t:.2f} {exc}")
    except Stop:
        print(f"interrupted {time.monotonic() - t:.2f}")
    try:
        lookup_bounded("again.example.invalid", timeout=1.0)
    except ResolveError as exc:  # the first lookup's thread still waits on the resolver: not a second one
        print(f"refused {exc}")
""")


@pytest.mark.parametrize("mode", ["bound", "signal"])
def test_stuck_resolver_is_bounded_and_interruptible(mode: str) -> None:
    need_root()
    need(shutil.which("unshare") is not None, "needs util-linux unshare")
    out = subprocess.run(["unshare", "-mn", "--propagation", "private", sys.executable, "-c", SCRIPT, str(ROOT),
                          mode], capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    kind, took, *rest = lines[0].split(" ", 2)
    if mode == "bound":  # the resolver alone would take 15 s (timeout:5 attempts:3)
        assert kind == "bounded" and 0.9 < float(took) < 1.5, lines
        assert "no answer for stuck.example.invalid within 1s" in rest[0]
    else:
        assert kind == "interrupted" and 0.4 < float(took) < 1.0, lines
    assert lines[1] == "refused the previous lookup of again.example.invalid has not finished yet"
