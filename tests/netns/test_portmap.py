"""Egress services (PortMap): real rules of each driver carry real TCP and UDP packets, at 1, 10 and 1,000 services.

Topology (one set of namespaces per test):

  cluster (198.18.1.2, fd18:1::2) --- eth0 [proxy] tailscale0 --- tnet (targets 100.64.0.7-11, fd7a:115c:a1e0::7-b)
                                   198.18.1.1       100.64.0.1
                                   fd18:1::1        fd7a:115c:a1e0::1

The proxy's tailscale0 is a veth standing in for the tun device. A service is a protocol and port on the
proxy's cluster-facing address; it goes, in each family, to a target address and port in tnet, leaving with
the proxy's tailnet address (the Snat the caller pairs with every PortMap). tnet has no route to the
cluster, so a reply only comes back through both rules. The targets answer with the address and port they
were reached on and the peer they saw, so every probe shows where its packets went.

The drivers run in one process in the proxy namespace (HOST below): the one that applies, and a second one
that only reads, so that `installed() == plan` is read from the kernel, not from what the first remembers.
"""

from __future__ import annotations

import itertools
import json
import random
import selectors
import subprocess
from ipaddress import ip_address
from typing import Any

import pytest

from tests.conftest import python_exe
from tests.lab.netns import Lab

BACKENDS = ["iptables", "nftables-binding", "nftables-cli"]
TS = {4: "100.64.0.1", 6: "fd7a:115c:a1e0::1"}  # the proxy's tailnet addresses
FRONT = {4: "198.18.1.1", 6: "fd18:1::1"}  # the proxy's cluster-facing addresses
TARGETS = {4: [f"100.64.0.{i}" for i in (7, 8, 9, 10)], 6: [f"fd7a:115c:a1e0::{i}" for i in (7, 8, 9, "a")]}
MOVED = {4: "100.64.0.11", 6: "fd7a:115c:a1e0::b"}  # where a moved service's target goes
_sport = itertools.count(30000)  # client source ports, never reused: a new probe never meets an old conntrack entry

# The drivers, in the proxy namespace: one JSON request a line, one JSON reply a line.
HOST = r"""
import ipaddress, json, sys, time
sys.path.insert(0, sys.argv[1])
from firewall.model import Foreign, Plan, PortMap, Snat

def make(kind):
    if kind == "iptables":
        from firewall.iptables import IptablesDriver
        return IptablesDriver()
    from firewall.nftables import NftablesDriver, open_libnft
    return NftablesDriver(open_libnft(kind.split("-")[1])[0])

def rule(r):
    a = ipaddress.ip_address
    return PortMap(r[1], r[2], a(r[3]), r[4]) if r[0] == "portmap" else Snat(a(r[1]), a(r[2]))

driver, reader = make(sys.argv[2]), make(sys.argv[2])
plan = Plan()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    start = time.perf_counter()
    if req["op"] in ("apply", "repair"):  # repair: as the boot's drift check does, trusting nothing remembered
        plan = Plan.of(*map(rule, req["rules"]))
        driver.apply(plan, full=req["op"] == "repair")
    elif req["op"] == "flush":
        driver.flush()
        plan = Plan()
    elif req["op"] == "expect":  # compare what is installed with this plan, installing nothing
        plan = Plan.of(*map(rule, req["rules"]))
    took = time.perf_counter() - start
    found = reader.installed()
    diff = sorted(str(r) for r in found.rules ^ plan.rules)
    foreign = sum(isinstance(r, Foreign) for r in found.rules)
    print(json.dumps({"took": took, "equal": found == plan, "found": len(found.rules), "diff": diff[:6],
                      "foreign": foreign,
                      "applier_equal": driver.installed() == plan}), flush=True)
"""

