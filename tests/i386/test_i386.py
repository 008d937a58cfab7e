"""The linux/386 image, run natively on this amd64 machine: 32-bit Python, iptables-legacy and nft, in kernel mode.

The kernel runs i386 programs natively (IA32 emulation) and translates 32-bit iptables' structures
(CONFIG_NETFILTER_XTABLES_COMPAT), so nothing here is emulated: containerboot reads and writes the legacy
tables in the i386 layout, libnftables speaks netlink from a 32-bit process, and tailscaled is a 386 build.
Each check runs in both backends, forced the way README says (TS_DEBUG_FIREWALL_MODE):

- `detect`, `apply` (an ingress proxy's TS_DEST_IP; an ingress service's VIP and an egress service's port
  map with its SNAT, IPv4 and IPv6), `status` and `flush` in a container of the image. What they did is read
  from outside by this machine's own 64-bit ip(6)tables-legacy-save and nft in the container's network
  namespace (nsenter), and real connections go through the rules: a stand-in tailnet peer behind the
  container's `tailscale0` (a second Docker network's interface, renamed) reaches a backend through the
  DNATs, and the backend reaches the peer through the port maps, seen with the tailnet address as source.
- A boot that joins headscale as a proxy in front of a web server, reached from a tailnet client (the same
  image); the image's HEALTHCHECK turns healthy; a rule removed by someone else is put back; `docker stop`
  ends it with exit 0.

Addresses: the lab (headscale .2, web backend .3) is 198.18.202.0/25 and fd18:202::/64, the stand-in
tailnet 198.18.202.128/26 and fd18:202:1::/64; tailnet addresses not DNATed are unreachable in the firewall
container, so nothing is sent out of the lab.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from containerboot import proxy
from tests.conftest import need
from tests.lab.images import (
    IDLE,
    Lab,
    base_image,
    build_image,
    docker,
    headscale_image,
    image_exists,
    in_netns,
    inspect_image,
    kernel_args,
    need_docker,
    stale_sources,
)
from tests.lab.wait import wait_for

pytestmark = pytest.mark.docker

PLATFORM = "linux/386"
REPO, TAG = "containerboot-test", "i386"
IMAGE = f"{REPO}:{TAG}"
BASE = "containerboot-base:bookworm-{arch}"
HEADSCALE_IMAGE = "containerboot-test-headscale:i386-lab"

NET_PREFIX = "198.18.202"
LAN, LAN6 = f"{NET_PREFIX}.0/25", "fd18:202::/64"  # headscale .2, backend .3; Docker's own picks from .64/26
LAN_DYNAMIC = f"{NET_PREFIX}.64/26"
TAIL, TAIL6 = f"{NET_PREFIX}.128/26", "fd18:202:1::/64"  # the stand-in tailnet behind the container's tailscale0
KUBE_API = f"{NET_PREFIX}.60"  # KUBERNETES_SERVICE_HOST, so that the services' configs are allowed; never asked
NAME = f"cbi{os.getpid()}"
# By family: the DNATs' target on the lab network (it routes TAIL back through the firewall container), the
# stand-in tailnet peer, the firewall container's tailnet address (for apply), an ingress service's VIP,
# the port of an egress service to the peer's 8080, and the firewall container's (lan, tail) addresses.
TARGET = {4: f"{NET_PREFIX}.5", 6: "fd18:202::5"}
PEER = {4: f"{NET_PREFIX}.140", 6: "fd18:202:1::140"}
TAILNET = {4: "100.64.99.1", 6: "fd7a:115c:a1e0::99"}
VIP = {4: "100.100.0.5", 6: "fd7a:115c:a1e0::5"}
PORT = {4: 8081, 6: 8082}
FW = {"iptables": {4: (f"{NET_PREFIX}.10", f"{NET_PREFIX}.130"), 6: ("fd18:202::10", "fd18:202:1::130")},
      "nftables": {4: (f"{NET_PREFIX}.11", f"{NET_PREFIX}.131"), 6: ("fd18:202::11", "fd18:202:1::131")}}
FAMILIES = (4, 6)

VARIANT = {"iptables": "legacy", "nftables": "nf_tables"}
MODES = ["iptables", "nftables"]


def url(addr: str, port: int) -> str:
    return f"http://[{addr}]:{port}/" if ":" in addr else f"http://{addr}:{port}/"


def expected_rules(fam: int) -> list[dict[str, object]]:
    """`status --json`'s rules of one family: TS_DEST_IP (IPv4 only), the ingress service, the egress service."""
    dest = [{"kind": "dnat", "family": 4, "match": TAILNET[4], "to": [TARGET[4]]}] if fam == 4 else []
    return [*dest, {"kind": "dnat", "family": fam, "match": VIP[fam], "to": [TARGET[fam]]},
            {"kind": "portmap", "family": fam, "iface": "tailscale0", "proto": "tcp", "port": PORT[fam],
             "to": PEER[fam], "to_port": 8080},
            {"kind": "snat", "family": fam, "dst": PEER[fam], "to": TAILNET[fam]},
            {"kind": "mss-clamp", "family": fam, "iface": "tailscale0"}]


