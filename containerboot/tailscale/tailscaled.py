"""The tailscaled and tailscale command lines (pure), and the tailscaled child process.

Children never outlive us and never see a secret they do not need:
- each child asks the kernel for a signal when we die (PR_SET_PDEATHSIG: SIGTERM for tailscaled, so it
  removes its rules and TUN device; SIGKILL for CLI commands), checked against the race where we die
  before it is set;
- tailscaled and the CLI get `child_env(environ)`, without TS_AUTHKEY, TS_CLIENT_SECRET, ... (they read
  none of them: the CLI gets secrets through flags, tailscaled never);
- a secret flag (--authkey, --client-secret, --id-token) is passed as `file:/proc/self/fd/N`, an
  anonymous memory file (memfd) that only the CLI inherits, which the tailscale CLI reads itself
  (cmd/tailscale/cli/up.go, resolveValueFromFile). Where memfd_create is unavailable the value goes to a
  0600 file in a fresh 0700 directory on tmpfs (/dev/shm, else /run, else the temp dir), removed when
  the command ends. Either way the secret is in no argv (/proc/<pid>/cmdline is world-readable).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from containerboot.settings import FILE_VARIABLES, SECRETS, Settings
from containerboot.tailscale import cliflags
from containerboot.tailscale.localapi import LocalAPIError, TailscaledAPI
from firewall.paths import which


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


def keeps_state(s: Settings) -> bool:
    """Whether tailscaled's state outlives its process: restarted, it is the same node (a kube Secret, a
    state directory or file); with `--state=mem:` it would register as a new device."""
    argv = tailscaled_argv(s)
    state = [a.split("=", 1)[1] for a in argv if a.startswith("--state=")]
    return not state[-1].startswith("mem:") if state else any(a.startswith("--statedir=") for a in argv)


def _accept_dns(s: Settings) -> str:
    return f"--accept-dns={'true' if s.accept_dns else 'false'}"


def up_argv(s: Settings) -> list[str]:
    """Upstream's command line, secrets included: `run_cli` moves them out of the argv."""
    argv = ["tailscale", f"--socket={s.socket}", "up", _accept_dns(s)]
    for flag, value in (("authkey", s.authkey), ("client-id", s.client_id), ("client-secret", s.client_secret),
                        ("id-token", s.id_token), ("audience", s.audience)):
        if value:
            argv.append(f"--{flag}={value}")
    if s.routes is not None:
        argv.append(f"--advertise-routes={s.routes}")
    if s.hostname:
        argv.append(f"--hostname={s.hostname}")
    return argv + up_extra_args(s)


def up_extra_args(s: Settings) -> list[str]:
    """TS_EXTRA_ARGS without the flags only `tailscale set` takes (after_login_set sends those)."""
    try:
        return cliflags.up_tokens(s.extra_args)
    except cliflags.FlagError:  # settings load refuses these; a Settings built otherwise gets upstream's argv
        return list(s.extra_args)


def set_argv(s: Settings) -> list[str]:
    argv = ["tailscale", f"--socket={s.socket}", "set", _accept_dns(s)]
    if s.routes is not None:
        argv.append(f"--advertise-routes={s.routes}")
    if s.hostname:
        argv.append(f"--hostname={s.hostname}")
    return argv


@dataclass(frozen=True)
class AfterLogin:
    """The `tailscale set` that follows login (None: none) and the lines that say what it carries."""

    argv: list[str] | None
    lines: tuple[str, ...] = ()


