"""A proxy's namespaces in a netns lab (tests/lab/netns.py), as the rule tests run it:

  tnet  (tailnet peer 100.64.0.2 and egress target 100.64.0.7) --- tailscale0 [proxy] eth1 --- backend
  pod   (a container beside the proxy, 198.18.1.2)              --- eth0 [proxy]          (198.18.2.2)

IPv6 likewise (fd7a:115c:a1e0::/48 on the tailnet side, fd18:1::/64 and fd18:2::/64 in the lab); `ADDR` names
every address by family. The backend and the target serve echo_server.py on both families. No namespace
has a route out of the machine.
"""

from __future__ import annotations

import os
import re

from tests.conftest import containerboot_exe
from tests.lab.netns import Lab

ADDR = {
    4: {"ts": "100.64.0.1", "ts_new": "100.64.0.3", "peer": "100.64.0.2", "target": "100.64.0.7",
        "pod_gw": "198.18.1.1", "pod": "198.18.1.2", "backend": "198.18.2.2"},
    6: {"ts": "fd7a:115c:a1e0::1", "ts_new": "fd7a:115c:a1e0::3", "peer": "fd7a:115c:a1e0::2",
        "target": "fd7a:115c:a1e0::7", "pod_gw": "fd18:1::1", "pod": "fd18:1::2", "backend": "fd18:2::2"},
}


class Topology:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.proxy, self.tnet, self.pod, self.backend = (lab.ns(n) for n in ("proxy", "tnet", "pod", "backend"))
        lab.link(self.proxy, "tailscale0", self.tnet, "eth0")
        lab.link(self.proxy, "eth0", self.pod, "eth0")
        lab.link(self.proxy, "eth1", self.backend, "eth0")
        lab.addr(self.proxy, "tailscale0", "100.64.0.1/10", "100.64.0.3/10",
                 "fd7a:115c:a1e0::1/48", "fd7a:115c:a1e0::3/48")
        lab.addr(self.tnet, "eth0", "100.64.0.2/10", "100.64.0.7/10", "fd7a:115c:a1e0::2/48", "fd7a:115c:a1e0::7/48")
        lab.addr(self.proxy, "eth0", "198.18.1.1/24", "fd18:1::1/64")
        lab.addr(self.pod, "eth0", "198.18.1.2/24", "fd18:1::2/64")
        lab.addr(self.proxy, "eth1", "198.18.2.1/24", "fd18:2::1/64")
        lab.addr(self.backend, "eth0", "198.18.2.2/24", "fd18:2::2/64")
        for ns, v4, v6 in ((self.pod, "198.18.1.1", "fd18:1::1"), (self.backend, "198.18.2.1", "fd18:2::1")):
            lab.route(ns, "default", v4)
            lab.route(ns, "default", v6)
        for fam in (4, 6):
            lab.serve(self.backend, "backend", ADDR[fam]["backend"])
            lab.serve(self.tnet, "target", ADDR[fam]["target"])

    def containerboot(self, *args: str, env: dict[str, str], check: bool = True) -> str:
        full = {"PATH": os.environ["PATH"], **env}
        proc = self.lab.run(self.proxy, containerboot_exe(), *args, env=full, check=check)
        return proc.stdout + proc.stderr

    def ruleset(self, backend: str) -> str:
        if backend == "nftables":
            return self.lab.run(self.proxy, "nft", "-s", "list", "ruleset").stdout
        return "".join(legacy_rules(self.lab.run(self.proxy, exe).stdout)
                       for exe in ("iptables-legacy-save", "ip6tables-legacy-save"))


def legacy_rules(save: str) -> str:
    """iptables-save output without comments, counters, or tables that hold nothing at all.

    (A legacy table, once instantiated in a namespace, cannot be removed from user space.)"""
    out = []
    for block in re.split(r"(?m)^(?=\*)", re.sub(r"(?m)^#.*\n", "", save)):
        block = re.sub(r"\[\d+:\d+\]", "", block)
        lines = [ln for ln in block.splitlines() if ln.strip()]
        empty = all(ln.startswith(("*", "COMMIT")) or re.fullmatch(r":[A-Z]+ ACCEPT ?", ln) for ln in lines)
        if not empty:
            out.append("\n".join(lines) + "\n")
    return "".join(out)