def expected_legacy(fam: int) -> set[str]:
    """The same rules as this machine's ip(6)tables-legacy-save prints them."""
    host = 32 if fam == 4 else 128
    peer = PEER[4] if fam == 4 else f"[{PEER[6]}]"
    dest = {f"-A CONTAINERBOOT-PREROUTING -d {TAILNET[4]}/32 -j DNAT --to-destination {TARGET[4]}"}
    dest = dest if fam == 4 else set()
    clamp = "-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu"
    return dest | {
        "-A PREROUTING -j CONTAINERBOOT-PREROUTING", "-A POSTROUTING -j CONTAINERBOOT-POSTROUTING",
        f"-A CONTAINERBOOT-PREROUTING -d {VIP[fam]}/{host} -j DNAT --to-destination {TARGET[fam]}",
        f"-A CONTAINERBOOT-PREROUTING ! -i tailscale0 -p tcp -m tcp --dport {PORT[fam]} -j DNAT "
        f"--to-destination {peer}:8080",
        f"-A CONTAINERBOOT-POSTROUTING -d {PEER[fam]}/{host} -j SNAT --to-source {TAILNET[fam]}",
        "-A FORWARD -j CONTAINERBOOT-FORWARD", f"-A CONTAINERBOOT-FORWARD -o tailscale0 {clamp}",
        f"-A CONTAINERBOOT-FORWARD -i tailscale0 {clamp}"}


def expected_nft(fam: int) -> list[str]:
    """Lines (or parts) of this machine's `nft list table ip|ip6 containerboot` for the same rules."""
    ip = "ip" if fam == 4 else "ip6"
    dest = [f"{TAILNET[4]} : {TARGET[4]}"] if fam == 4 else []
    return [*dest, f"{VIP[fam]} : {TARGET[fam]}", f"{PORT[fam]} : {PEER[fam]}", f"{PORT[fam]} : 8080",
            f"dnat to {ip} daddr map @ingress",
            'iifname != "tailscale0" dnat to tcp dport map @portmap_tcp_addr:tcp dport map @portmap_tcp_port',
            f"{ip} daddr {PEER[fam]} snat to {TAILNET[fam]}",
            'oifname "tailscale0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu',
            'iifname "tailscale0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu']


POINTER_SIZE = "import ctypes; print(ctypes.sizeof(ctypes.c_void_p))"
# `uname -m` under the 32-bit personality, as `setarch i686 uname -m` (the image has no setarch). Docker 20.10
# starts a linux/386 container without PER_LINUX32 (moby/moby#42732), so there a bare `uname -m` says x86_64:
# the kernel's answer, not the process's word size, which is why the 32-bit checks are the pointer size and
# the ELF class, and why containerboot must not take the struct layout from the machine name.
UNAME_32 = "import ctypes, os; ctypes.CDLL(None).personality(0x0008); os.execvp('uname', ['uname', '-m'])"


