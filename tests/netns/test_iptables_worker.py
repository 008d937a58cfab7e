"""The iptables driver's worker processes (firewall/iptables_worker.py), with real kernel tables in fresh
namespaces: they survive many calls, die with their parent, come back after being killed, and a stuck
or interrupted one is killed within the call's bound instead of holding its caller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import python_exe
from tests.lab.netns import Lab

pytestmark = pytest.mark.root

PRELUDE = textwrap.dedent("""
    import ipaddress, json, os, signal, sys, threading, time
    from firewall.iptables import IptablesDriver
    from firewall.model import Dnat, FirewallError, MssClamp, Plan
    A = ipaddress.ip_address

    def plan(n, first="198.18.2.2"):
        rules = [Dnat(A("100.64.0.1"), (A(first),)), MssClamp(4), Dnat(A("fd7a:115c:a1e0::1"), (A("fd18:2::2"),))]
        rules += [Dnat(ipaddress.IPv4Address(int(A("100.65.0.0")) + i), (A("198.18.2.3"),)) for i in range(n)]
        return Plan.of(*rules)

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def gone(pid, within=3.0):
        end = time.monotonic() + within
        while alive(pid):
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def pids(driver):
        return {fam: w.pid for fam, w in driver.workers.items()}
""")


def run(lab: Lab, ns: str, body: str, **env: str) -> dict[str, object]:
    """Run PRELUDE + body in `ns`; the body prints one JSON line last."""
    proc = lab.run(ns, python_exe(), "-c", PRELUDE + textwrap.dedent(body), timeout=120,
                   env={**os.environ, **env})
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_survives_many_calls(lab: Lab) -> None:
    ns = lab.ns("m")
    out = run(lab, ns, """
        d = IptablesDriver()
        first = pids(d)
        fds = len(os.listdir("/proc/self/fd"))
        a, b = plan(50), plan(50, first="198.18.2.9")
        for i in range(300):
            p = a if i % 2 else b
            d.apply(p)
            assert d.installed() == p, i
        rss = {}
        for fam, pid in pids(d).items():
            with open(f"/proc/{pid}/status") as f:
                rss[fam] = int(next(l for l in f if l.startswith("VmRSS:")).split()[1])
        print(json.dumps({"same": pids(d) == first, "starts": [w.starts for w in d.workers.values()],
                          "fds": len(os.listdir("/proc/self/fd")) - fds, "rss_kb": rss}))
    """)
    assert out["same"] and out["starts"] == [1, 1], out
    assert out["fds"] == 0, out  # no pipe or socket leaks in the parent
    assert all(kb < 40_000 for kb in out["rss_kb"].values()), out  # type: ignore[attr-defined]


@pytest.mark.parametrize("thread", [False, True], ids=["main-thread", "other-thread"])
def test_dies_with_its_parent(lab: Lab, thread: bool) -> None:
    """SIGKILL the parent: its workers go too. Started from the main thread they also get PR_SET_PDEATHSIG;
    from another thread (whose end would trigger it) they rely on the end of their input alone."""
    ns = lab.ns("d")
    body = textwrap.dedent(f"""
        holder = {{}}
        def start():
            holder["d"] = IptablesDriver()
            holder["d"].installed()
        if {thread}:
            t = threading.Thread(target=start); t.start(); t.join()
        else:
            start()
        print(json.dumps(pids(holder["d"])), flush=True)
        time.sleep(60)
    """)
    parent = lab.spawn(ns, [python_exe(), "-c", PRELUDE + body], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    workers = [int(p) for p in json.loads(parent.stdout.readline()).values()]
    assert all(Path(f"/proc/{pid}").exists() for pid in workers)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(5)
    deadline = time.monotonic() + 3
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived its parent"


def test_restarted_after_being_killed(lab: Lab) -> None:
    ns = lab.ns("k")
    out = run(lab, ns, """
        d = IptablesDriver()
        p = plan(10)
        d.apply(p)
        old = pids(d)
        for pid in old.values():
            os.kill(pid, signal.SIGKILL)
            assert gone(pid)
        found = d.installed()          # each worker found dead and started again
        q = plan(10, first="198.18.2.7")
        d.apply(q)
        print(json.dumps({"read": found == p, "applied": d.installed() == q, "old": old, "new": pids(d),
                          "starts": [w.starts for w in d.workers.values()]}))
    """)
    assert out["read"] and out["applied"], out
    assert out["starts"] == [2, 2] and set(out["old"].values()).isdisjoint(out["new"].values()), out  # type: ignore
    save = lab.run(ns, "iptables-legacy-save", "-t", "nat").stdout
    assert "-A CONTAINERBOOT-PREROUTING -d 100.64.0.1/32 -j DNAT --to-destination 198.18.2.7" in save


def test_worker_killed_in_the_middle_of_a_call_is_asked_again(lab: Lab) -> None:
    """The worker dies while the call waits for its answer (here: stopped, then SIGKILLed). The call starts
    a new one and asks again, which is safe because every request is idempotent."""
    ns = lab.ns("r")
    out = run(lab, ns, """
        d = IptablesDriver()
        p = plan(5)
        d.apply(p)
        victim = d.workers[4].pid
        os.kill(victim, signal.SIGSTOP)   # the read goes out and waits
        def kill():
            time.sleep(0.5)
            os.kill(victim, signal.SIGKILL)
        threading.Thread(target=kill).start()
        t = time.monotonic()
        found = d.installed()
        print(json.dumps({"ok": found == p, "starts": d.workers[4].starts, "took": time.monotonic() - t,
                          "victim_gone": gone(victim)}))
    """)
    assert out["ok"] and out["starts"] == 2 and out["victim_gone"], out
    assert 0.5 < out["took"] < 3, out  # type: ignore[operator]


@pytest.mark.parametrize("size", [10, 20_000], ids=["read", "large-write"])
def test_a_stuck_worker_is_killed_within_the_bound(lab: Lab, size: int) -> None:
    """A worker that stops answering (SIGSTOP) costs its caller the call's bound, then FirewallError; the
    worker is killed and reaped, and the next call gets a new one. The large write also fills the pipe,
    so the parent's own write must be bounded too."""
    ns = lab.ns("s")
    call = "d.installed()" if size == 10 else "d.apply(big)"
    out = run(lab, ns, f"""
        d = IptablesDriver(lock_wait=0.2, timeout=0.8)
        p, big = plan(10), plan({size})
        d.apply(p)
        stuck = d.workers[4].pid
        os.kill(stuck, signal.SIGSTOP)
        t = time.monotonic()
        try:
            {call}
            error = None
        except FirewallError as exc:
            error = str(exc)
        took = time.monotonic() - t
        print(json.dumps({{"error": error, "took": took, "stuck_gone": gone(stuck),
                          "again": d.installed() == p, "other": pids(d)[6] is not None}}))
    """)
    assert out["error"] and "did not answer within 0.8s; killed it" in out["error"], out  # type: ignore[operator]
    assert 0.7 < out["took"] < 2.5, out  # type: ignore[operator]
    assert out["stuck_gone"] and out["again"], out