# The targets, in tnet: every (proto, address, port) given on stdin, answered "<proto> <address> <port> from <peer>".
SERVER = r"""
import json, resource, selectors, socket, sys
want = json.loads(sys.stdin.readline())
resource.setrlimit(resource.RLIMIT_NOFILE, (len(want) + 256, len(want) + 256))
sel = selectors.DefaultSelector()
for proto, addr, port in want:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    if proto == "tcp":
        s.listen(16)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, proto)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        local = s.getsockname()
        if key.data == "tcp":
            try:
                conn, peer = s.accept()
            except BlockingIOError:
                continue
            with conn:
                conn.settimeout(2)
                conn.sendall(f"tcp {local[0]} {local[1]} from {peer[0]}".encode())
        else:
            try:
                _, peer = s.recvfrom(512)
            except BlockingIOError:
                continue
            s.sendto(f"udp {local[0]} {local[1]} from {peer[0]}".encode(), peer)
"""

# Probes, in the cluster namespace: [proto, address, port, source port] each; the reply text, or None.
CLIENT = r"""
import json, socket, sys
out = []
for proto, addr, port, sport in json.loads(sys.stdin.read()):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
        s.connect((addr, port))
        if proto == "udp":
            s.send(b"?")
            out.append(s.recv(512).decode())
        else:
            data = b""
            while chunk := s.recv(512):
                data += chunk
            out.append(data.decode())
    except OSError:
        out.append(None)
    finally:
        s.close()
print(json.dumps(out))
"""


class Service:
    """Service i: a protocol and port on the proxy, and in each family a target address and port."""

    def __init__(self, i: int) -> None:
        self.i = i
        self.proto = "tcp" if i % 2 == 0 else "udp"
        self.port = 10000 + i
        self.to = {fam: TARGETS[fam][i % 4] for fam in (4, 6)}
        self.to_port = 20000 + i // 4  # with the address, one target of its own for each service

    def rules(self) -> list[list[Any]]:
        return [["portmap", self.proto, self.port, self.to[fam], self.to_port] for fam in (4, 6)]

    def expect(self, fam: int) -> str:
        return f"{self.proto} {self.to[fam]} {self.to_port} from {TS[fam]}"


def plan_rules(services: list[Service]) -> list[list[Any]]:
    """The PortMaps of `services` and the Snat for each target they use (what the operator's caller adds)."""
    rules = [r for s in services for r in s.rules()]
    targets = {(fam, s.to[fam]) for s in services for fam in (4, 6)}
    return rules + [["snat", to, TS[fam]] for fam, to in sorted(targets)]


