"""Network namespaces for tests: create, wire with veth, run commands, clean up everything.

Conventions: lab links use 198.18.0.0/15 (IPv6: fd18::/16 ULA), the tailnet side uses
100.64.0.0/10 and fd7a:115c:a1e0::/48; nothing is created in the root namespace and no namespace
gets a route out of the machine.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.lab.wait import wait_for

_counter = itertools.count()
IP = shutil.which("ip") or "/usr/sbin/ip"  # absolute: commands may run with a test's own PATH
ECHO_SERVER = Path(__file__).with_name("echo_server.py")


def sh(*argv: str, check: bool = True, env: dict[str, str] | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


class Lab:
    """A set of namespaces and the processes started in them; `close()` removes all of it."""

    def __init__(self, tag: str = "t") -> None:
        self.prefix = f"cb{os.getpid() % 100000}{tag}{next(_counter)}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def ns(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        sh(IP, "netns", "add", full)
        self.namespaces.append(full)
        self.run(full, "ip", "link", "set", "lo", "up")
        # Forwarding on; no duplicate address detection, which leaves a fresh link's link-local
        # address tentative for a second, so the first IPv6 neighbour solicitations go unanswered.
        settings = {"net/ipv4/ip_forward": 1, "net/ipv6/conf/all/forwarding": 1,
                    "net/ipv6/conf/all/accept_dad": 0, "net/ipv6/conf/default/accept_dad": 0}
        self.run(full, "sh", "-c", "; ".join(f"echo {v} > /proc/sys/{k}" for k, v in settings.items()))
        return full

    def run(self, ns: str, *argv: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return sh(IP, "netns", "exec", ns, *argv, check=check, env=env, timeout=timeout)

    def link(self, a: str, a_if: str, b: str, b_if: str) -> None:
        tmp = f"v{next(_counter)}x{os.getpid() % 10000}"
        sh(IP, "link", "add", tmp + "a", "netns", a, "type", "veth", "peer", tmp + "b", "netns", b)
        self.run(a, "ip", "link", "set", tmp + "a", "name", a_if)
        self.run(b, "ip", "link", "set", tmp + "b", "name", b_if)
        self.run(a, "ip", "link", "set", a_if, "up")
        self.run(b, "ip", "link", "set", b_if, "up")

    def addr(self, ns: str, dev: str, *cidrs: str) -> None:
        for cidr in cidrs:
            extra = ["nodad"] if ":" in cidr else []
            self.run(ns, "ip", "addr", "add", cidr, "dev", dev, *extra)

    def route(self, ns: str, dest: str, via: str) -> None:
        self.run(ns, "ip", "-6" if ":" in via else "-4", "route", "add", dest, "via", via)

    def spawn(self, ns: str, argv: Sequence[str], env: dict[str, str] | None = None,
              **kw: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen([IP, "netns", "exec", ns, *argv], env=env, text=True, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def serve(self, ns: str, name: str, host: str, port: int = 8080) -> subprocess.Popen[str]:
        """An HTTP server answering "<name> <client address>"; returns once it listens."""
        proc = self.spawn(ns, [sys.executable, str(ECHO_SERVER), name, host, str(port)],
                          stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"echo server {name} did not start: {line!r}")
        return proc

    def fetch(self, ns: str, host: str, port: int = 8080, timeout: float = 2.0,
              source: str | None = None) -> str | None:
        url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
        bind = ["--interface", source] if source else []
        proc = self.run(ns, "curl", "-sS", "-g", "--max-time", str(timeout), *bind, url, check=False,
                        timeout=timeout + 5)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def stop(self, proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        # Processes that outlived their parent in a namespace are ours too: end them by pid, and wait for
        # them to go, since a mount namespace they hold keeps namespace files busy.
        def pids() -> list[int]:
            return [int(p) for ns in self.namespaces for p in sh(IP, "netns", "pids", ns, check=False).stdout.split()]
        for pid in pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not pids(), timeout=10, interval=0.1)
        for ns in reversed(self.namespaces):
            wait_for(lambda ns=ns: sh(IP, "netns", "del", ns, check=False).returncode == 0  # type: ignore[misc]
                     or ns not in sh(IP, "netns", "list").stdout, timeout=5, interval=0.1)
        self.namespaces.clear()
        self.procs.clear()