def test_an_interrupted_call_kills_its_worker(lab: Lab) -> None:
    """A signal handler that raises (the boot's SIGTERM during a call) leaves no worker mid-request: the
    worker is killed and reaped at once, the exception reaches the caller, and the next call works."""
    ns = lab.ns("i")
    out = run(lab, ns, """
        class Stop(Exception):
            pass
        def raise_stop(*_):
            raise Stop()
        signal.signal(signal.SIGALRM, raise_stop)
        d = IptablesDriver()
        d.installed()
        stuck = d.workers[4].pid
        os.kill(stuck, signal.SIGSTOP)   # the call goes out and waits for an answer
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        t = time.monotonic()
        try:
            d.apply(plan(5))
            result = "returned"
        except Stop:
            result = "interrupted"
        took = time.monotonic() - t
        dead = gone(stuck, within=0.5)
        d.apply(plan(5))
        print(json.dumps({"result": result, "took": took, "dead": dead, "works": d.installed() == plan(5)}))
    """)
    assert out["result"] == "interrupted" and out["took"] < 1.0, out  # type: ignore[operator]
    assert out["dead"] and out["works"], out


def test_a_held_xtables_lock_is_waited_for_within_its_bound(lab: Lab) -> None:
    """Another program's `iptables --wait` holds the lock: a write waits for it, at most lock_wait, then
    FirewallBusy; the workers were never asked, so they stay. A read needs no lock."""
    ns = lab.ns("l")
    lock = Path(f"/tmp/cb-xtables-l-{os.getpid()}.lock")
    out = run(lab, ns, f"""
        import fcntl
        from firewall.model import FirewallBusy
        d = IptablesDriver(lock_wait=0.5)
        p = plan(5)
        d.apply(p)
        before = pids(d)
        fd = os.open("{lock}", os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        t = time.monotonic()
        try:
            d.apply(plan(5, first="198.18.2.8"))
            result = "applied"
        except FirewallBusy as exc:
            result = str(exc)
        took = time.monotonic() - t
        read = d.installed() == p
        def release():
            time.sleep(0.2)
            fcntl.flock(fd, fcntl.LOCK_UN)
        threading.Thread(target=release).start()
        t = time.monotonic()
        d.apply(plan(5, first="198.18.2.8"))
        waited = time.monotonic() - t
        print(json.dumps({{"result": result, "took": took, "read": read, "waited": waited,
                          "same_workers": pids(d) == before}}))
    """, XTABLES_LOCKFILE=str(lock))
    lock.unlink(missing_ok=True)
    assert "has held the xtables lock" in out["result"] and 0.5 <= out["took"] < 1.0, out  # type: ignore
    assert out["read"] and out["same_workers"] and 0.15 < out["waited"] < 0.5, out  # type: ignore[operator]


def test_close_ends_the_workers_and_leaves_no_zombie(lab: Lab) -> None:
    ns = lab.ns("c")
    out = run(lab, ns, """
        d = IptablesDriver()
        d.installed()
        before = list(pids(d).values())
        d.close()
        reaped = []
        for pid in before:
            try:
                os.waitpid(pid, os.WNOHANG)
                reaped.append(False)
            except ChildProcessError:
                reaped.append(True)   # already reaped by close(): no zombie left behind
        print(json.dumps({"gone": [not alive(pid) for pid in before], "reaped": reaped}))
    """)
    assert out == {"gone": [True, True], "reaped": [True, True]}, out


def test_workers_start_in_a_process_whose_threads_hold_locks(lab: Lab) -> None:
    """A fork of a threaded process copies locks held by other threads and can deadlock on them. The
    workers are started by exec of a fresh interpreter: threads holding the import lock and the logging
    lock at that moment change nothing."""
    ns = lab.ns("t")
    out = run(lab, ns, """
        import _imp, logging
        held, release = threading.Event(), threading.Event()
        def hold():
            _imp.acquire_lock()
            logging._acquireLock()
            held.set()
            release.wait()
            logging._releaseLock()
            _imp.release_lock()
        threading.Thread(target=hold, daemon=True).start()
        held.wait()
        t = time.monotonic()
        d = IptablesDriver(timeout=5)
        p = plan(20)
        d.apply(p)
        ok = d.installed() == p
        release.set()
        print(json.dumps({"ok": ok, "took": time.monotonic() - t}))
    """)
    assert out["ok"] and out["took"] < 5, out  # type: ignore[operator]