# ---- the image, the lab ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> str:
    """The linux/386 image, built with build_docker.sh (PLATFORM=linux/386, the offline 386 base) unless one
    exists whose containerboot and firewall modules are the work tree's; its size line."""
    need_docker()
    stale = stale_sources(IMAGE, PLATFORM) if image_exists(IMAGE) else []
    if image_exists(IMAGE) and not stale:
        size = int(inspect_image(IMAGE)["Size"])
        line = f"image size: {size // 1000 // 1000} MB ({size} bytes), {PLATFORM} (existing {IMAGE})"
    else:
        why = f"differs from the tree in {', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''}" if stale else ""
        print(f"\nbuilding {IMAGE} {why or '(none yet)'}")
        base_image(PLATFORM)
        build = build_image(REPO, TAG, platform=PLATFORM, base=BASE)
        assert build.refs == [IMAGE], build.refs
        assert len(build.size_lines) == 1, build.log
        line = f"{build.size_lines[0]} (built in {build.seconds:.0f} s)"
    print(f"\n{IMAGE}: {line}")
    return line


@pytest.fixture(scope="module")
def lab(image: str) -> Iterator[Lab]:
    need(os.geteuid() == 0, "needs root to enter the containers' network namespaces")
    need(all(shutil.which(t) for t in ("nsenter", "iptables-legacy-save", "ip6tables-legacy-save", "nft")),
         "needs nsenter, ip(6)tables-legacy-save and nft on this machine (scripts/install-deps.sh)")
    hs_image = headscale_image(base_image(), HEADSCALE_IMAGE)
    with Lab(NAME, LAN, IMAGE, hs_image, platform=PLATFORM, ip_range=LAN_DYNAMIC, subnet6=LAN6) as result:
        yield result


@dataclass(frozen=True)
class StandIns:
    """The stand-in tailnet network, its peer (echo server "peer" on 8080) and the DNATs' target ("target")."""

    tail: str
    peer: str
    target: str


@pytest.fixture(scope="module")
def stand_ins(lab: Lab) -> StandIns:
    """The services' configs in /lab, the stand-in tailnet (no masquerading by the host: the firewall
    container forwards between it and the lab network), the peer on it and the target on the lab network."""
    services = {f"peer-web{fam}": {"tailnetTarget": {"ip": PEER[fam]}, "ports": [
        {"protocol": "tcp", "matchPort": PORT[fam], "targetPort": 8080}]} for fam in FAMILIES}
    (lab.dir / "egress").mkdir(mode=0o755)
    (lab.dir / "egress" / "egress-services").write_text(json.dumps(services))
    (lab.dir / "ingress.json").write_text(json.dumps({"svc:web": {
        f"IPv{fam}Mapping": {"TailscaleServiceIP": VIP[fam], "ClusterIP": TARGET[fam]} for fam in FAMILIES}}))
    for f in (lab.dir / "egress" / "egress-services", lab.dir / "ingress.json"):
        f.chmod(0o644)
    tail = lab.create_network(lab.name("tail"), TAIL, f"{NET_PREFIX}.160/27", masquerade=False, subnet6=TAIL6)
    net_admin = ("--cap-add", "NET_ADMIN", "--entrypoint", "python3")
    target = lab.run("target", "--ip", TARGET[4], "--ip6", TARGET[6], *net_admin,
                     command=("/lab/echo_server.py", "target", "::", "8080"))
    peer = lab.run("peer", "--ip", PEER[4], "--ip6", PEER[6], *net_admin, network=tail,
                   command=("/lab/echo_server.py", "peer", "::", "8080"))
    return StandIns(tail, peer, target)


@pytest.fixture(scope="module")
def client(lab: Lab) -> str:
    """A kernel-mode tailnet node of the same image (backend detected), to reach the proxies from."""
    return lab.run("client", *kernel_args(), env=lab.node_env(TS_USERSPACE="false", TS_HOSTNAME="client"))


# ---- what the kernel holds, seen from outside -----------------------------------------------------------------


