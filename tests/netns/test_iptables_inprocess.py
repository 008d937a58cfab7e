"""The iptables driver's kernel access runs in its own process (firewall/iptables_kernel.py), with real
kernel tables in fresh namespaces: many calls leak nothing and start no process, a held xtables lock is
waited for within its bound, a threaded process whose threads hold locks is no problem (nothing forks),
and an unknown rule in an owned chain reads as drift."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.conftest import python_exe
from tests.lab.netns import Lab

pytestmark = pytest.mark.root

PRELUDE = textwrap.dedent("""
    import ipaddress, json, os, sys, threading, time
    from firewall.iptables import IptablesDriver
    from firewall.model import Dnat, FirewallError, MssClamp, Plan
    A = ipaddress.ip_address

    def plan(n, first="198.18.2.2"):
        rules = [Dnat(A("100.64.0.1"), (A(first),)), MssClamp(4), Dnat(A("fd7a:115c:a1e0::1"), (A("fd18:2::2"),))]
        rules += [Dnat(ipaddress.IPv4Address(int(A("100.65.0.0")) + i), (A("198.18.2.3"),)) for i in range(n)]
        return Plan.of(*rules)

    def children():
        return [t for t in os.listdir(f"/proc/self/task")
                for c in open(f"/proc/self/task/{t}/children").read().split()]
""")


def run(lab: Lab, ns: str, body: str, **env: str) -> dict[str, object]:
    """Run PRELUDE + body in `ns`; the body prints one JSON line last."""
    proc = lab.run(ns, python_exe(), "-c", PRELUDE + textwrap.dedent(body), timeout=120,
                   env={**os.environ, **env})
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_many_calls_leak_nothing_and_start_no_process(lab: Lab) -> None:
    ns = lab.ns("m")
    out = run(lab, ns, """
        d = IptablesDriver()
        fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
        a, b = plan(50), plan(50, first="198.18.2.9")
        kids = 0
        for i in range(300):
            p = a if i % 2 else b
            d.apply(p)
            assert d.installed() == p, i
            kids = max(kids, len(children()))
        d.close()
        print(json.dumps({"fds": len(os.listdir("/proc/self/fd")) - fds, "threads": threading.active_count() - threads,
                          "children": kids}))
    """)
    # close() also drops the raw sockets opened at the first call: nothing more than before it.
    assert out == {"fds": 0, "threads": 0, "children": 0}, out


def test_a_held_xtables_lock_is_waited_for_within_its_bound(lab: Lab) -> None:
    """Another program's `iptables --wait` holds the lock: a write waits for it, at most lock_wait, then
    FirewallBusy and nothing written; a read needs no lock; once the lock is free the write goes through."""
    ns = lab.ns("l")
    lock = Path(f"/tmp/cb-xtables-l-{os.getpid()}.lock")
    out = run(lab, ns, f"""
        import fcntl
        from firewall.model import FirewallBusy
        d = IptablesDriver(lock_wait=0.5)
        p = plan(5)
        d.apply(p)
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
        moved = IptablesDriver().installed() == plan(5, first="198.18.2.8")
        print(json.dumps({{"result": result, "took": took, "read": read, "waited": waited, "moved": moved}}))
    """, XTABLES_LOCKFILE=str(lock))
    lock.unlink(missing_ok=True)
    assert "has held the xtables lock" in out["result"] and 0.5 <= out["took"] < 1.0, out  # type: ignore
    assert out["read"] and out["moved"] and 0.15 < out["waited"] < 0.5, out  # type: ignore[operator]


def test_works_while_other_threads_hold_the_import_and_logging_locks(lab: Lab) -> None:
    """What made a fork per call dangerous: a fork copies locks that other threads hold. Nothing forks now,
    so threads holding the import lock and the logging lock at that moment change nothing."""
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
        done = {}
        def work():
            d = IptablesDriver()
            p = plan(20)
            d.apply(p)
            done["ok"] = d.installed() == p
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        worker.join(10)
        release.set()
        print(json.dumps({"ok": done.get("ok", False)}))
    """)
    assert out == {"ok": True}, out


def test_an_unknown_rule_in_an_owned_chain_reads_as_drift_and_is_repaired(lab: Lab) -> None:
    """Someone else's rule, with a match we never render, in our IPv6 chain: the in-process read decodes
    it as Foreign drift (not an exception out of the kernel layer), and the next apply removes it."""
    ns = lab.ns("r")
    out = run(lab, ns, """
        import subprocess
        d = IptablesDriver()
        p = plan(3)
        d.apply(p)
        # someone else's rule in our IPv6 chain, with a match we do not render
        subprocess.run(["ip6tables-legacy", "-t", "nat", "-A", "CONTAINERBOOT-PREROUTING", "-m", "mark", "--mark", "7",
                        "-j", "RETURN"], check=True)
        found = d.installed()
        foreign = [str(r) for r in found.rules if r.family == 6 and str(r).startswith("unexpected")]
        d.apply(p)
        print(json.dumps({"foreign": len(foreign), "repaired": IptablesDriver().installed() == p}))
    """)
    assert out == {"foreign": 1, "repaired": True}, out
