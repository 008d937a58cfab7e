"""What the boot path imports, checked in a fresh interpreter started as the image's launcher starts it
(python3 -IS): the modules that cost memory and that booting does not use stay out, and what is deferred
still works when something does use it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from containerboot.tailscale import ipn

ROOT = Path(__file__).resolve().parents[2]

# Everything a kernel-mode boot with services, the health endpoint and the Kubernetes store may import.
BOOT_MODULES = ["containerboot.boot.main", "containerboot.kube.client", "containerboot.kube.secret",
                "containerboot.kube.podevents", "containerboot.tailscale.vipservices",
                "containerboot.proxygroup.egress", "containerboot.proxygroup.ingress", "containerboot.health",
                "containerboot.tailscale.localapi", "firewall.detect", "firewall.nftables", "firewall.iptables",
                "firewall.xtables"]


def boot_interpreter(after: str = "") -> dict[str, object]:
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from containerboot import startup
        startup.tune_malloc()
        startup.defer_inspect()
        for name in {BOOT_MODULES!r}:
            __import__(name)
        out = {{"loaded": sorted(sys.modules)}}
    """) + textwrap.dedent(after) + "\nprint(json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-IS", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_boot_path_leaves_out_what_it_does_not_use() -> None:
    names = boot_interpreter()["loaded"]
    assert isinstance(names, list)
    loaded = set(names)
    # inspect's own imports (it stays deferred: every dataclass of ours has a docstring), TLS and the
    # stdlib's HTTP and mail packages (containerboot.tailscale.http1 serves instead), the subcommands' click.
    unwanted = {"ast", "dis", "tokenize", "linecache", "ssl", "http.client", "http.server", "email", "click",
                "tempfile", "shutil", "difflib"}
    assert not unwanted & loaded, sorted(unwanted & loaded)


def test_deferred_inspect_is_the_real_module_once_used() -> None:
    out = boot_interpreter("""
        from dataclasses import dataclass
        @dataclass
        class Bare:  # no docstring: dataclasses asks inspect for the signature
            a: int
        import inspect
        out["doc"] = Bare.__doc__
        out["signature"] = str(inspect.signature(lambda x, y=1: None))
        out["real"] = type(sys.modules["inspect"]).__name__
    """)
    assert (out["doc"], out["signature"], out["real"]) == ("Bare(a: int)", "(x, y=1)", "module"), out


def test_watch_mask_is_upstreams() -> None:
    # ipn.NotifyInitialStatus | NotifyNoNetMap, with NotifyPeerChanges only when rules follow peers, and
    # NotifyInitialPrefs | NotifyInitialHealthState on the first watch (tailscale.com/ipn/backend.go).
    status, no_netmap, peers, prefs, health = 1 << 14, 1 << 13, 1 << 12, 1 << 2, 1 << 7
    assert [ipn.watch_mask(False), ipn.watch_mask(True), ipn.watch_mask(False, first=True),
            ipn.watch_mask(True, first=True)] == [status | no_netmap, status | no_netmap | peers,
                                                  status | no_netmap | prefs | health,
                                                  status | no_netmap | peers | prefs | health]
