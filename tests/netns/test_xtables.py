"""The iptables driver's entries and table rewrites against the kernel and iptables-legacy itself, in
fresh namespaces: iptables -C finds each rule we wrote as the one it would write, iptables-save prints
them as our Specs say, someone else's chains, jumps, gotos, policies and counters come through our
rewrites untouched, and the drift check sees a rule replaced by one of the same size."""

from __future__ import annotations

import json
import os
import re
import shlex
import textwrap

import pytest

from tests.conftest import containerboot_exe, python_exe
from tests.lab.netns import Lab

pytestmark = pytest.mark.root

PLAN = textwrap.dedent("""
    import ipaddress, json, sys
    from firewall.iptables import CHAINS, IptablesDriver, render
    from firewall.model import Dnat, DnatNonTailnet, MssClamp, Plan, Snat
    A = ipaddress.ip_address
    def plan(fam, moved=False):
        if fam == 4:
            ts, peer, be = A("100.64.0.1"), A("100.64.0.7"), [A("198.18.2.2"), A("198.18.2.3"), A("198.18.2.4")]
            other = A("100.64.0.9")
        else:
            ts, peer, be = A("fd7a::1"), A("fd7a::7"), [A("fd18:2::2"), A("fd18:2::3"), A("fd18:2::4")]
            other = A("fd7a::9")
        return Plan.of(Dnat(ts, (be[0],)), Dnat(other, (be[2] if moved else be[1],)), Dnat(peer, tuple(be)),
                       DnatNonTailnet(peer), Snat(peer, ts), MssClamp(fam))
""")

SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
RESTORE = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}
IPT = {4: "iptables-legacy", 6: "ip6tables-legacy"}


def python(lab: Lab, ns: str, body: str) -> str:
    return lab.run(ns, python_exe(), "-c", PLAN + textwrap.dedent(body), env=dict(os.environ)).stdout


@pytest.mark.parametrize("fam", [4, 6])
def test_iptables_finds_each_rule_as_its_own(lab: Lab, fam: int) -> None:
    ns = lab.ns("c")
    specs = json.loads(python(lab, ns, f"""
        IptablesDriver().apply(plan({fam}))
        print(json.dumps([[CHAINS[s.chain][0], str(s)] for s in render(plan({fam}), {fam})]))
    """))
    save = lab.run(ns, SAVE[fam]).stdout
    for chain in ("CONTAINERBOOT-PREROUTING", "CONTAINERBOOT-POSTROUTING", "CONTAINERBOOT-FORWARD"):
        listed = [ln for ln in save.splitlines() if ln.startswith(f"-A {chain} ")]
        assert listed == [text for _, text in specs if text.startswith(f"-A {chain} ")]  # as our Specs say
    for table, text in specs:
        chain_args = shlex.split(text)  # "-A CHAIN ..." -> "-C CHAIN ...": iptables compares its own entry
        check = lab.run(ns, IPT[fam], "-t", table, "-C", *chain_args[1:], check=False)
        assert check.returncode == 0, f"iptables does not find {text!r}: {check.stderr}"
    # And -C can fail: the same rule with another address is not there.
    table, text = specs[0]
    wrong = re.sub(r"--to-destination \S+", "--to-destination " + ("198.18.99.9" if fam == 4 else "fd18::99"), text)
    assert lab.run(ns, IPT[fam], "-t", table, "-C", *shlex.split(wrong)[1:], check=False).returncode == 1


FOREIGN = {
    4: """*nat
:PREROUTING ACCEPT [11:1100]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [2:200]
:POSTROUTING ACCEPT [0:0]
:AAA - [0:0]
:KUBE-SERVICES - [0:0]
:ZZZ - [0:0]
[5:500] -A PREROUTING -j KUBE-SERVICES
[6:600] -A PREROUTING -s 198.18.9.9/32 -g ZZZ
[7:700] -A OUTPUT -j AAA
[1:10] -A AAA -d 198.18.9.1/32 -j ZZZ
[8:800] -A AAA -j RETURN
[3:30] -A KUBE-SERVICES -m comment --comment "svc a" -j RETURN
[4:40] -A ZZZ -p tcp -m tcp --dport 80 -j DNAT --to-destination 198.18.9.2:8080
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD DROP [3:300]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
[9:900] -A FORWARD -i eth9 -j ACCEPT
COMMIT
""",
    6: """*nat
:PREROUTING ACCEPT [11:1100]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [2:200]
:POSTROUTING ACCEPT [0:0]
:AAA - [0:0]
:ZZZ - [0:0]
[6:600] -A PREROUTING -s fd18:9::9/128 -g ZZZ
[7:700] -A OUTPUT -j AAA
[1:10] -A AAA -d fd18:9::1/128 -j ZZZ
[4:40] -A ZZZ -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd18:9::2]:8080
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD DROP [3:300]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
[9:900] -A FORWARD -i eth9 -j ACCEPT
COMMIT
""",
}


def saved(lab: Lab, ns: str, fam: int) -> list[str]:
    """iptables-save -c without its comments: counters, policies, chains and rules in table order."""
    return [ln for ln in lab.run(ns, SAVE[fam], "-c").stdout.splitlines() if not ln.startswith("#")]