def after_login_set(s: Settings, read_prefs: Callable[[], Mapping[str, object] | str], up_ran: bool) -> AfterLogin:
    """What reaches tailscaled through `tailscale set` once the node is Running.

    TS_AUTH_ONCE=false: the flags of TS_EXTRA_ARGS only `set` takes (`up` has had the rest), none if there
    are none, so that upstream's command lines stay as they were.
    TS_AUTH_ONCE=true: upstream's `set` (accept-dns, routes, hostname) plus every TS_EXTRA_ARGS flag `set`
    takes, plus the settings no variable gives any more put back to `tailscale up`'s defaults where the node
    (`read_prefs`, the LocalAPI's prefs, or why they could not be read) has other values: so a TS_EXTRA_ARGS
    changed since the node logged in applies, a removed --accept-routes included, as `tailscale up` at every
    start would apply it. What only a login applies (--force-reauth, a changed --login-server or
    --advertise-tags) is named in a warning unless `tailscale up` ran in this boot (`up_ran`)."""
    if s.config_file:
        return AfterLogin(None)
    given = cliflags.parse(s.extra_args)
    if not s.auth_once:
        only = cliflags.flat(g for g in given if not g.flag.up)
        if not only:
            return AfterLogin(None)
        return AfterLogin(["tailscale", f"--socket={s.socket}", "set", *only],
                          (f"Running 'tailscale set {cliflags.shown(only)}': TS_EXTRA_ARGS flags 'tailscale up' "
                           "does not take",))
    prefs = read_prefs()
    carried = cliflags.flat(g for g in given if g.flag.set and g.name != "accept-dns")  # ours is in set_argv
    named = {g.name for g in given} | {"accept-dns"} | ({"hostname"} if s.hostname else set()) \
        | ({"advertise-routes"} if s.routes is not None else set())
    back = cliflags.resets(prefs, named) if not isinstance(prefs, str) else []
    lines = []
    if carried or back or isinstance(prefs, str):
        line = f"TS_EXTRA_ARGS through 'tailscale set' (TS_AUTH_ONCE=true): {cliflags.shown(carried) or 'no flag'}"
        if back:
            line += f"; settings no variable gives any more, back to 'tailscale up' defaults: {' '.join(back)}"
        if isinstance(prefs, str):
            line += f"; settings no variable gives any more are left as they are (tailscaled's prefs: {prefs})"
        lines.append(line)
    later = [] if up_ran else cliflags.needs_login(given, None if isinstance(prefs, str) else prefs)
    if later:
        lines.append(f"[warning] TS_EXTRA_ARGS {', '.join(later)}: would need a new login, which TS_AUTH_ONCE=true "
                     "makes only when the node needs one; not applied (TS_AUTH_ONCE=false runs 'tailscale up' at "
                     "every start)")
    lines.append("Running 'tailscale set'")
    return AfterLogin(set_argv(s) + carried + back, tuple(lines))


def read_prefs(api: TailscaledAPI) -> Mapping[str, object] | str:
    """tailscaled's prefs (GET /localapi/v0/prefs), or why they could not be read."""
    try:
        prefs = api.json("GET", "/localapi/v0/prefs")
    except LocalAPIError as exc:
        return str(exc)
    return prefs if isinstance(prefs, Mapping) else {}  # nothing known: nothing is put back


# Flags whose value is a secret; the pinned CLI reads each from a file when it starts with "file:".
SECRET_FLAGS = ("--authkey=", "--auth-key=", "--client-secret=", "--id-token=")
# Variables that hold a secret (or name the file that does): no child process gets them.
SECRET_VARIABLES = frozenset(SECRETS) | frozenset(FILE_VARIABLES)


def redact(argv: list[str]) -> str:
    return " ".join(a.split("=", 1)[0] + "=<redacted>" if a.startswith(SECRET_FLAGS) else a for a in argv)


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the secret variables (pure): what tailscaled and the CLI are started with."""
    return {k: v for k, v in env.items() if k not in SECRET_VARIABLES}


def find(name: str) -> str:
    """The binary on PATH, as the upstream program finds it."""
    return which(name) or name


# ---- children that die with us ---------------------------------------------------------------------

PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None


def _load_prctl() -> Callable[..., int] | None:
    global _prctl
    if _prctl is None:
        try:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return None
    return _prctl


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive `sig` when this thread's process dies.

    It runs between fork and exec, so it only calls what it was handed (a resolved libc function,
    getppid, _exit): no import, no lock, no allocation outside the interpreter's own, which is why it
    is safe in our threaded process. If we died before the prctl took effect, the child has already
    been re-parented, sees a different parent, and exits instead of running unsupervised.
    Note: the kernel sends the signal when the *thread* that forked exits, so a child that must
    outlive a short-lived thread must not be started from it (ours start from the main thread, or
    from a thread that waits for them)."""
    prctl = _load_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(128 + sig)

    return preexec


