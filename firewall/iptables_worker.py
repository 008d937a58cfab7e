"""The process that reads and writes the legacy xtables tables for the iptables driver, one per family.

Why a process, and this one:
- It is started with `subprocess` (fork and exec of a fresh interpreter, `python -I -S`): nothing of
  the parent runs in the child before exec, so no lock that another thread of the parent held at
  fork time can deadlock it, whatever threads the boot program runs by then.
- It lives as long as the driver, instead of a fork per call: about 30 ms to start and 12 MB
  (standard library and firewall/xtables.py only; 20 MB holding a table of 10,000 rules).
- All kernel access happens here, so every call can be bounded from the parent: a worker that does
  not answer in time is killed and the call fails with FirewallError; a worker found dead is
  started again (and the call, which is idempotent, sent once more).
- It dies with its parent: end of file on its stdin ends it, and when it was started from the main
  thread it also asks the kernel for SIGKILL at its parent's death (PR_SET_PDEATHSIG).
One per address family, so that both families' tables are read and committed in parallel (the
driver holds the xtables lock around a write, for both).

Requests and replies are marshal'd plain data (dicts, lists, bytes, str, int) framed by a 4-byte length.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from firewall import xtables
from firewall.errors import FirewallBusy, FirewallError

CALL_TIMEOUT = 10.0  # how long a call may take before its worker is killed
LENGTH = struct.Struct("<I")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from firewall.iptables_worker import main; main(sys.argv[2:])"
PR_SET_PDEATHSIG = 1


# ---- the worker process -------------------------------------------------------------------------------


class Seen:
    """A table as last reported to the parent: its info, its entries with counters zeroed (`blob`), where
    the entries start, and the bytes last read (counters included), so that a table read again that did
    not change costs a comparison (or, when only counters moved, zeroing them at the known offsets)."""

    __slots__ = ("info", "blob", "offs", "raw")

    def __init__(self, info: tuple[int, ...], blob: bytes, offs: list[int], raw: bytes = b"") -> None:
        self.info, self.blob, self.offs, self.raw = info, blob, offs, raw

    def same(self, lay: xtables.Layout, info: tuple[int, ...], raw: bytes) -> bool:
        if info != self.info or len(raw) != len(self.blob):
            return False
        if raw == self.raw:
            return True
        if xtables.mask(lay, raw, self.offs) != self.blob:
            return False
        self.raw = raw
        return True


class Server:
    """One family's tables. `version` names the tables' content as last reported to the parent."""

    def __init__(self, fam: int) -> None:
        self.kernel = xtables.Kernel(fam)
        self.fam = fam
        self.version = 0
        self.seen: dict[str, Seen | None] = {}

    def _unchanged(self, name: str, now: tuple[tuple[int, ...], bytes] | None) -> bool:
        before = self.seen.get(name)
        if now is None or before is None:
            return now is None and before is None
        return before.same(self.kernel.lay, *now)

    def write(self, tables: dict[str, dict[str, tuple[str | None, list[bytes] | None]]]) -> int:
        """Rewrite the owned chains of each table (None: remove them); returns the version after it.
        The caller holds the xtables lock."""
        seen: dict[str, Seen | None] = {}
        present = xtables.tables(self.fam)
        for name, owned in tables.items():
            if name not in present and all(rules is None for _, rules in owned.values()):
                seen[name] = None  # nothing to remove, and opening the table would create it
                continue
            seen[name] = self._commit(name, owned)
        self.version += 1
        self.seen = seen
        return self.version

    def _commit(self, name: str, owned: dict[str, tuple[str | None, list[bytes] | None]]) -> Seen:
        """Splice `owned` into the table and replace it; returns what reading it back will give (the
        kernel keeps what we write; counters and its marks, zero in what we write, are masked)."""
        for _ in range(5):
            table = self.kernel.read(name)
            new = xtables.splice(table, owned)
            info = (table.valid_hooks, *new.hook_entry, *new.underflow, new.entries)
            if new.blob == table.blob and info == table.info:
                return Seen(table.info, table.blob, table.offs)
            try:
                old = self.kernel.replace(table, new.blob, new.entries, new.hook_entry, new.underflow)
            except xtables.TableError as exc:
                if exc.errno == 11:  # EAGAIN: someone replaced it since we read it
                    continue
                raise
            counters = new.counters_from(old)
            if counters.count(0) != len(counters):
                self.kernel.add_counters(name, counters)  # best effort, as a replace after ours resets them
            return Seen(info, new.blob, new.offs)
        raise FirewallError(f"table {name} keeps changing under us")

    def read(self, chains: dict[str, dict[str, str]], since: int) -> dict[str, Any]:
        """The rules of the owned chains ({table: {chain: its built-in chain}}) that are reached by a jump
        from their built-in chain, and how many such jumps there are; only `same` when nothing changed
        since the version `since` was reported."""
        present = xtables.tables(self.fam)
        raw = {t: self.kernel.read_raw(t) if t in present else None for t in chains}
        if since == self.version and all(self._unchanged(t, now) for t, now in raw.items()):
            return {"version": since, "same": True}
        read = {t: xtables.Table(self.kernel.lay, t, *now) if now else None for t, now in raw.items()}
        self.version += 1
        self.seen = {t: Seen(v.info, v.blob, v.offs, v.raw) if v else None for t, v in read.items()}
        found: dict[str, tuple[int, list[bytes]]] = {}
        for name, owned in chains.items():
            table = read[name]
            if table is None:
                continue
            for chain_name, base in owned.items():
                chain = table.by_name.get(chain_name)
                if chain is None or base not in table.by_name:
                    continue
                jumps = len(table.jumps_to(chain, table.by_name[base]))
                if jumps:
                    found[chain_name] = (jumps, table.entries(chain))
        return {"version": self.version, "same": False, "chains": found}

    def probe(self, chain: str) -> None:
        """Create and delete a chain in `nat` (fails without ip_tables NAT, or without the rights). The
        caller holds the xtables lock."""
        self._commit("nat", {chain: (None, [])})
        self._commit("nat", {chain: (None, None)})

    def census(self, skip: list[str]) -> list[tuple[str, str, int]]:
        """(table, chain, rules) in the tables that exist, except the chains in `skip` and jumps to them."""
        out: list[tuple[str, str, int]] = []
        for name in sorted(xtables.tables(self.fam)):
            table = self.kernel.read(name)
            skipped = {table.by_name[c].body for c in skip if c in table.by_name}
            ours = {o for o, _, v in table.jumps if v in skipped}
            for chain in table.chains:
                if chain.name not in skip:
                    first, last = table.index[chain.body], table.index[chain.end]
                    out.append((name, chain.name, sum(1 for o in table.offs[first:last] if o not in ours)))
        return out

    def revision(self, target: str, revisions: list[int]) -> int | None:
        return self.kernel.target_revision(target, revisions)

    def handle(self, request: dict[str, Any]) -> Any:
        op = request.pop("op")
        if op == "revision":
            return self.revision(**request)
        if op == "write":
            return self.write(**request)
        if op == "read":
            return self.read(**request)
        if op == "probe":
            return self.probe(**request)
        if op == "census":
            return self.census(**request)
        raise ValueError(f"unknown request {op!r}")


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def serve(fam: int, rfd: int, wfd: int) -> None:
    server = Server(fam)
    while True:
        head = _read_exactly(rfd, LENGTH.size)
        body = _read_exactly(rfd, LENGTH.unpack(head)[0]) if head else None
        if body is None:
            return  # the parent closed our stdin, or died
        try:
            reply: dict[str, Any] = {"ok": server.handle(marshal.loads(body))}
        except FirewallError as exc:
            reply = {"error": str(exc), "busy": isinstance(exc, FirewallBusy)}
        except Exception as exc:  # noqa: BLE001 - carried to the parent as text
            reply = {"error": str(exc) if isinstance(exc, xtables.TableError) else f"{type(exc).__name__}: {exc}"}
        data = marshal.dumps(reply)
        data = LENGTH.pack(len(data)) + data
        while data:
            data = data[os.write(wfd, data):]


def main(args: list[str]) -> None:
    fam, parent, die_with_parent = int(args[0]), int(args[1]), args[2] == "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the parent, which then ends us
    if die_with_parent:
        xtables.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return  # the parent died before the line above took effect
    replies = os.dup(1)
    os.dup2(2, 1)  # a stray print must not corrupt the replies
    serve(fam, 0, replies)


# ---- the parent's side ----------------------------------------------------------------------------------


class WorkerDied(FirewallError):
    pass


class Worker:
    """One family's worker process, as seen from the driver. Not for use from two threads at once."""

    def __init__(self, fam: int) -> None:
        self.fam = fam
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0  # processes started so far (more than one: restarted)
        self.busy = False  # a request went out whose reply was not read: the pipe is out of step
        self._request = b""  # the request in flight, framed, to send again to a new worker
        self._resent = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if self.proc is not None:
            self.kill()
        # PR_SET_PDEATHSIG follows the thread that started the child: only the main thread lives as long as we do.
        main = threading.current_thread() is threading.main_thread()
        argv = [sys.executable, "-I", "-S", "-c", BOOT, ROOT, str(self.fam), str(os.getpid()), "1" if main else "0"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.starts += 1

    def kill(self) -> None:
        proc, self.proc, self.busy = self.proc, None, False
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def close(self, wait: float = 1.0) -> None:
        """End the worker: it exits at the end of its input; killed if it does not within `wait`."""
        proc = self.proc
        if proc is None:
            return
        if not self.busy:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        self.kill()

    def send(self, request: dict[str, Any], deadline: float) -> None:
        data = marshal.dumps(request)
        self._request, self._resent = LENGTH.pack(len(data)) + data, False
        try:
            self._send(deadline)
        except WorkerDied:
            self._again(deadline)

    def receive(self, deadline: float) -> Any:
        """The reply to the request sent; a worker that died meanwhile is replaced and asked once more."""
        while True:
            try:
                assert self.proc is not None and self.proc.stdout is not None
                fd = self.proc.stdout.fileno()
                head = self._read(fd, LENGTH.size, deadline)
                body = self._read(fd, LENGTH.unpack(head)[0], deadline)
                break
            except WorkerDied:
                self._again(deadline)
        self.busy = False
        try:
            reply = marshal.loads(body)
        except (EOFError, ValueError, TypeError) as exc:
            self.kill()
            raise FirewallError(f"iptables worker (IPv{self.fam}) answered nonsense: {exc}") from None
        if "error" in reply:
            raise (FirewallBusy if reply.get("busy") else FirewallError)(f"iptables (legacy): {reply['error']}")
        return reply["ok"]

    def _again(self, deadline: float) -> None:
        if self._resent:
            raise WorkerDied(f"iptables worker (IPv{self.fam}) died twice in one call")
        self._resent = True
        self.start()
        self._send(deadline)

    def _send(self, deadline: float) -> None:
        if self.proc is None or self.busy or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        self.busy = True
        view = memoryview(self._request)
        while view:
            self._wait(fd, select.POLLOUT, deadline)
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise WorkerDied(self._gone()) from None

    def _read(self, fd: int, n: int, deadline: float) -> bytes:
        chunks, got = [], 0
        while got < n:
            self._wait(fd, select.POLLIN, deadline)
            try:
                chunk = os.read(fd, min(n - got, 1 << 20))
            except BlockingIOError:
                continue
            if not chunk:
                raise WorkerDied(self._gone())
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        poller = select.poll()
        poller.register(fd, event)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if poller.poll(left * 1000):
                return

    def _gone(self) -> str:
        assert self.proc is not None
        try:
            status = self.proc.wait(1)
        except subprocess.TimeoutExpired:
            status = None
        return f"iptables worker (IPv{self.fam}, pid {self.proc.pid}) died (exit status {status})"


def exchange(calls: list[tuple[Worker, dict[str, Any]]], timeout: float) -> list[Any]:
    """Send each worker its request, then collect the replies; all within `timeout` seconds.

    A worker that died is started again and asked once more (every request is idempotent). One that
    does not answer in time, or whose call is interrupted (a signal raised into the wait), is killed:
    its reply would be out of step with the next request."""
    deadline = time.monotonic() + timeout
    try:
        for worker, request in calls:
            worker.send(request, deadline)
        results: list[Any] = []
        error: FirewallError | None = None
        for worker, _ in calls:
            try:
                results.append(worker.receive(deadline))
            except WorkerDied:
                raise
            except FirewallError as exc:  # the kernel's answer: the other workers' replies still count
                error = error or exc
                results.append(None)
        if error is not None:
            raise error
        return results
    except TimeoutError:
        stuck = [w for w, _ in calls if w.busy]
        for worker in stuck:
            worker.kill()
        raise FirewallError(f"iptables worker (IPv{', IPv'.join(str(w.fam) for w in stuck)}) did not answer "
                            f"within {timeout:g}s; killed it") from None
    except BaseException:
        for worker, _ in calls:
            if worker.busy:
                worker.kill()
        raise