def legacy_save(container: str, fam: int = 4, counters: bool = False) -> str:
    """This machine's (64-bit) ip(6)tables-legacy-save in the container's namespace: the tables that exist."""
    return in_netns(container, "iptables-legacy-save" if fam == 4 else "ip6tables-legacy-save",
                    *(["-c"] if counters else [])).stdout


def nft_ruleset(container: str) -> str:
    return in_netns(container, "nft", "list", "ruleset").stdout


def rule_lines(save: str) -> set[str]:
    return {line for line in save.splitlines() if line.startswith("-A ")}


def packets(save_c: str, rule: str) -> int:
    """The packet counter of `rule` in ip(6)tables-legacy-save -c output (-1 when the rule is not there)."""
    for line in save_c.splitlines():
        found = re.fullmatch(r"\[(\d+):\d+\] (.*)", line)
        if found and found.group(2) == rule:
            return int(found.group(1))
    return -1


def run_ok(lab: Lab, container: str, *argv: str, env: dict[str, str] | None = None) -> str:
    proc = lab.exec(container, *argv, env=env)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def firewall(lab: Lab, stand_ins: StandIns, mode: str) -> str:
    """A container of the image on the lab network and, as tailscale0, the stand-in tailnet; the peer and the
    target route through it. Tailnet addresses it does not DNAT are unreachable (they never leave the lab)."""
    (lan4, tail4), (lan6, tail6) = FW[mode][4], FW[mode][6]
    env = {"TS_USERSPACE": "false", "TS_DEBUG_FIREWALL_MODE": mode, "TS_DEST_IP": TARGET[4],
           "KUBERNETES_SERVICE_HOST": KUBE_API, "TS_KUBE_SECRET": "i386-test", "POD_IPS": f"{lan4},{lan6}",
           "TS_EGRESS_PROXIES_CONFIG_PATH": "/lab/egress", "TS_INGRESS_PROXIES_CONFIG_PATH": "/lab/ingress.json"}
    fw = lab.run(f"fw-{mode}", "--ip", lan4, "--ip6", lan6, "--cap-add", "NET_ADMIN", "--sysctl",
                 "net.ipv4.ip_forward=1", "--sysctl", "net.ipv6.conf.all.forwarding=1", "--entrypoint", IDLE[0],
                 env=env, command=IDLE[1:])
    docker("network", "connect", "--ip", tail4, "--ip6", tail6, stand_ins.tail, fw)
    # Renaming needs the link down, which drops its IPv6 address: put it back.
    run_ok(lab, fw, "sh", "-c", "ip link set eth1 down && ip link set eth1 name tailscale0 && "
           f"ip link set tailscale0 up && ip -6 addr replace {tail6}/64 dev tailscale0 nodad && "
           "ip route add unreachable 100.64.0.0/10 && ip -6 route add unreachable fd7a:115c:a1e0::/48")
    for fam, gw in ((4, tail4), (6, tail6)):
        run_ok(lab, stand_ins.peer, "ip", f"-{fam}", "route", "replace", "100.64.0.0/10" if fam == 4 else
               "fd7a:115c:a1e0::/48", "via", gw)
    run_ok(lab, stand_ins.target, "ip", "-4", "route", "replace", TAIL, "via", lan4)
    run_ok(lab, stand_ins.target, "ip", "-6", "route", "replace", TAIL6, "via", lan6)
    return fw


