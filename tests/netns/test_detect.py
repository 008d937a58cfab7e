"""Backend detection in fresh namespaces: rules already present, `iptables -V`, the override,
kube-proxy's hint chains, probe fallback, fake mode, and which libnftables path is used."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.conftest import containerboot_exe, python_exe
from tests.lab.netns import Lab

pytestmark = pytest.mark.root


def iptables_dir(tmp_path: Path, variant: str) -> str:
    """A PATH directory whose `iptables` is the given variant ("nft", "legacy", an old binary, none)."""
    d = tmp_path / f"bin-{variant}"
    if d.exists():
        return str(d)
    d.mkdir()
    if variant in ("nft", "legacy"):
        (d / "iptables").symlink_to(f"/usr/sbin/iptables-{variant}")
    elif variant == "old":
        # iptables before 1.8 printed no variant; none of them can run on this Debian, so a stand-in.
        (d / "iptables").write_text("#!/bin/sh\necho 'iptables v1.6.1'\n")
        (d / "iptables").chmod(0o755)
    return str(d)


def detect(lab: Lab, ns: str, path: str, *args: str, system: bool = True, **env: str) -> tuple[int, str]:
    """`containerboot detect` with `path` first on PATH (and only it, without `system`)."""
    full = {"PATH": f"{path}:/usr/sbin:/usr/bin:/sbin:/bin" if system else path, **env}
    proc = lab.run(ns, containerboot_exe(), "detect", *args, env=full, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_follows_iptables_v_variant(lab: Lab, tmp_path: Path) -> None:
    ns = lab.ns("p")
    for variant, expect in (("nft", "nf_tables"), ("legacy", "legacy"), ("old", "legacy")):
        rc, out = detect(lab, ns, iptables_dir(tmp_path, variant))
        lines = out.splitlines()
        assert rc == 0 and lines[0] == expect, out
        assert any(line.startswith("iptables -V: iptables v1.") for line in lines), out


def test_no_iptables_on_path_means_nftables(lab: Lab, tmp_path: Path) -> None:
    ns = lab.ns("p")
    rc, out = detect(lab, ns, iptables_dir(tmp_path, "none"), system=False)
    assert rc == 0 and out.splitlines()[0] == "nf_tables" and "no iptables on PATH" in out


def test_rules_in_only_one_backend_win_over_iptables_v(lab: Lab, tmp_path: Path) -> None:
    legacy_ns, nft_ns = lab.ns("l"), lab.ns("n")
    lab.run(legacy_ns, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", "198.18.0.0/15", "-j", "MASQUERADE")
    lab.run(nft_ns, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "198.18.0.0/15", "-j", "MASQUERADE")
    rc, out = detect(lab, legacy_ns, iptables_dir(tmp_path, "nft"))
    assert rc == 0 and out.splitlines()[0] == "legacy" and "only legacy holds rules here" in out, out
    rc, out = detect(lab, nft_ns, iptables_dir(tmp_path, "legacy"))
    assert rc == 0 and out.splitlines()[0] == "nf_tables" and "only nf_tables holds rules here" in out, out


def test_kube_proxy_hint_chain_is_strong_evidence(lab: Lab, tmp_path: Path) -> None:
    ns = lab.ns("k")
    # Rules in both backends; kubelet's hint chain says the host uses iptables-nft.
    lab.run(ns, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j", "ACCEPT")
    lab.run(ns, "iptables-nft", "-t", "filter", "-A", "INPUT", "-j", "ACCEPT")
    lab.run(ns, "iptables-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
    rc, out = detect(lab, ns, iptables_dir(tmp_path, "legacy"))
    assert rc == 0 and out.splitlines()[0] == "nf_tables", out
    assert "kube-proxy marks the host's iptables as nf_tables" in out


def test_override_wins(lab: Lab, tmp_path: Path) -> None:
    ns = lab.ns("o")
    lab.run(ns, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-j", "ACCEPT")
    rc, out = detect(lab, ns, iptables_dir(tmp_path, "nft"), TS_DEBUG_FIREWALL_MODE="iptables")
    assert rc == 0 and out.splitlines()[:2] == ["legacy", "TS_DEBUG_FIREWALL_MODE=iptables"], out
    rc, out = detect(lab, ns, iptables_dir(tmp_path, "legacy"), "--json", TS_DEBUG_FIREWALL_MODE="nftables")
    doc = json.loads(out.splitlines()[0])
    assert rc == 0 and doc["backend"] == "nftables" and doc["variant"] == "nf_tables"
    assert doc["evidence"][0] == "TS_DEBUG_FIREWALL_MODE=nftables"


def test_invalid_override_is_a_config_error(lab: Lab, tmp_path: Path) -> None:
    ns = lab.ns("v")
    rc, out = detect(lab, ns, iptables_dir(tmp_path, "nft"), TS_DEBUG_FIREWALL_MODE="nft")
    assert rc == 1
    assert out.strip().endswith('invalid configuration: TS_DEBUG_FIREWALL_MODE="nft" is not a firewall mode; '
                                "expected iptables, nftables or auto")


PROBE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from firewall.detect import DetectionError, Probes, detect
    from firewall.model import FirewallError

    def broken(fam):
        raise FirewallError("Could not process rule: Operation not supported")

    probes = Probes(probe={sys.argv[1]: broken})
    try:
        print(json.dumps(detect(os.environ.get("TS_DEBUG_FIREWALL_MODE", ""), probes=probes).to_json()))
    except DetectionError as exc:
        print("error:", exc)
""")


