"""The backend decision as a table: override x rules present x `iptables -V` x probe results (pure, no root).

Like upstream's TestPickFirewallModeFromInstalledRules, with the facts given instead of gathered; the
rows also say which facts the decision asked for, since a probe of legacy iptables creates its nat table
and must run only when the decision needs it. tests/netns/test_detect.py gathers the same facts for real.
"""

from __future__ import annotations

import itertools

import pytest

from firewall.detect import Ask, Census, Detection, DetectionError, Facts, Probe, decide

NFT_V, LEGACY_V, OLD_V = "iptables v1.8.9 (nf_tables)", "iptables v1.8.9 (legacy)", "iptables v1.6.1"
NONE = {"iptables": Census(0), "nftables": Census(0)}
LEGACY_RULES = {"iptables": Census(12), "nftables": Census(0)}
NFT_RULES = {"iptables": Census(0), "nftables": Census(30)}
BOTH = {"iptables": Census(12), "nftables": Census(30)}
HINT_NFT = {"iptables": Census(12), "nftables": Census(30, ("ip mangle/KUBE-IPTABLES-HINT",))}
HINT_LEGACY = {"iptables": Census(12, ("ipv4 mangle/KUBE-IPTABLES-HINT",)), "nftables": Census(30)}
UNREADABLE = {"iptables": Census(0, error="Permission denied"), "nftables": Census(0)}
OK, FAIL, BUSY = Probe("passed"), Probe("failed", "Could not process rule: Operation not supported"), \
    Probe("busy", "another process has held the xtables lock /run/xtables.lock for more than 5s")
EPERM = Probe("failed", "table nat: Operation not permitted")
LIBNFT = ("binding", "libnftables through the python3-nftables binding")


def run(override: str, census: dict[str, Census], version: str | None,
        probes: dict[tuple[str, int], Probe]) -> tuple[Detection | str, list[str]]:
    """decide() until it answers, giving each fact it asks for from the row; returns what it asked too."""
    facts, asked = Facts(override=override), list[str]()
    while True:
        try:
            step = decide(facts)
        except DetectionError as exc:
            return f"error: {exc}", asked
        if isinstance(step, Detection):
            return step, asked
        assert isinstance(step, Ask)
        asked.append(step.what if step.what != "probe" else f"probe {step.backend} {step.family}")
        match step.what:
            case "census":
                facts = Facts(facts.override, census, facts.version, facts.probes, facts.libnft)
            case "version":
                facts = Facts(facts.override, facts.census, version, facts.probes, facts.libnft)
            case "probe":
                key = (step.backend, step.family)
                facts = Facts(facts.override, facts.census, facts.version, {**facts.probes, key: probes.get(key, OK)},
                              facts.libnft)
            case "libnft":
                facts = Facts(facts.override, facts.census, facts.version, facts.probes, LIBNFT)


ALL_OK: dict[tuple[str, int], Probe] = {}
ROWS = [
    # override, rules present, iptables -V, probes -> backend, families, evidence that must appear, facts asked
    ("", NONE, NFT_V, ALL_OK, "nftables", (4, 6), "iptables -V: iptables v1.8.9 (nf_tables)",
     ["census", "version", "probe nftables 4", "probe nftables 6", "libnft"]),
    ("", NONE, LEGACY_V, ALL_OK, "iptables", (4, 6), "iptables -V: iptables v1.8.9 (legacy)",
     ["census", "version", "probe iptables 4", "probe iptables 6"]),
    ("", NONE, OLD_V, ALL_OK, "iptables", (4, 6), "iptables -V: iptables v1.6.1", None),
    ("", NONE, None, ALL_OK, "nftables", (4, 6), "no iptables on PATH", None),
    # Rules in exactly one backend win over iptables -V, which is then not even run.
    ("", LEGACY_RULES, NFT_V, ALL_OK, "iptables", (4, 6), "only legacy holds rules here",
     ["census", "probe iptables 4", "probe iptables 6"]),
    ("", NFT_RULES, LEGACY_V, ALL_OK, "nftables", (4, 6), "only nf_tables holds rules here",
     ["census", "probe nftables 4", "probe nftables 6", "libnft"]),
    ("", BOTH, LEGACY_V, ALL_OK, "iptables", (4, 6), "nf_tables rules in this namespace: 30", None),
    ("", BOTH, NFT_V, ALL_OK, "nftables", (4, 6), "legacy rules in this namespace: 12", None),
    # kube-proxy's hint chain is the host's own statement.
    ("", HINT_NFT, LEGACY_V, ALL_OK, "nftables", (4, 6), "kube-proxy marks the host's iptables as nf_tables", None),
    ("", HINT_LEGACY, NFT_V, ALL_OK, "iptables", (4, 6), "kube-proxy marks the host's iptables as legacy", None),
    ("", UNREADABLE, NFT_V, ALL_OK, "nftables", (4, 6), "legacy rules in this namespace: unreadable (Permission", None),
    # The override wins over rules and iptables -V, which are not looked at.
    ("iptables", NFT_RULES, NFT_V, ALL_OK, "iptables", (4, 6), "TS_DEBUG_FIREWALL_MODE=iptables",
     ["probe iptables 4", "probe iptables 6"]),
    ("nftables", LEGACY_RULES, LEGACY_V, ALL_OK, "nftables", (4, 6), "TS_DEBUG_FIREWALL_MODE=nftables",
     ["probe nftables 4", "probe nftables 6", "libnft"]),
    ("auto", LEGACY_RULES, NFT_V, ALL_OK, "iptables", (4, 6), "only legacy holds rules here", None),
    # A failed probe falls back to the other backend, with the reason.
    ("", NONE, NFT_V, {("nftables", 4): FAIL}, "iptables", (4, 6),
     "nf_tables NAT probe failed (Could not process rule: Operation not supported); legacy NAT probe passed",
     ["census", "version", "probe nftables 4", "probe iptables 4", "probe iptables 6"]),
    ("", NONE, LEGACY_V, {("iptables", 4): FAIL}, "nftables", (4, 6), "legacy NAT probe failed", None),
    ("", NONE, NFT_V, {("nftables", 4): FAIL, ("iptables", 4): BUSY}, "iptables", (4, 6),
     "legacy NAT probe not run (another process has held the xtables lock", None),
    # A busy xtables lock means someone uses legacy iptables right now: evidence, not failure.
    ("", NONE, LEGACY_V, {("iptables", 4): BUSY}, "iptables", (4, 6), "legacy NAT probe not run", None),
    ("iptables", NONE, NFT_V, {("iptables", 4): BUSY, ("iptables", 6): BUSY}, "iptables", (4, 6),
     "IPv6 NAT probe not run", None),
    # No IPv6 NAT: IPv4 only, said so.
    ("", NONE, NFT_V, {("nftables", 6): FAIL}, "nftables", (4,), "IPv6 NAT unavailable in nf_tables", None),
    ("", LEGACY_RULES, NFT_V, {("iptables", 6): FAIL}, "iptables", (4,), "IPv6 rules are skipped", None),
    # Nothing works, or the forced backend does not: an error that says what to do.
    ("", NONE, NFT_V, {("nftables", 4): FAIL, ("iptables", 4): FAIL}, "error",
     (), "no usable netfilter backend: nf_tables NAT probe failed", None),
    ("", NONE, NFT_V, {("nftables", 4): EPERM, ("iptables", 4): EPERM}, "error", (), "--cap-add NET_ADMIN", None),
    ("nftables", NONE, NFT_V, {("nftables", 4): FAIL}, "error", (),
     "TS_DEBUG_FIREWALL_MODE=nftables but nf_tables NAT does not work in this kernel", ["probe nftables 4"]),
]