# Someone else's rules, written by this machine's 64-bit tools before containerboot's 32-bit writer splices its
# own into the same tables (through the kernel's compat translation, matches and targets whose 64-bit and
# 32-bit layouts differ among them); they match nothing the tests send.
OTHERS_LEGACY = {4: [
    ["-t", "nat", "-A", "PREROUTING", "-p", "udp", "--dport", "53", "-m", "comment", "--comment", "someone else",
     "-j", "REDIRECT", "--to-ports", "5353"],
    ["-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-m", "conntrack", "--ctstate", "DNAT", "-m", "limit",
     "--limit", "5/s", "-j", "MASQUERADE"],
    ["-t", "nat", "-N", "OTHER"],
    ["-t", "nat", "-A", "OTHER", "-m", "statistic", "--mode", "nth", "--every", "3", "--packet", "0", "-j", "RETURN"],
    ["-t", "nat", "-A", "OUTPUT", "-d", "192.0.2.1", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "OTHER"],
    ["-t", "mangle", "-A", "FORWARD", "-p", "tcp", "-m", "multiport", "--dports", "9,19", "-j", "MARK",
     "--set-xmark", "0x40000/0xff0000"],
    ["-t", "filter", "-A", "INPUT", "-s", "192.0.2.9", "-m", "u32", "--u32", "0>>22&0x3C@4=0x29", "-j", "DROP"],
], 6: [
    ["-t", "nat", "-A", "POSTROUTING", "-s", "2001:db8::/32", "-m", "conntrack", "--ctstate", "DNAT", "-j",
     "MASQUERADE"],
    ["-t", "mangle", "-A", "FORWARD", "-s", "2001:db8::9", "-j", "MARK", "--set-mark", "0x40000"],
]}
OTHERS_NFT = ["add table inet others",
              "add chain inet others keep { type filter hook forward priority 0; policy accept; }",
              "add rule inet others keep ip saddr 192.0.2.9 counter drop"]


def add_others(fw: str, mode: str) -> dict[int, set[str]] | str:
    """Someone else's rules in the backend of `mode`; what the 64-bit tools then show of them."""
    if mode == "nftables":
        for command in OTHERS_NFT:
            in_netns(fw, "nft", command)
        return in_netns(fw, "nft", "list", "table", "inet", "others").stdout
    for fam, rules in OTHERS_LEGACY.items():
        for rule in rules:
            in_netns(fw, "iptables-legacy" if fam == 4 else "ip6tables-legacy", *rule)
    return {fam: rule_lines(legacy_save(fw, fam)) for fam in FAMILIES}


def no_answers(lab: Lab, stand_ins: StandIns, mode: str) -> list[str]:
    """The URLs the rules would carry that answer anyway (none should, without the rules)."""
    urls = [(stand_ins.peer, url(TAILNET[4], 8080))] + [(stand_ins.peer, url(VIP[f], 8080)) for f in FAMILIES] + \
        [(stand_ins.target, url(FW[mode][f][0], PORT[f])) for f in FAMILIES]
    return [u for c, u in urls if lab.fetch(c, u)]


# ---- tests --------------------------------------------------------------------------------------------------


def test_image_is_386_and_runs_32_bit(image: str, lab: Lab) -> None:
    assert inspect_image(IMAGE)["Architecture"] == "386"
    assert re.match(r"image size: \d+ MB \(\d+ bytes\), linux/386", image), image
    assert int(image.split()[2]) < 100, image
    base = ["run", "--rm", "--platform", PLATFORM, "--network", "none"]
    assert docker(*base, "--entrypoint", "python3", IMAGE, "-c", UNAME_32).stdout.strip() == "i686"
    bare = docker(*base, "--entrypoint", "uname", IMAGE, "-m").stdout.strip()
    assert docker(*base, "--entrypoint", "python3", IMAGE, "-c", POINTER_SIZE).stdout.strip() == "4"
    # The interpreter and the programs containerboot runs are 32-bit ELF (e_ident[EI_CLASS] is 1).
    elf = "import sys\nfor p in sys.argv[1:]:\n    print(p, open(p, 'rb').read(5)[4])"
    files = ["/usr/bin/python3", "/usr/sbin/xtables-legacy-multi", "/usr/sbin/nft", "/usr/local/bin/tailscaled"]
    classes = docker(*base, "--entrypoint", "python3", IMAGE, "-c", elf, *files).stdout.split()
    assert classes == [x for f in files for x in (f, "1")], classes
    print(f"\nuname -m: {bare} (bare), i686 (PER_LINUX32); pointer size 4; ELF class 1: {', '.join(files)}")


