"""The nftables driver's drift check in a fresh namespace: while the ruleset's generation stays where our
last transaction (or listing) left it, `installed()` lists nothing; any commit by anyone makes it list
again, and a change to our own table is seen and repaired."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from tests.conftest import python_exe
from tests.lab.netns import Lab

pytestmark = pytest.mark.root


@pytest.mark.parametrize("path", ["binding", "cli"])
def test_installed_lists_only_after_a_commit(lab: Lab, path: str) -> None:
    ns = lab.ns("n")
    script = textwrap.dedent(f"""
        import ipaddress, json, subprocess
        from firewall.model import Dnat, MssClamp, Plan
        from firewall.nftables import NftablesDriver, open_libnft
        A = ipaddress.IPv4Address
        lib = open_libnft("{path}")[0]
        runs = []
        class Counting:
            path = lib.path
            def run(self, cmds, terse=False):
                runs.append(cmds)
                return lib.run(cmds, terse)
            def release(self):
                lib.release()
        d = NftablesDriver(Counting())
        plan = Plan.of(MssClamp(4), *(Dnat(A(int(A("100.64.0.1")) + i), (A("198.18.2.2"),)) for i in range(500)))
        d.apply(plan)
        out = {{}}
        n = len(runs)
        out["idle_is_applied"] = all(d.installed() is plan for _ in range(50))
        out["idle_listings"] = len(runs) - n
        subprocess.run(["nft", "add table ip someone"], check=True)   # anyone's commit moves the generation
        n = len(runs)
        found = d.installed()
        out["after_commit_listings"] = len(runs) - n
        out["after_commit_same_object"] = found is plan
        n = len(runs)
        d.installed()
        out["then_idle_listings"] = len(runs) - n
        subprocess.run(["nft", "delete element ip containerboot ingress {{ 100.64.0.3 }}"], check=True)
        found = d.installed()
        out["sees_missing"] = [str(r) for r in plan.rules - found.rules]
        d.apply(plan, full=True)
        out["repaired"] = d.installed() == plan
        # A plan that outgrows the map's declared size: the map is declared again, larger.
        def size():
            listed = subprocess.run(["nft", "-j", "list", "map", "ip", "containerboot", "ingress"],
                                    capture_output=True, text=True, check=True).stdout
            return json.loads(listed)["nftables"][1]["map"]["size"]
        out["size"] = [size()]
        big = Plan.of(*(Dnat(A(int(A("100.65.0.1")) + i), (A("198.18.2.2"),)) for i in range(1500)))
        d.apply(big)
        out["size"].append(size())
        out["big"] = d.installed() == big
        d.apply(plan)
        # What apply asks before replacing a table whole (deleting one that is not there costs 2 ms).
        from firewall.nftables import Nfnetlink
        nl = Nfnetlink()
        out["tables"] = [nl.has_table(4, "containerboot"), nl.has_table(6, "containerboot")]
        d.flush()
        out["tables"] += [nl.has_table(4, "containerboot"), nl.has_table(4, "someone")]
        print(json.dumps(out))
    """)
    out = json.loads(lab.run(ns, python_exe(), "-c", script, env=dict(os.environ)).stdout)
    assert out == {"idle_is_applied": True, "idle_listings": 0, "after_commit_listings": 2,
                   "after_commit_same_object": True, "then_idle_listings": 0,
                   "sees_missing": ["dnat 100.64.0.3 -> 198.18.2.2"], "repaired": True,
                   "size": [1024, 4096], "big": True, "tables": [True, False, False, True]}, out


def test_idle_driver_frees_the_libnftables_cache(lab: Lab) -> None:
    """A write makes libnftables cache every table of the ruleset (about 0.5 MiB each) and keep it until its
    next command; the drift check that finds nothing changed frees it, and the driver works on after."""
    ns = lab.ns("n")
    script = textwrap.dedent("""
        import ipaddress, json, subprocess
        from containerboot.startup import tune_malloc
        tune_malloc()
        from firewall.model import Dnat, MssClamp, Plan
        from firewall.nftables import NftablesDriver, open_libnft
        A = ipaddress.IPv4Address
        def anon():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
        # Other programs' tables, as tailscaled (six) and a CNI or kube-proxy leave them.
        foreign = "".join(f"add table ip other{i}\\nadd chain ip other{i} c\\n" for i in range(12))
        subprocess.run(["nft", "-f", "-"], input=foreign, text=True, check=True)
        d = NftablesDriver(open_libnft("binding")[0])
        plan = Plan.of(MssClamp(4), Dnat(A("100.64.0.1"), (A("198.18.2.2"),)))
        d.apply(plan)
        held = anon()
        idle = d.installed() is plan
        freed = held - anon()
        moved = Plan.of(MssClamp(4), Dnat(A("100.64.0.2"), (A("198.18.2.2"),)))
        d.apply(moved)
        print(json.dumps({"idle": idle, "freed_kib": freed, "moved": d.installed() == moved}))
    """)
    out = json.loads(lab.run(ns, python_exe(), "-c", script, env=dict(os.environ)).stdout)
    assert out["idle"] and out["moved"], out
    assert out["freed_kib"] >= 3 * 1024, out  # 13 tables cached at about 0.5 MiB each
