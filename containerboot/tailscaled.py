"""The tailscaled and tailscale command lines (pure), and the tailscaled child process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping

from containerboot.settings import Settings


def tailscaled_argv(s: Settings) -> list[str]:
    argv = ["tailscaled", f"--socket={s.socket}"]
    if s.kube_secret:
        argv += [f"--state=kube:{s.kube_secret}", f"--statedir={s.state_dir or '/tmp'}"]
    elif s.state_dir:
        argv.append(f"--statedir={s.state_dir}")
    else:
        argv += ["--state=mem:", "--statedir=/tmp"]
    if s.userspace:
        argv.append("--tun=userspace-networking")
    if s.socks5_server:
        argv.append(f"--socks5-server={s.socks5_server}")
    if s.outbound_http_proxy_listen:
        argv.append(f"--outbound-http-proxy-listen={s.outbound_http_proxy_listen}")
    if s.config_file:
        argv.append(f"--config={s.config_file}")
    if s.debug_addr_port and s.debug_addr_port not in " ".join(s.tailscaled_extra_args):
        argv.append(f"--debug={s.debug_addr_port}")
    return argv + list(s.tailscaled_extra_args)


def _accept_dns(s: Settings) -> str:
    return f"--accept-dns={'true' if s.accept_dns else 'false'}"


def up_argv(s: Settings) -> list[str]:
    argv = ["tailscale", f"--socket={s.socket}", "up", _accept_dns(s)]
    for flag, value in (("authkey", s.authkey), ("client-id", s.client_id), ("client-secret", s.client_secret),
                        ("id-token", s.id_token), ("audience", s.audience)):
        if value:
            argv.append(f"--{flag}={value}")
    if s.routes is not None:
        argv.append(f"--advertise-routes={s.routes}")
    if s.hostname:
        argv.append(f"--hostname={s.hostname}")
    return argv + list(s.extra_args)


def set_argv(s: Settings) -> list[str]:
    argv = ["tailscale", f"--socket={s.socket}", "set", _accept_dns(s)]
    if s.routes is not None:
        argv.append(f"--advertise-routes={s.routes}")
    if s.hostname:
        argv.append(f"--hostname={s.hostname}")
    return argv


SECRET_FLAGS = ("--authkey=", "--client-secret=", "--id-token=")


def redact(argv: list[str]) -> str:
    return " ".join(a.split("=", 1)[0] + "=<redacted>" if a.startswith(SECRET_FLAGS) else a for a in argv)


def find(name: str) -> str:
    """The binary on PATH, as the upstream program finds it."""
    return shutil.which(name) or name


def run_cli(argv: list[str], timeout: float | None, stop: Callable[[], bool] = lambda: False) -> str | None:
    """Run a tailscale CLI command; None on success, else what went wrong (Go's wording). `stop` is
    polled so that a shutdown signal does not wait for a login that may block until the timeout."""
    try:
        proc = subprocess.Popen([find(argv[0]), *argv[1:]])
    except OSError as exc:
        return str(exc)
    deadline = None if timeout is None else time.monotonic() + timeout
    while proc.poll() is None:
        if stop() or (deadline is not None and time.monotonic() >= deadline):
            proc.kill()
            proc.wait()
            return "interrupted by a shutdown signal" if stop() else "signal: killed (boot timeout)"
        try:
            proc.wait(0.1)
        except subprocess.TimeoutExpired:
            pass
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"signal: {signal.Signals(-proc.returncode).name.lower().removeprefix('sig')}"
    return f"exit status {proc.returncode}"


class Tailscaled:
    """The tailscaled child: started in its own process group, waited for by a thread of ours.

    Only `Popen.wait` on this one pid reaps it, so no other child's exit status is ever taken
    (a PID 1 that calls waitpid(-1) makes `subprocess` report false success)."""

    def __init__(self, argv: list[str], env: Mapping[str, str], on_exit: Callable[[int], None]) -> None:
        self.proc = subprocess.Popen([find(argv[0]), *argv[1:]], env=dict(env), process_group=0)
        self.pid = self.proc.pid
        self._on_exit = on_exit
        threading.Thread(target=self._wait, name="tailscaled-wait", daemon=True).start()

    def _wait(self) -> None:
        self._on_exit(self.proc.wait())

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status (negative: killed by signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()


def wait_for_socket(path: str, deadline: float, alive: Callable[[], bool]) -> str | None:
    """Poll every 100 ms until the socket exists; the problem as text when it does not."""
    while True:
        try:
            os.stat(path)
            return None
        except FileNotFoundError:
            pass
        except OSError as exc:
            return f"error waiting for tailscaled socket: {exc}"
        if not alive():
            return "tailscaled exited before its socket appeared"
        if time.monotonic() >= deadline:
            return "failed to bring up tailscale: timed out waiting for tailscaled socket"
        time.sleep(0.1)


def exit_status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