@pytest.mark.parametrize("mode", MODES)
def test_kernel_mode_rules_and_packets(lab: Lab, stand_ins: StandIns, mode: str) -> None:
    fw = firewall(lab, stand_ins, mode)
    assert lab.exec(fw, "python3", "-c", UNAME_32).stdout.strip() == "i686"
    assert lab.exec(fw, "python3", "-c", POINTER_SIZE).stdout.strip() == "4"

    # detect: forced, and what it says on its own (docker's DNS rules in this namespace are iptables-nft's)
    detection = json.loads(run_ok(lab, fw, "containerboot", "detect", "--json").splitlines()[-1])
    assert (detection["backend"], detection["variant"], detection["families"]) == (mode, VARIANT[mode], [4, 6]), \
        detection
    assert detection["evidence"][:2] == [f"TS_DEBUG_FIREWALL_MODE={mode}", f"{VARIANT[mode]} NAT probe passed"], \
        detection
    auto = run_ok(lab, fw, "containerboot", "detect", env={"TS_DEBUG_FIREWALL_MODE": ""}).splitlines()
    assert auto[0] == "nf_tables", auto
    print(f"\n{mode}: detect: {detection['evidence']}\n{mode}: detect without override: {auto}")
    assert not no_answers(lab, stand_ins, mode), "answered before any rule"
    others = add_others(fw, mode)

    applied = run_ok(lab, fw, "containerboot", "apply", "--tailnet-ip", TAILNET[4], "--tailnet-ip", TAILNET[6])
    assert f"applied 9 rules with {mode} ({VARIANT[mode]})" in applied, applied
    status = json.loads(run_ok(lab, fw, "containerboot", "status", "--json"))
    across = proxy.cross_family(ipaddress.ip_address(TARGET[4]))  # the IPv6 tailnet address forwards nothing
    assert status == {"backend": mode, "rules": expected_rules(4) + expected_rules(6), "notes": [across]}, status

    # From outside, with this machine's 64-bit tools: the rules are where they should be, and only there;
    # someone else's are untouched.
    nft = nft_ruleset(fw)
    for fam in FAMILIES:
        legacy = legacy_save(fw, fam)
        if isinstance(others, dict):
            assert rule_lines(legacy) == expected_legacy(fam) | others[fam], legacy
        else:
            assert "CONTAINERBOOT" not in legacy, legacy
            table = in_netns(fw, "nft", "list", "table", "ip" if fam == 4 else "ip6", "containerboot").stdout
            missing = [r for r in expected_nft(fam) if r not in table]
            assert not missing, f"{missing}\n{table}"
    if isinstance(others, dict):
        assert "containerboot" not in nft, nft
    else:
        assert in_netns(fw, "nft", "list", "table", "inet", "others").stdout == others

    # Real connections through the rules: the DNAT of the tailnet address and of the service VIPs (the target
    # sees the peer's own address), and the egress port maps with their SNATs (the peer sees the tailnet address).
    assert lab.fetch(stand_ins.peer, url(TAILNET[4], 8080)) == f"target {PEER[4]}"
    for fam in FAMILIES:
        assert lab.fetch(stand_ins.peer, url(VIP[fam], 8080)) == f"target {PEER[fam]}", fam
        assert lab.fetch(stand_ins.target, url(FW[mode][fam][0], PORT[fam])) == f"peer {TAILNET[fam]}", fam
    if mode == "iptables":
        for fam in FAMILIES:
            counted = legacy_save(fw, fam, counters=True)
            uncounted = [r for r in sorted(expected_legacy(fam)) if "NAT" in r and packets(counted, r) < 1]
            assert not uncounted, f"{uncounted}\n{counted}"

    run_ok(lab, fw, "containerboot", "flush")
    assert run_ok(lab, fw, "containerboot", "status").split("\n")[:2] == [VARIANT[mode], "(no rules)"]
    nft = nft_ruleset(fw)
    assert "containerboot" not in nft, nft
    for fam in FAMILIES:
        legacy = legacy_save(fw, fam)
        assert "CONTAINERBOOT" not in legacy, legacy
        if isinstance(others, dict):
            assert rule_lines(legacy) == others[fam], legacy
    if not isinstance(others, dict):
        assert in_netns(fw, "nft", "list", "table", "inet", "others").stdout == others
    assert not no_answers(lab, stand_ins, mode), "answered after flush"