@pytest.mark.parametrize(("broken", "chosen", "fallback"), [("nftables", "nf_tables", "iptables"),
                                                           ("iptables", "legacy", "nftables")])
def test_failed_probe_falls_back_with_evidence(lab: Lab, tmp_path: Path, broken: str, chosen: str,
                                               fallback: str) -> None:
    ns = lab.ns("f")
    path = iptables_dir(tmp_path, "nft" if chosen == "nf_tables" else "legacy")
    env = {"PATH": f"{path}:/usr/sbin:/usr/bin"}
    out = lab.run(ns, python_exe(), "-c", PROBE_SCRIPT, broken, env=env).stdout
    doc = json.loads(out)
    assert doc["backend"] == fallback
    assert any(e.startswith(f"{chosen} NAT probe failed (Could not process rule") and "probe passed" in e
               for e in doc["evidence"]), doc

    # Forced to the broken backend: no silent switch, an error that says what to do.
    env["TS_DEBUG_FIREWALL_MODE"] = broken
    out = lab.run(ns, python_exe(), "-c", PROBE_SCRIPT, broken, env=env).stdout
    assert out.startswith(f"error: TS_DEBUG_FIREWALL_MODE={broken} but {chosen} NAT does not work"), out


def test_fake_netfilter_probes_and_runs_nothing(lab: Lab, tmp_path: Path) -> None:
    ns = lab.ns("z")
    record = tmp_path / "args"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("iptables", "ip6tables", "nft", "iptables-legacy"):
        (bindir / name).write_text(f'#!/bin/sh\necho "$0 $@" >> {record}\n')
        (bindir / name).chmod(0o755)
    rc, out = detect(lab, ns, str(bindir), TS_TEST_FAKE_NETFILTER="true")
    assert rc == 0 and "in-memory fake driver, nothing probed" in out
    assert not record.exists(), record.read_text()
    assert lab.run(ns, "cat", "/proc/net/ip_tables_names").stdout == ""
    assert lab.run(ns, "nft", "list", "ruleset").stdout == ""


def test_reports_the_libnftables_path(lab: Lab, tmp_path: Path) -> None:
    ns = lab.ns("j")
    rc, out = detect(lab, ns, iptables_dir(tmp_path, "nft"), "--json")
    assert rc == 0 and json.loads(out)["nft_path"] == "binding"
    # A python3-nftables that cannot be imported: the same detection through `nft -j`.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "nftables.py").write_text("raise ImportError('libnftables.so.1: cannot open shared object file')\n")
    rc, out = detect(lab, ns, iptables_dir(tmp_path, "nft") + ":" + os.path.dirname(containerboot_exe()),
                     "--json", PYTHONPATH=str(shadow))
    doc = json.loads(out)
    assert rc == 0 and doc["backend"] == "nftables" and doc["nft_path"] == "cli"
    assert any("binding unavailable" in e and "nft -j CLI" in e for e in doc["evidence"]), doc


def test_missing_net_admin_names_the_fix(lab: Lab, tmp_path: Path) -> None:
    ns = lab.ns("c")
    drop = ["setpriv", "--bounding-set", "-net_admin,-net_raw", "--inh-caps", "-net_admin,-net_raw"]
    proc = lab.run(ns, *drop, containerboot_exe(), "detect", check=False,
                   env={"PATH": f"{iptables_dir(tmp_path, 'nft')}:/usr/sbin:/usr/bin:/sbin:/bin"})
    assert proc.returncode == 1
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert "no usable netfilter backend" in last and "--cap-add NET_ADMIN" in last and "TS_USERSPACE=true" in last


def test_a_platform_the_legacy_writer_cannot_vouch_for_moves_to_nftables(lab: Lab, tmp_path: Path) -> None:
    # The struct layout of the running platform is derived, and only the three proven ABIs write legacy
    # tables. Another one (here a big-endian 32-bit ARM, stood in for by changing what was derived) is one
    # line of evidence and nftables, even where `iptables -V` says legacy.
    ns = lab.ns("v")
    script = textwrap.dedent("""
        import json, sys
        from firewall import xtables
        if sys.argv[1] == "big":
            xtables.ABI = ("big", 4, 8)
        from firewall.detect import detect
        d = detect()
        print(json.dumps({"backend": d.backend, "evidence": list(d.evidence)}))
    """)
    env = {"PATH": f"{iptables_dir(tmp_path, 'legacy')}:/usr/sbin:/usr/bin:/sbin:/bin"}
    found = {abi: json.loads(lab.run(ns, python_exe(), "-c", script, abi, env=env).stdout) for abi in ("big", "own")}
    assert found["own"]["backend"] == "iptables", found
    assert found["big"]["backend"] == "nftables", found
    why = ("legacy NAT probe failed (iptables (legacy): the legacy iptables writer is not proven on this platform "
           "(big-endian, 32-bit pointers, 64-bit values aligned to 8); use nftables); nf_tables NAT probe passed")
    assert why in found["big"]["evidence"], found