class Topology:
    def __init__(self, lab: Lab, backend: str) -> None:
        self.lab = lab
        self.proxy, self.cluster, self.tnet = (lab.ns(n) for n in ("proxy", "cluster", "tnet"))
        lab.link(self.proxy, "eth0", self.cluster, "eth0")
        lab.link(self.proxy, "tailscale0", self.tnet, "eth0")
        lab.addr(self.proxy, "eth0", "198.18.1.1/24", "fd18:1::1/64")
        lab.addr(self.cluster, "eth0", "198.18.1.2/24", "fd18:1::2/64")
        lab.route(self.cluster, "default", "198.18.1.1")
        lab.route(self.cluster, "default", "fd18:1::1")
        lab.addr(self.proxy, "tailscale0", "100.64.0.1/10", "fd7a:115c:a1e0::1/48")
        lab.addr(self.tnet, "eth0", "100.64.0.2/10", "fd7a:115c:a1e0::2/48",
                 *(f"{t}/10" for t in [*TARGETS[4], MOVED[4]]), *(f"{t}/48" for t in [*TARGETS[6], MOVED[6]]))
        self.backend = backend
        self.host = lab.spawn(self.proxy, [python_exe(), "-c", HOST, str(_root()), backend],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._line(self.host, 60) == {"ready": True}

    @staticmethod
    def _line(proc: subprocess.Popen[str], timeout: float) -> Any:
        """The next line `proc` writes, as JSON, within `timeout` seconds."""
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"no answer within {timeout:g}s")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process ended (status {proc.poll()})")
        return json.loads(line) if line.strip() != "ready" else "ready"

    def call(self, op: str, rules: list[list[Any]] | None = None) -> dict[str, Any]:
        assert self.host.stdin is not None
        self.host.stdin.write(json.dumps({"op": op, "rules": rules or []}) + "\n")
        self.host.stdin.flush()
        reply: dict[str, Any] = self._line(self.host, 120)
        return reply

    def apply(self, services: list[Service]) -> dict[str, Any]:
        reply = self.call("apply", plan_rules(services))
        assert reply["equal"] and reply["applier_equal"], f"installed() != plan after apply: {reply['diff']}"
        return reply

    def installed_equal(self) -> bool:
        """Whether both drivers read back the last plan (an apply of nothing new: `apply` again is idempotent)."""
        reply = self.call("check")
        return bool(reply["equal"]) and bool(reply["applier_equal"])

    def serve(self, targets: set[tuple[str, str, int]]) -> None:
        proc = self.lab.spawn(self.tnet, [python_exe(), "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(sorted(targets)) + "\n")
        proc.stdin.flush()
        assert self._line(proc, 30) == "ready"

    def probe(self, ns: str, probes: list[tuple[str, str, int]]) -> list[str | None]:
        argv = [python_exe(), "-c", CLIENT]
        data = json.dumps([[*p, next(_sport)] for p in probes])
        proc = subprocess.run(["ip", "netns", "exec", ns, *argv], input=data, capture_output=True, text=True,
                              timeout=10 + 3 * len(probes), check=True)
        out: list[str | None] = json.loads(proc.stdout)
        return out

    def check(self, services: list[Service], forwarding: bool = True) -> None:
        """Each service, in each family, from the cluster: reaches its target (or nothing at all)."""
        probes = [(s.proto, FRONT[fam], s.port) for s in services for fam in (4, 6)]
        want = [s.expect(fam) if forwarding else None for s in services for fam in (4, 6)]
        got = self.probe(self.cluster, probes)
        wrong = [(p, w, g) for p, w, g in zip(probes, want, got, strict=True) if w != g]
        assert not wrong, f"{len(wrong)} of {len(probes)} probes went wrong (probe, wanted, got): {wrong[:5]}"


def _root() -> str:
    from tests.conftest import ROOT

    return str(ROOT)


def targets_of(services: list[Service]) -> set[tuple[str, str, int]]:
    return {(s.proto, s.to[fam], s.to_port) for s in services for fam in (4, 6)}


def sample(services: list[Service], k: int = 24) -> list[Service]:
    """All of a few services; of many, the first, the last and some in between (both protocols)."""
    if len(services) <= k:
        return services
    rng = random.Random(len(services))
    return [services[0], services[-1], *rng.sample(services[1:-1], k - 2)]


@pytest.fixture(params=BACKENDS)
def topo(lab: Lab, request: pytest.FixtureRequest) -> Topology:
    return Topology(lab, request.param)


@pytest.mark.root
@pytest.mark.parametrize("n", [1, 10, 1000])
def test_services_carry_packets(topo: Topology, n: int) -> None:
    services = [Service(i) for i in range(n)]
    probed = sample(services)
    unmapped = [Service(n), Service(n + 1)]  # the next ports, TCP and UDP: their targets listen, unreached
    topo.serve(targets_of(probed) | targets_of(unmapped))
    topo.check(probed[:2], forwarding=False)  # nothing forwards before the rules exist
    reply = topo.apply(services)
    assert reply["found"] == 2 * n + len({(fam, s.to[fam]) for s in services for fam in (4, 6)})
    topo.check(probed)
    topo.check(unmapped, forwarding=False)
    # Only what does not arrive on tailscale0 is mapped: the tailnet side reaching the same port is not.
    first = probed[0]
    assert topo.probe(topo.tnet, [(first.proto, TS[4], first.port), (first.proto, TS[6], first.port)]) == [None, None]
    topo.call("flush")
    topo.check(probed[:2], forwarding=False)


@pytest.mark.root
@pytest.mark.parametrize("n", [10, 1000])
def test_removed_service_stops_and_moved_target_is_followed(topo: Topology, n: int) -> None:
    services = [Service(i) for i in range(n)]
    gone, moving = services[n // 2], services[n // 2 + 1]
    probed = [s for s in sample(services) if s not in (gone, moving)] + [gone, moving]
    moved = Service(moving.i)
    moved.to = dict(MOVED)
    topo.serve(targets_of(probed) | targets_of([moved]))
    topo.apply(services)
    topo.check(probed)

    rest = [s for s in services if s is not gone]
    topo.apply(rest)  # installed() == plan is asserted by apply
    topo.check([gone], forwarding=False)
    topo.check([s for s in probed if s is not gone])

    after = [moved if s is moving else s for s in rest]
    topo.apply(after)
    assert topo.probe(topo.cluster, [(moving.proto, FRONT[fam], moving.port) for fam in (4, 6)]) == \
        [moved.expect(4), moved.expect(6)]
    topo.check([s for s in probed if s not in (gone, moving)])

    topo.apply([*after, gone])  # back again
    topo.check([gone])


def _flush_ours(topo: Topology, how: str) -> None:
    """Someone else empties what we installed."""
    run = topo.lab.run
    if topo.backend == "iptables":
        for exe in ("iptables-legacy", "ip6tables-legacy"):
            run(topo.proxy, exe, "-t", "nat", "-F", "CONTAINERBOOT-PREROUTING")
    elif how == "chain":
        for fam in ("ip", "ip6"):
            run(topo.proxy, "nft", "flush", "chain", fam, "containerboot", "prerouting")
    else:
        for fam in ("ip", "ip6"):
            run(topo.proxy, "nft", "flush", "map", fam, "containerboot", "portmap_tcp_addr")


@pytest.mark.root
@pytest.mark.parametrize(("backend", "how"),  # iptables has no map: its chain flush is its case
                         [("iptables", "chain"), *((b, h) for b in BACKENDS[1:] for h in ("chain", "map"))])
def test_flush_by_someone_else_reads_as_drift_and_apply_repairs(lab: Lab, backend: str, how: str) -> None:
    topo = Topology(lab, backend)
    services = [Service(i) for i in range(10)]
    topo.serve(targets_of(services))
    rules = plan_rules(services)
    topo.apply(services)
    _flush_ours(topo, how)
    reply = topo.call("check")
    assert not reply["equal"] and not reply["applier_equal"], "a flushed table read back as the plan"
    if how == "map":  # the TCP port maps lost their addresses: the ports left in the other map are drift
        assert reply["foreign"] == len(services), reply
        topo.check([services[0]], forwarding=False)  # TCP
        topo.check([services[1]])  # UDP: its maps were not touched
    else:
        topo.check(services[:2], forwarding=False)
    reply = topo.call("repair", rules)  # the boot's repair: the same plan again, in full
    assert reply["equal"] and reply["applier_equal"], reply["diff"]
    topo.check(services)


def _restore(topo: Topology, services: list[Service]) -> None:
    """The rules of `services` as upstream writes them, through iptables' own loader."""
    for fam, exe in ((4, "iptables-legacy-restore"), (6, "ip6tables-legacy-restore")):
        lines = ["*nat", ":CONTAINERBOOT-PREROUTING - [0:0]", ":CONTAINERBOOT-POSTROUTING - [0:0]",
                 "-A PREROUTING -j CONTAINERBOOT-PREROUTING", "-A POSTROUTING -j CONTAINERBOOT-POSTROUTING"]
        for s in sorted(services, key=lambda s: (s.proto, s.port)):
            to = f"[{s.to[fam]}]:{s.to_port}" if fam == 6 else f"{s.to[fam]}:{s.to_port}"
            lines.append(f"-A CONTAINERBOOT-PREROUTING ! -i tailscale0 -p {s.proto} -m {s.proto} --dport {s.port} "
                         f"-j DNAT --to-destination {to}")
        for to in sorted({s.to[fam] for s in services}, key=lambda a: int(ip_address(a))):
            mask = 32 if fam == 4 else 128
            lines.append(f"-A CONTAINERBOOT-POSTROUTING -d {to}/{mask} -j SNAT --to-source {TS[fam]}")
        text = "\n".join([*lines, "COMMIT", ""])
        subprocess.run(["ip", "netns", "exec", topo.proxy, exe, "--noflush"], input=text, text=True, check=True,
                       timeout=30)


@pytest.mark.root
def test_iptables_reads_what_iptables_restore_writes(lab: Lab) -> None:
    """Rules written by iptables-legacy-restore read back as exactly the PortMaps, and applying the same plan
    then leaves the tables as they were (iptables-save prints the same)."""
    topo = Topology(lab, "iptables")
    services = [Service(i) for i in range(10)]
    topo.serve(targets_of(services))
    _restore(topo, services)
    saved = [topo.lab.run(topo.proxy, exe, "-t", "nat").stdout.split("\n", 1)[1].rsplit("\n# Completed", 1)[0]
             for exe in ("iptables-legacy-save", "ip6tables-legacy-save")]
    topo.check(services)
    reply = topo.call("expect", plan_rules(services))
    assert reply["equal"] and reply["applier_equal"], reply["diff"]
    reply = topo.call("apply", plan_rules(services))
    assert reply["equal"] and reply["applier_equal"], reply["diff"]
    after = [topo.lab.run(topo.proxy, exe, "-t", "nat").stdout.split("\n", 1)[1].rsplit("\n# Completed", 1)[0]
             for exe in ("iptables-legacy-save", "ip6tables-legacy-save")]
    assert after == saved


@pytest.mark.root
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_nftables_reads_what_nft_writes(lab: Lab, backend: str) -> None:
    """The same table written by `nft -f` in nft's own syntax reads back as exactly the plan."""
    topo = Topology(lab, backend)
    services = [Service(i) for i in range(10)]
    topo.serve(targets_of(services))
    for fam, family, addr_type in ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr")):
        maps, lookups = "", ""
        for proto in ("tcp", "udp"):
            mine = [s for s in services if s.proto == proto]
            addrs = ", ".join(f"{s.port} : {s.to[fam]}" for s in mine)
            ports = ", ".join(f"{s.port} : {s.to_port}" for s in mine)
            maps += (f"  map portmap_{proto}_addr {{ type inet_service : {addr_type}; elements = {{ {addrs} }} }}\n"
                     f"  map portmap_{proto}_port {{ type inet_service : inet_service; elements = {{ {ports} }} }}\n")
            lookups += (f'    iifname != "tailscale0" dnat to {proto} dport map @portmap_{proto}_addr : '
                        f"{proto} dport map @portmap_{proto}_port\n")
        snats = "".join(f"    {family} daddr {t} snat to {TS[fam]}\n" for t in sorted({s.to[fam] for s in services}))
        text = (f"table {family} containerboot {{\n"
                f"  map ingress {{ type {addr_type} : {addr_type}; }}\n{maps}"
                "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
                f"    dnat to {family} daddr map @ingress\n{lookups}  }}\n"
                f"  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n{snats}  }}\n"
                "  chain forward { type filter hook forward priority mangle; policy accept; }\n}\n")
        subprocess.run(["ip", "netns", "exec", topo.proxy, "nft", "-f", "-"], input=text, text=True, check=True,
                       timeout=30)
    topo.check(services)
    reply = topo.call("expect", plan_rules(services))
    assert reply["equal"] and reply["applier_equal"], reply["diff"]
    reply = topo.call("expect", plan_rules(services[1:]))  # and it is not just any plan that matches
    assert not reply["equal"] and reply["diff"] == [f"portmap tcp/10000 not-from tailscale0 -> {t}:20000"
                                                    for t in (TARGETS[4][0], f"[{TARGETS[6][0]}]")]