@pytest.mark.parametrize("mode", MODES)
def test_boot_proxy_joins_carries_traffic_and_is_healthy(lab: Lab, client: str, mode: str) -> None:
    proxy = lab.run(f"proxy-{mode}", *kernel_args(), env=lab.node_env(
        TS_USERSPACE="false", TS_DEST_IP=lab.backend_ip, TS_DEBUG_FIREWALL_MODE=mode, TS_HOSTNAME=f"proxy-{mode}"))
    proxy_ip = lab.tailnet_ip(proxy, 90)
    lab.tailnet_ip(client, 90)
    got = wait_for(lambda: lab.fetch(client, f"http://{proxy_ip}:8080/"), 30, 0.5)
    lan_ip = lab.inspect(proxy)["NetworkSettings"]["Networks"][lab.network]["IPAddress"]
    # tailscaled masquerades what it forwards from the tailnet: the backend sees the proxy's address.
    assert got == f"backend {lan_ip}", f"{got!r}\n{lab.logs(proxy)}"

    logs = lab.logs(proxy)
    assert f"rules live in {mode} for {proxy_ip}" in logs, logs
    assert "Startup complete, waiting for shutdown signal" in logs and "tskey-" not in logs, logs
    status = json.loads(run_ok(lab, proxy, "containerboot", "status", "--json"))
    assert status["backend"] == mode, status
    assert {"kind": "dnat", "family": 4, "match": proxy_ip, "to": [lab.backend_ip]} in status["rules"], status

    # From outside: our DNAT and tailscaled's own chains are in the chosen backend, and only there.
    legacy, nft = legacy_save(proxy), nft_ruleset(proxy)
    dnat = f"-A CONTAINERBOOT-PREROUTING -d {proxy_ip}/32 -j DNAT --to-destination {lab.backend_ip}"
    if mode == "iptables":
        assert dnat in rule_lines(legacy), legacy
        assert "ts-postrouting" in legacy and "ts-postrouting" not in nft, f"{legacy}\n{nft}"
        assert "containerboot" not in nft, nft
    else:
        assert f"{proxy_ip} : {lab.backend_ip}" in nft, nft
        assert "ts-postrouting" in nft and "ts-postrouting" not in legacy, f"{legacy}\n{nft}"
        assert "CONTAINERBOOT" not in legacy, legacy

    assert wait_for(lambda: lab.health(proxy) == "healthy", 45, 1), lab.inspect(proxy)["State"].get("Health")
    assert lab.exec(proxy, "python3", "-c", UNAME_32).stdout.strip() == "i686"

    # Someone else (here this machine's 64-bit tools) removes our DNAT: the 32-bit boot sees it at its next drift
    # check (every 2 s; it logs that) and puts the rule back, and the page is served again.
    def restored() -> bool:
        if mode == "iptables":
            return dnat in rule_lines(legacy_save(proxy))
        return "dnat to ip daddr map @ingress" in nft_ruleset(proxy)

    if mode == "iptables":
        in_netns(proxy, "iptables-legacy", "-t", "nat", "-F", "CONTAINERBOOT-PREROUTING")
    else:
        in_netns(proxy, "nft", "flush", "chain", "ip", "containerboot", "prerouting")
    assert wait_for(lambda: "rules changed outside containerboot" in lab.logs(proxy) and restored(), 15, 0.5), \
        lab.logs(proxy)
    assert lab.fetch(client, f"http://{proxy_ip}:8080/") == f"backend {lan_ip}"

    # docker stop: SIGTERM, exit 0, our rules removed without complaint.
    docker("stop", "-t", "20", proxy)
    assert lab.inspect(proxy)["State"]["ExitCode"] == 0, lab.logs(proxy)
    assert "removing our rules failed" not in lab.logs(proxy), lab.logs(proxy)
