"""The readers of tailscaled's own chains (firewall/tschains.py) against the real kernel: chains made with
the real tools as tailscaled's linuxfw makes them, read back with their rule counts; emptied and removed,
read as 0; and reading creates nothing (no legacy table instantiated, no nftables table)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import python_exe
from tests.lab.netns import Lab

READ = ("import json, sys; from firewall.tschains import reader; "
        "found = reader(sys.argv[1], (4, 6)).read(); "
        "print(json.dumps(None if found is None else {' '.join(map(str, k)): v for k, v in found.items()}))")


def read(lab: Lab, ns: str, backend: str) -> dict[str, int]:
    out = lab.run(ns, python_exe(), "-c", READ, backend).stdout
    found = json.loads(out)
    assert found is not None, "the reader could not read"
    return dict(found)


def legacy_tables(lab: Lab, ns: str) -> str:
    return lab.run(ns, "sh", "-c", "cat /proc/net/ip_tables_names /proc/net/ip6_tables_names 2>/dev/null",
                   check=False).stdout


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_reads_tailscaled_chains_and_sees_them_go(lab: Lab, backend: str) -> None:
    ns = lab.ns("p")
    assert set(read(lab, ns, backend).values()) == {0}  # nothing there yet
    assert legacy_tables(lab, ns).split() == []  # and the read made no legacy table
    assert lab.run(ns, "nft", "list", "tables").stdout.strip() == ""
    if backend == "iptables":
        script = ["iptables-legacy -N ts-input", "iptables-legacy -A ts-input -i lo -s 100.64.0.7 -j ACCEPT",
                  "iptables-legacy -A ts-input -s 100.64.0.0/10 ! -i tailscale0 -j DROP",
                  "iptables-legacy -N ts-forward", "iptables-legacy -A ts-forward -i tailscale0 -j MARK --set-xmark "
                  "0x40000/0xff0000", "iptables-legacy -A INPUT -j ts-input",
                  "iptables-legacy -t nat -N ts-postrouting",
                  "iptables-legacy -t nat -A ts-postrouting -m mark --mark 0x40000/0xff0000 -j MASQUERADE",
                  "ip6tables-legacy -N ts-input", "ip6tables-legacy -A ts-input -i lo -j ACCEPT"]
        flush = ["iptables-legacy -F", "iptables-legacy -t nat -F ts-postrouting", "ip6tables-legacy -F",
                 "ip6tables-legacy -X"]
    else:
        script = ["nft add table ip filter", "nft add chain ip filter ts-input",
                  "nft add rule ip filter ts-input iifname lo ip saddr 100.64.0.7 accept",
                  "nft add rule ip filter ts-input iifname != tailscale0 ip saddr 100.64.0.0/10 drop",
                  "nft add chain ip filter ts-forward",
                  "nft add rule ip filter ts-forward iifname tailscale0 meta mark set 0x40000",
                  "nft add table ip nat", "nft add chain ip nat ts-postrouting",
                  "nft add rule ip nat ts-postrouting meta mark 0x40000 masquerade",
                  "nft add table ip6 filter", "nft add chain ip6 filter ts-input",
                  "nft add rule ip6 filter ts-input iifname lo accept"]
        flush = ["nft flush table ip filter", "nft flush chain ip nat ts-postrouting", "nft delete table ip6 filter"]
    for cmd in script:
        lab.run(ns, *cmd.split())
    assert read(lab, ns, backend) == {"4 filter ts-input": 2, "4 filter ts-forward": 1, "4 nat ts-postrouting": 1,
                                      "6 filter ts-input": 1, "6 filter ts-forward": 0, "6 nat ts-postrouting": 0}
    for cmd in flush:  # emptied (IPv4) and removed (IPv6)
        lab.run(ns, *cmd.split())
    assert set(read(lab, ns, backend).values()) == {0}
    if backend == "nftables":
        assert legacy_tables(lab, ns).split() == []