# ---- secrets out of the argv ------------------------------------------------------------------------

SECRET_DIRS = ("/dev/shm", "/run")


@contextmanager
def secret_argv(argv: list[str], use_memfd: bool = True,
                dirs: tuple[str, ...] = SECRET_DIRS) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """`argv` with each secret flag value replaced by `file:<path>`, and the fds the child must inherit.

    The memory files are closed and the fallback files removed when the block ends, however it ends."""
    fds: list[int] = []
    made: list[str] = []
    out: list[str] = []
    try:
        for arg in argv:
            flag, _, value = arg.partition("=")
            if not arg.startswith(SECRET_FLAGS) or not value or value.startswith("file:"):
                out.append(arg)
                continue
            data = value.encode()
            fd = _memfd(data) if use_memfd else None
            if fd is not None:
                fds.append(fd)
                out.append(f"{flag}=file:/proc/self/fd/{fd}")
            else:
                if not made:
                    made.append(_private_dir(dirs))
                path = os.path.join(made[0], flag.lstrip("-"))
                _write_private(path, data)
                out.append(f"{flag}=file:{path}")
        yield out, tuple(fds)
    finally:
        for fd in fds:
            os.close(fd)
        for d in made:
            import shutil  # the fallback directory only

            shutil.rmtree(d, ignore_errors=True)


def _memfd(data: bytes) -> int | None:
    try:
        fd = os.memfd_create("containerboot-secret", os.MFD_CLOEXEC)
    except (OSError, AttributeError):  # ENOSYS on old kernels, EPERM under a strict seccomp profile
        return None
    try:
        os.write(fd, data)  # a memfd takes a short value in one write
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        return None
    return fd


def _private_dir(dirs: tuple[str, ...]) -> str:
    """A fresh 0700 directory on the first writable tmpfs-like place (never kept on disk if avoidable)."""
    import tempfile  # only where memfd_create is refused: with random, about 0.2 MiB nobody else needs

    for base in (*dirs, tempfile.gettempdir()):
        try:
            return tempfile.mkdtemp(prefix="containerboot-", dir=base)
        except OSError:
            continue
    raise OSError("no writable directory for a secret file (tried " + ", ".join(dirs) + " and the temp dir)")


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ---- running things ----------------------------------------------------------------------------------


def run_cli(argv: list[str], timeout: float | None, stop: Callable[[], bool] = lambda: False,
            env: Mapping[str, str] | None = None) -> str | None:
    """Run a tailscale CLI command; None on success, else what went wrong (Go's wording). `stop` is
    polled so that a shutdown signal does not wait for a login that may block until the timeout.
    Secrets travel as `file:` values, the child gets no secret variable and dies with us."""
    try:
        with secret_argv(argv) as (safe, fds):
            try:
                proc = subprocess.Popen([find(safe[0]), *safe[1:]], env=child_env(os.environ if env is None else env),
                                        pass_fds=fds, preexec_fn=die_with_parent(signal.SIGKILL))
            except (OSError, subprocess.SubprocessError) as exc:
                return str(exc)
            try:
                return _wait_cli(proc, timeout, stop)
            finally:
                if proc.poll() is None:  # an exception on our side: never leave it running
                    proc.kill()
                    proc.wait()
    except OSError as exc:  # no place for the secret
        return str(exc)