def without_ours(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "CONTAINERBOOT-" not in ln]


@pytest.mark.parametrize("fam", [4, 6])
def test_someone_elses_rules_keep_their_place_targets_and_counters(lab: Lab, fam: int) -> None:
    ns = lab.ns("f")
    lab.run(ns, "sh", "-c", f"{RESTORE[fam]} -c <<'EOF'\n{FOREIGN[fam]}EOF")
    before = saved(lab, ns, fam)
    assert "[6:600] -A PREROUTING" in "\n".join(before)

    python(lab, ns, f"IptablesDriver().apply(plan({fam}))")
    applied = saved(lab, ns, fam)
    assert without_ours(applied) == before
    assert sorted(ln for ln in applied if "-j CONTAINERBOOT-" in ln) == [
        "[0:0] -A FORWARD -j CONTAINERBOOT-FORWARD", "[0:0] -A POSTROUTING -j CONTAINERBOOT-POSTROUTING",
        "[0:0] -A PREROUTING -j CONTAINERBOOT-PREROUTING"]
    assert applied[applied.index("[0:0] -A PREROUTING -j CONTAINERBOOT-PREROUTING") - 1].startswith(":")  # first
    for block in "\n".join(applied).split("*")[1:]:  # per table: user chains in name order, as iptables keeps them
        chains = [ln.split()[0] for ln in block.splitlines() if ln.startswith(":") and ln.split()[1] == "-"]
        assert [c for c in chains if c.startswith(":CONTAINERBOOT")] and chains == sorted(chains), block

    # A rule of ours gets counters; a change elsewhere in our chain keeps them (and everyone else's).
    ours = next(ln for ln in applied if "-A CONTAINERBOOT-PREROUTING" in ln).split(" ", 1)[1]
    lab.run(ns, IPT[fam], "-t", "nat", "-R", "CONTAINERBOOT-PREROUTING", "1", *shlex.split(ours)[2:],
            "-c", "12", "1200")
    before = saved(lab, ns, fam)  # (iptables -R itself zeroes the built-in chains' policy counters)
    python(lab, ns, f"IptablesDriver().apply(plan({fam}, moved=True))")
    moved = saved(lab, ns, fam)
    assert without_ours(moved) == without_ours(before)
    assert f"[12:1200] {ours}" in moved
    assert any("--to-destination " + ("198.18.2.4" if fam == 4 else "fd18:2::4") in ln for ln in moved)

    python(lab, ns, "IptablesDriver().flush()")
    assert saved(lab, ns, fam) == without_ours(before)  # what it was, counters included


def test_the_drift_check_reads_only_what_changed(lab: Lab) -> None:
    """The worker answers "same" without a parse while only counters move, and sees a rule replaced by
    another of exactly the same size (so the table's size and entry count say nothing)."""
    ns = lab.ns("d")
    out = json.loads(python(lab, ns, """
        import subprocess
        from firewall.iptables import OWNED, chain_entries
        from firewall.iptables_kernel import Server
        p = plan(4)
        server = Server(4)
        entries = chain_entries(p, 4)
        tables = {t: {c: (b, entries[c]) for c, b in o.items()} for t, o in OWNED.items()}
        v = server.write(tables)
        out = {"after_write": server.read(OWNED, v).same}
        rule = "-d 100.64.0.1/32 -j DNAT --to-destination 198.18.2.2"
        subprocess.run(["iptables-legacy", "-t", "nat", "-R", "CONTAINERBOOT-PREROUTING", "1", *rule.split(),
                        "-c", "5", "50"], check=True)  # the same rule, other counters: a new table all the same
        out["counters"] = server.read(OWNED, v).same
        subprocess.run(["iptables-legacy", "-t", "nat", "-R", "CONTAINERBOOT-PREROUTING", "1",
                        *rule.replace("198.18.2.2", "198.18.2.9").split()], check=True)
        reply = server.read(OWNED, v)
        out["replaced"] = reply.same
        out["version"] = reply.version > v
        out["same_again"] = server.read(OWNED, reply.version).same
        d = IptablesDriver()
        d.apply(p)
        subprocess.run(["iptables-legacy", "-t", "nat", "-R", "CONTAINERBOOT-PREROUTING", "1",
                        *rule.replace("198.18.2.2", "198.18.2.9").split()], check=True)
        found = d.installed()
        out["driver_sees_it"] = found != p and "dnat 100.64.0.1 -> 198.18.2.9" in str(found)
        d.apply(p)
        out["repaired"] = d.installed() == p
        print(json.dumps(out))
    """))
    assert out == {"after_write": True, "counters": True, "replaced": False, "version": True,
                   "same_again": True, "driver_sees_it": True, "repaired": True}, out


# ---- someone else's rules around ours (issue 17's four defects) -------------------------------------------


def nat_lines(lines: list[str], chain: str) -> list[str]:
    return [ln for ln in lines if ln.split(" ", 2)[1:2] == ["-A"] and ln.split()[2] == chain]