@pytest.mark.parametrize(("override", "census", "version", "probes", "backend", "families", "evidence", "asked"),
                         ROWS)
def test_decision_table(override: str, census: dict[str, Census], version: str | None,
                        probes: dict[tuple[str, int], Probe], backend: str, families: tuple[int, ...],
                        evidence: str, asked: list[str] | None) -> None:
    result, questions = run(override, census, version, probes)
    if backend == "error":
        assert isinstance(result, str) and evidence in result, result
    else:
        assert isinstance(result, Detection), result
        assert (result.backend, result.families) == (backend, families)
        assert any(evidence in e for e in result.evidence), result.evidence
        assert result.lines()[0] == {"nftables": "nf_tables", "iptables": "legacy"}[backend]
        assert (result.nft_path == "binding") == (backend == "nftables")
    if asked is not None:
        assert questions == asked


CENSUSES = [NONE, LEGACY_RULES, NFT_RULES, BOTH, HINT_NFT, HINT_LEGACY]
OUTCOMES = [OK, FAIL, BUSY]


@pytest.mark.parametrize("override", ["", "iptables", "nftables"])
@pytest.mark.parametrize("version", [NFT_V, LEGACY_V, OLD_V, None])
def test_every_combination_keeps_the_rules(override: str, version: str | None) -> None:
    """Over every census and every outcome of the four probes: what each rule of the precedence promises."""
    keys = [("nftables", 4), ("nftables", 6), ("iptables", 4), ("iptables", 6)]
    for census, outcomes in itertools.product(CENSUSES, itertools.product(OUTCOMES, repeat=4)):
        probes = dict(zip(keys, outcomes, strict=True))
        result, asked = run(override, census, version, probes)
        if override:
            assert "census" not in asked and "version" not in asked
            assert all(q.startswith(f"probe {override}") for q in asked if q.startswith("probe"))
            if isinstance(result, str):
                assert probes[(override, 4)] is FAIL and "TS_DEBUG_FIREWALL_MODE" in result
                continue
            assert result.backend == override
        if isinstance(result, str):
            assert probes[("nftables", 4)] is FAIL and probes[("iptables", 4)] is FAIL
            continue
        chosen = result.backend
        assert probes[(chosen, 4)] is not FAIL
        assert (6 in result.families) == (probes[(chosen, 6)] is not FAIL)
        other = "iptables" if chosen == "nftables" else "nftables"
        # The other backend is probed only when the first choice failed its probe.
        if f"probe {other} 4" in asked:
            assert probes[(other, 4)] is FAIL and not override
        if not override and f"probe {other} 4" not in asked:
            hinted = [b for b, c in census.items() if c.hints]
            used = [b for b, c in census.items() if c.rules]
            expect = hinted[0] if len(hinted) == 1 else used[0] if len(used) == 1 else (
                "nftables" if version is None or "nf_tables" in version else "iptables")
            assert chosen == expect
            assert ("version" in asked) == (len(hinted) != 1 and len(used) != 1)