def _wait_cli(proc: subprocess.Popen[bytes], timeout: float | None, stop: Callable[[], bool]) -> str | None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while proc.poll() is None:
        if stop() or (deadline is not None and time.monotonic() >= deadline):
            proc.kill()
            proc.wait()
            return "interrupted by a shutdown signal" if stop() else "signal: killed (boot timeout)"
        try:
            proc.wait(0.05)
        except subprocess.TimeoutExpired:
            pass
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"signal: {go_signal_name(-proc.returncode)}"
    return f"exit status {proc.returncode}"


def go_signal_name(signum: int) -> str:
    """How Go's os.ProcessState names a signal ("killed", "terminated", "segmentation fault"): the C
    library's description with a lower-case first letter, which is where Go's table comes from."""
    text = signal.strsignal(signum) or f"signal {signum}"
    return text[:1].lower() + text[1:]


class Child(Protocol):
    """tailscaled as the boot holds it (Tailscaled; a fake in the loop's tests)."""

    @property
    def returncode(self) -> int | None: ...

    def alive(self) -> bool: ...

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status (negative: killed by that signal)."""
        ...


Launch = Callable[[list[str], Mapping[str, str], Callable[[int], None]], Child]  # argv, env, on_exit
RunCLI = Callable[[list[str], float | None, Callable[[], bool]], str | None]  # argv, timeout, stop -> problem


class Tailscaled:
    """The tailscaled child: started in its own process group, waited for by a thread of ours.

    Only `Popen.wait` on this one pid reaps it, so no other child's exit status is ever taken
    (a PID 1 that calls waitpid(-1) makes `subprocess` report false success). It gets SIGTERM
    from the kernel if we die without stopping it (SIGKILL from the kubelet), and none of the
    secret variables."""

    def __init__(self, argv: list[str], env: Mapping[str, str], on_exit: Callable[[int], None]) -> None:
        # The parent-death signal follows the forking thread: only the main thread outlives tailscaled.
        guard = die_with_parent(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        self.proc = subprocess.Popen([find(argv[0]), *argv[1:]], env=child_env(env), process_group=0,
                                     preexec_fn=guard)
        self.pid = self.proc.pid
        self._on_exit = on_exit
        threading.Thread(target=self._wait, name="tailscaled-wait", daemon=True).start()

    def _wait(self) -> None:
        self._on_exit(self.proc.wait())

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None

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


def remove_stale_socket(path: str) -> bool:
    """Remove a socket file nothing listens on; True if one was removed.

    A restarted container keeps its filesystem, so the previous tailscaled's socket may still be there:
    the wait below would end at once, before the new tailscaled listens, and the first LocalAPI call
    would be refused. tailscaled removes that file itself when it starts; doing it before starting it
    closes the race (which upstream has too). A socket something answers on is left alone."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return False
    except ConnectionRefusedError:
        try:
            os.unlink(path)
            return True
        except OSError:
            return False
    except OSError:
        return False
    finally:
        probe.close()


def wait_for_socket(path: str, deadline: float, alive: Callable[[], bool],
                    stop: Callable[[], bool] = lambda: False) -> str | None:
    """Poll every 10 ms until the socket exists (a cheap stat; upstream polls every 100 ms, which cost
    50 ms of start-up on average); the problem as text when it does not. `stop` (a
    shutdown signal arrived) ends the wait at once."""
    while True:
        try:
            os.stat(path)
            return None
        except FileNotFoundError:
            pass
        except OSError as exc:
            return f"error waiting for tailscaled socket: {exc}"
        if stop():
            return "interrupted by a shutdown signal while waiting for tailscaled socket"
        if not alive():
            return "tailscaled exited before its socket appeared"
        if time.monotonic() >= deadline:
            return "failed to bring up tailscale: timed out waiting for tailscaled socket"
        time.sleep(0.01)


def exit_status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