def test_an_ipv6_rule_of_ours_past_4_gib_is_still_ours(lab: Lab) -> None:
    ns = lab.ns("g")
    python(lab, ns, "IptablesDriver().apply(plan(6))")
    ours = next(ln for ln in saved(lab, ns, 6) if "-A CONTAINERBOOT-PREROUTING" in ln).split(" ", 1)[1]
    # The byte counter's high half sits after ip6t_entry's padding on 64-bit: past 4 GiB it is non-zero.
    lab.run(ns, IPT[6], "-t", "nat", "-R", "CONTAINERBOOT-PREROUTING", "1", *shlex.split(ours)[2:],
            "-c", "1", "4294967297")
    out = json.loads(python(lab, ns, """
        d = IptablesDriver()
        found = d.installed()
        d.apply(plan(6, moved=True))
        print(json.dumps({"same": found == plan(6), "found": str(found)}))
    """))
    assert out["same"], out["found"]
    assert f"[1:4294967297] {ours}" in saved(lab, ns, 6)  # the rule stayed, and so did its counters


@pytest.mark.parametrize("fam", [4, 6])
def test_a_rule_without_a_target_above_our_jump(lab: Lab, fam: int) -> None:
    ns = lab.ns("t")
    python(lab, ns, f"IptablesDriver().apply(plan({fam}))")
    # The kernel holds a rule without a target as a jump to the entry after it: here, our jump.
    lab.run(ns, IPT[fam], "-t", "nat", "-I", "PREROUTING", "1", "-s", "198.18.9.1" if fam == 4 else "fd18:9::1")
    before = without_ours(saved(lab, ns, fam))
    python(lab, ns, f"IptablesDriver().apply(plan({fam}, moved=True))")
    assert without_ours(saved(lab, ns, fam)) == before
    python(lab, ns, "IptablesDriver().flush()")
    assert saved(lab, ns, fam) == before
    # And it still works as a rule: iptables finds it, and can delete it.
    lab.run(ns, IPT[fam], "-t", "nat", "-D", "PREROUTING", "-s", "198.18.9.1" if fam == 4 else "fd18:9::1")


@pytest.mark.parametrize("where", ["above", "below"])
def test_someone_elses_jump_into_our_chain_is_left_alone(lab: Lab, where: str) -> None:
    ns = lab.ns("j")
    python(lab, ns, "IptablesDriver().apply(plan(4))")
    theirs = ["-i", "eth7", "-j", "CONTAINERBOOT-PREROUTING"]
    lab.run(ns, IPT[4], "-t", "nat", *(["-I", "PREROUTING", "1"] if where == "above" else ["-A", "PREROUTING"]),
            *theirs)
    before = nat_lines(saved(lab, ns, 4), "PREROUTING")
    assert len(before) == 2
    out = json.loads(python(lab, ns, """
        d = IptablesDriver()
        d.apply(plan(4, moved=True))
        print(json.dumps({"same": d.installed() == plan(4, moved=True)}))
    """))
    assert out["same"]
    assert nat_lines(saved(lab, ns, 4), "PREROUTING") == before  # both jumps, in their places

    # Our own jump deleted by someone: theirs does not stand in for it. The drift check sees our rules
    # gone and the repair puts our jump back at the top, theirs untouched.
    lab.run(ns, IPT[4], "-t", "nat", "-D", "PREROUTING", "-j", "CONTAINERBOOT-PREROUTING")
    out = json.loads(python(lab, ns, """
        d = IptablesDriver()
        found = d.installed()
        d.apply(plan(4))
        print(json.dumps({"dnats": "dnat" in str(found), "repaired": d.installed() == plan(4)}))
    """))
    assert out == {"dnats": False, "repaired": True}, out
    after = nat_lines(saved(lab, ns, 4), "PREROUTING")
    assert after[0] == "[0:0] -A PREROUTING -j CONTAINERBOOT-PREROUTING"
    assert after[1:] == ["[0:0] -A PREROUTING -i eth7 -j CONTAINERBOOT-PREROUTING"], after


def test_a_jump_from_another_chain_keeps_our_chain_and_says_where(lab: Lab) -> None:
    ns = lab.ns("o")
    python(lab, ns, "IptablesDriver().apply(Plan.read_back([*plan(4).rules, *plan(6).rules]))")
    lab.run(ns, IPT[4], "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-j", "CONTAINERBOOT-PREROUTING")
    proc = lab.run(ns, containerboot_exe(), "flush", check=False, env=dict(os.environ))
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert "nat: chain CONTAINERBOOT-PREROUTING is kept: rules we did not install jump to it (OUTPUT rule 1)" \
        in lines[0], lines
    # What could go went: mangle's chain and every IPv6 chain; nat is left whole, theirs and ours.
    v4, v6 = saved(lab, ns, 4), saved(lab, ns, 6)
    assert not [ln for ln in v4 if "CONTAINERBOOT-FORWARD" in ln]
    assert not [ln for ln in v6 if "CONTAINERBOOT" in ln]
    assert "[0:0] -A OUTPUT -o lo -j CONTAINERBOOT-PREROUTING" in v4
    assert nat_lines(v4, "CONTAINERBOOT-PREROUTING")
