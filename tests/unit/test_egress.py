"""Egress services (pure): config parsing and its errors, target resolution (peer, Tailscale Service,
4via6), the status in upstream's shape, and the one reconciler (rules.plan) as a table."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from containerboot import proxy, rules
from containerboot.proxygroup import egress, ingress
from containerboot.settings import Settings
from containerboot.tailscale import ipn
from firewall.model import Dnat, DnatNonTailnet, MssClamp, Plan, PortMap, Snat

a = ipaddress.ip_address
S = Settings(userspace=False)
SELF = (a("100.64.0.1"), a("fd7a:115c:a1e0::1"))


def cfg(**services: Any) -> bytes:
    return json.dumps(services).encode()


def svc(ip: str = "", fqdn: str = "", *ports: tuple[str, int, int], hep: str = "") -> dict[str, Any]:
    return {"tailnetTarget": {"ip": ip, "fqdn": fqdn}, "healthCheckEndpoint": hep,
            "ports": [{"protocol": p, "matchPort": m, "targetPort": t} for p, m, t in ports]}


# ---- parsing --------------------------------------------------------------------------------------------------


def test_parse_keeps_raw_target_and_sorts_ports() -> None:
    got = egress.parse(cfg(b=svc("100.64.0.7", "", ("udp", 53, 53), ("tcp", 80, 8080), ("tcp", 80, 8080)),
                           a=svc("", "web.ts.net", ("tcp", 1, 2), hep="http://x/healthz")))
    assert got is not None
    assert [s.name for s in got] == ["a", "b"]
    assert got[1].ports == (egress.PortSpec("tcp", 80, 8080), egress.PortSpec("udp", 53, 53))  # a set
    assert got[1].ip == a("100.64.0.7") and got[0].ip is None and got[0].fqdn == "web.ts.net"
    assert got[0].health_check == "http://x/healthz"


def test_parse_field_names_case_insensitive_like_go() -> None:
    got = egress.parse(b'{"x": {"TailnetTarget": {"IP": "100.64.0.7"}, "Ports": '
                       b'[{"Protocol": "tcp", "MatchPort": 1, "TargetPort": 2}]}}')
    assert got is not None and got[0].ip == a("100.64.0.7") and got[0].ports == (egress.PortSpec("tcp", 1, 2),)


@pytest.mark.parametrize("data", [b"", b"  \n", b"null"])
def test_parse_empty_is_no_config(data: bytes) -> None:
    assert egress.parse(data) is None


@pytest.mark.parametrize(("data", "says"), [
    (b"{", "not JSON"),
    (b"[1]", "expected a JSON object"),
    (cfg(x=[1]), 'service "x": expected an object'),
    (cfg(x=svc()), 'service "x": tailnetTarget has neither ip nor fqdn'),
    (cfg(x=svc("100.64.0.300")), 'tailnetTarget.ip "100.64.0.300" is not an IP address'),
    (cfg(x=svc("100.64.0.7", "", ("sctp", 1, 1))), 'ports[0].protocol "sctp": must be tcp or udp'),
    (cfg(x=svc("100.64.0.7", "", ("tcp", 0, 1))), "ports[0].matchPort 0: must be a port number 1-65535"),
    (cfg(x=svc("100.64.0.7", "", ("tcp", 1, 70000))), "ports[0].targetPort 70000: must be a port number"),
    (cfg(x={"tailnetTarget": {"ip": "100.64.0.7"}, "ports": {"a": 1}}), "ports must be a list"),
    (cfg(x={"tailnetTarget": {"ip": 5}}), "ip and fqdn must be strings"),
])
def test_parse_errors_are_one_line_naming_setting_and_value(data: bytes, says: str) -> None:
    with pytest.raises(egress.ConfigError) as info:
        egress.parse(data, "/cfg/egress-services")
    text = str(info.value)
    assert text.startswith("TS_EGRESS_PROXIES_CONFIG_PATH: /cfg/egress-services:") and says in text, text
    assert "\n" not in text


def test_long_value_is_cut_short() -> None:
    with pytest.raises(egress.ConfigError) as info:
        egress.parse(cfg(x=svc("1" * 5000)))
    assert len(str(info.value)) < 300


def test_hep_pings(tmp_path: Any) -> None:
    assert egress.read_hep_pings(str(tmp_path)) == 0
    (tmp_path / "hep-pings").write_text("3")
    assert egress.read_hep_pings(str(tmp_path)) == 3
    (tmp_path / "hep-pings").write_text("-2")
    assert egress.read_hep_pings(str(tmp_path)) == 0
    (tmp_path / "hep-pings").write_text("x")
    with pytest.raises(egress.ConfigError, match="is not an integer"):
        egress.read_hep_pings(str(tmp_path))


# ---- resolution ---------------------------------------------------------------------------------------------


def node(self_known: bool = True) -> ipn.Node:
    """The node after a watch's first status: peer 7 is web.ts.net, peer 8 hosts the Tailscale Service
    svc-db (its VIP 100.100.2.2 an AllowedIP) and routes 10.1.0.0/24 as 4via6 site 7."""
    status: dict[str, Any] = {
        "Peer": {"k1": {"NodeID": 7, "DNSName": "web.ts.net.", "TailscaleIPs": ["100.64.0.7", "fd7a:115c:a1e0::7"],
                        "AllowedIPs": ["100.64.0.7/32", "fd7a:115c:a1e0::7/128"]},
                 "k2": {"NodeID": 8, "DNSName": "db-host.ts.net.", "TailscaleIPs": ["100.64.0.8"],
                        "AllowedIPs": ["100.64.0.8/32", "100.100.2.2/32", "10.1.0.0/24",
                                       "fd7a:115c:a1e0:b1a:0:7::/96"]}},
        "ExtraRecords": [{"Name": "svc-db.ts.net.", "Value": "100.100.2.2"},
                         {"Name": "svc-nobody.ts.net.", "Value": "100.100.3.3"}]}
    if self_known:
        status["Self"] = {"ID": "self", "DNSName": "me.ts.net.", "TailscaleIPs": ["100.64.0.1"]}
    return ipn.update(ipn.Node(), {"InitialStatus": status})


@pytest.mark.parametrize(("name", "want", "why"), [
    ("web.ts.net", ("100.64.0.7", "fd7a:115c:a1e0::7"), ""),
    ("WEB.ts.net.", ("100.64.0.7", "fd7a:115c:a1e0::7"), ""),
    ("svc-db.ts.net", ("100.100.2.2",), ""),
    ("svc-nobody.ts.net", (), "could not find Tailscale node, service or 4via6 address"),
    ("10-1-0-5-via-7.ts.net", ("fd7a:115c:a1e0:b1a:0:7:a01:5",), ""),
    ("10-1-0-5-via-9.ts.net", (), "no peer advertises a route containing it"),
    ("10-1-0-5-via-7.example.com", (), "could not find"),
])
def test_resolve(name: str, want: tuple[str, ...], why: str) -> None:
    got, reason = egress.resolve(name, egress.lookup(node()))
    assert got == tuple(map(a, want))
    assert why in reason if why else reason == ""


def test_peer_changes_and_the_dns_config_are_followed() -> None:
    n = ipn.update(node(), {"PeersChanged": [{"ID": 9, "Name": "other.ts.net.", "Addresses": ["100.64.0.9/32"],
                                              "AllowedIPs": ["100.64.0.9/32", "100.100.3.3/32"]}],
                            "PeersRemoved": [8]})
    assert egress.resolve("svc-nobody.ts.net", egress.lookup(n))[0] == (a("100.100.3.3"),)
    assert egress.resolve("svc-db.ts.net", egress.lookup(n))[0] == ()  # its host left
    n = ipn.with_dns_config(n, {"ExtraRecords": [{"Name": "svc-new.ts.net", "Value": "100.100.3.3"}],
                                "CertDomains": ["me.ts.net"]})
    assert egress.resolve("svc-new.ts.net", egress.lookup(n))[0] == (a("100.100.3.3"),)
    assert egress.resolve("svc-nobody.ts.net", egress.lookup(n))[0] == ()  # no longer a record
    assert n.cert_domains == ("me.ts.net",)
    # A new watch's first status is the whole truth: a peer it does not list is gone.
    n = ipn.update(n, {"InitialStatus": {"Self": {"ID": "self", "DNSName": "me.ts.net.",
                                                   "TailscaleIPs": ["100.64.0.1"]}}})
    assert n.peers == {} and n.extra_records == ()


def test_targets_without_ipv6_nat_skip_ipv6() -> None:
    services = egress.parse(cfg(web=svc("", "web.ts.net", ("tcp", 1, 1)), v6=svc("fd7a:115c:a1e0::9", "",
                                                                                 ("tcp", 2, 2))))
    assert services is not None
    got, notes = egress.targets(services, node(), families=(4,))
    assert [r.targets for r in got] == [(), (a("100.64.0.7"),)]
    assert len(notes) == 2 and all("IPv6" in n for n in notes)


def test_a_pod_address_of_a_family_no_target_has_is_said_once() -> None:
    """A port map DNATs within one family: the Pod's address of the other family forwards nothing for that
    service (upstream skips it silently, tailscale/tailscale#18518)."""
    services = egress.parse(cfg(v6=svc("fd7a:115c:a1e0::9", "", ("tcp", 2, 2)),
                                v4=svc("100.64.0.9", "", ("tcp", 3, 3))))
    assert services is not None
    pod = (a("198.18.64.5"), a("fd18:64::5"))
    _, notes = egress.targets(services, node(), pod=pod)
    assert notes == [
        "egress service v4: its tailnet targets [100.64.0.9] are IPv4 only: connections to this Pod's IPv6 address "
        "fd18:64::5 are not forwarded (netfilter cannot translate IPv6 to IPv4); cluster clients reach it over IPv4 "
        "(the Service's IPv4 ClusterIP)",
        "egress service v6: its tailnet targets [fd7a:115c:a1e0::9] are IPv6 only: connections to this Pod's IPv4 "
        "address 198.18.64.5 are not forwarded (netfilter cannot translate IPv4 to IPv6); cluster clients reach it "
        "over IPv6 (the Service's IPv6 ClusterIP)"]
    assert egress.targets(services, node(), pod=(a("fd18:64::5"),))[1] == [notes[0]]  # a single-stack Pod
    assert egress.targets(services, node())[1] == []  # POD_IPS unknown: nothing to say


def test_names_wait_for_the_netmap() -> None:
    services = egress.parse(cfg(web=svc("", "web.ts.net", ("tcp", 1, 1))))
    assert services is not None
    got, notes = egress.targets(services, node(self_known=False))
    assert got[0].targets == () and notes == []


# ---- status -------------------------------------------------------------------------------------------------


def test_status_shape_is_upstreams() -> None:
    services = egress.parse(cfg(web=svc("", "web.ts.net", ("tcp", 80, 8080)), gone=svc("", "x.ts.net")))
    assert services is not None
    got, _ = egress.targets(services, node())
    st = egress.status(got, ("10.1.0.5", ""))
    assert json.loads(egress.status_bytes(st)) == {
        "podIPv4": "10.1.0.5",
        "services": {
            "gone": {"ports": [], "tailnetTargetIPs": None, "tailnetTarget": {"ip": "", "fqdn": "x.ts.net"}},
            "web": {"ports": [{"protocol": "tcp", "matchPort": 80, "targetPort": 8080}],
                    "tailnetTargetIPs": ["100.64.0.7", "fd7a:115c:a1e0::7"],
                    "tailnetTarget": {"ip": "", "fqdn": "web.ts.net"}}}}
    assert egress.status([], ("10.1.0.5", "fd00::5")) == {"podIPv4": "10.1.0.5", "podIPv6": "fd00::5",
                                                           "services": None}
    assert egress.pod_ips([a("10.1.0.5"), a("fd00::5")]) == ("10.1.0.5", "fd00::5")


def test_status_written_only_once_something_was_configured() -> None:
    empty = egress.status([], ("10.1.0.5", ""))
    assert not egress.wants_write(empty, None)
    one = {"podIPv4": "10.1.0.5", "services": {"x": {}}}
    assert egress.wants_write(one, None)
    assert not egress.wants_write(one, dict(one))
    assert egress.wants_write(empty, one)  # every service left: "services": null is written


# ---- the reconciler, as a table -----------------------------------------------------------------------------

T4, T6, T7 = a("100.64.0.7"), a("fd7a:115c:a1e0::7"), a("100.64.0.77")
L4, L6 = SELF


def resolved(name: str, *targets: Any, ports: tuple[tuple[str, int, int], ...] = (("tcp", 80, 8080),)
             ) -> egress.Resolved:
    return egress.Resolved(egress.Service(name, "", f"{name}.ts.net", tuple(egress.PortSpec(*p) for p in ports)),
                           tuple(targets))


def imap(name: str, vip: str, cluster: str) -> ingress.Service:
    m = ingress.VipMap(a(vip), a(cluster))
    return ingress.Service(name, m if m.vip.version == 4 else None, m if m.vip.version == 6 else None)


CASES: list[tuple[str, dict[str, Any], set[Any]]] = [
    ("nothing", {}, set()),
    ("one service, one target",
     {"egress": [resolved("web", T4)]},
     {PortMap("tcp", 80, T4, 8080), Snat(T4, L4), MssClamp(4)}),
    ("both families",
     {"egress": [resolved("web", T4, T6, ports=(("tcp", 80, 8080), ("udp", 53, 53)))]},
     {PortMap("tcp", 80, T4, 8080), PortMap("udp", 53, T4, 53), Snat(T4, L4), MssClamp(4),
      PortMap("tcp", 80, T6, 8080), PortMap("udp", 53, T6, 53), Snat(T6, L6), MssClamp(6)}),
    ("target moved", {"egress": [resolved("web", T7)]}, {PortMap("tcp", 80, T7, 8080), Snat(T7, L4), MssClamp(4)}),
    ("own address changed", {"egress": [resolved("web", T4)], "self": (a("100.64.0.2"),)},
     {PortMap("tcp", 80, T4, 8080), Snat(T4, a("100.64.0.2")), MssClamp(4)}),
    ("no own IPv6: IPv6 target skipped", {"egress": [resolved("web", T4, T6)], "self": (L4,)},
     {PortMap("tcp", 80, T4, 8080), Snat(T4, L4), MssClamp(4)}),
    ("no IPv6 NAT", {"egress": [resolved("web", T4, T6)], "families": (4,)},
     {PortMap("tcp", 80, T4, 8080), Snat(T4, L4), MssClamp(4)}),
    ("unresolved service: no rules", {"egress": [resolved("web")]}, set()),
    ("two services, one target: one SNAT",
     {"egress": [resolved("a", T4, ports=(("tcp", 1, 1),)), resolved("b", T4, ports=(("tcp", 2, 2),))]},
     {PortMap("tcp", 1, T4, 1), PortMap("tcp", 2, T4, 2), Snat(T4, L4), MssClamp(4)}),
    ("two services on one port: the first by name wins",
     {"egress": [resolved("a", T4), resolved("b", T7)]},
     {PortMap("tcp", 80, T4, 8080), Snat(T4, L4), Snat(T7, L4), MssClamp(4)}),
    ("ingress both families",
     {"ingress": (imap("svc:a", "100.100.0.1", "10.96.0.10"), imap("svc:a6", "fd7a:115c:a1e0::a", "fd00::10"))},
     {Dnat(a("100.100.0.1"), (a("10.96.0.10"),)), MssClamp(4), Dnat(a("fd7a:115c:a1e0::a"), (a("fd00::10"),)),
      MssClamp(6)}),
    ("ingress without IPv6 NAT",
     {"ingress": (imap("svc:a6", "fd7a:115c:a1e0::a", "fd00::10"),), "families": (4,)}, set()),
    ("ingress VIP twice: the first wins",
     {"ingress": (imap("svc:a", "100.100.0.1", "10.96.0.10"), imap("svc:b", "100.100.0.1", "10.96.0.11"))},
     {Dnat(a("100.100.0.1"), (a("10.96.0.10"),)), MssClamp(4)}),
    ("proxy settings, egress and ingress services in one plan",
     {"settings": Settings(userspace=False, tailnet_target_ip=a("100.64.0.50")),
      "egress": [resolved("web", T4)], "ingress": (imap("svc:a", "100.100.0.1", "10.96.0.10"),)},
     {DnatNonTailnet(a("100.64.0.50")), Snat(a("100.64.0.50"), L4), PortMap("tcp", 80, T4, 8080), Snat(T4, L4),
      Dnat(a("100.100.0.1"), (a("10.96.0.10"),)), MssClamp(4)}),
]


@pytest.mark.parametrize(("case", "given", "want"), CASES, ids=[c[0] for c in CASES])
def test_reconciler(case: str, given: dict[str, Any], want: set[Any]) -> None:
    settings = given.get("settings", S)
    inputs = rules.Inputs(proxy.Inputs(given.get("self", SELF), proxy.egress_targets(settings)),
                          given.get("egress", ()), given.get("ingress", ()))
    plan, notes = rules.plan(settings, inputs, given.get("families", (4, 6)))
    assert plan == Plan(frozenset(want)), f"{case}:\n{plan}"
    if "first" in case:
        assert any("is not installed" in n for n in notes), notes


def test_service_leaving_loses_its_rules() -> None:
    both = rules.Inputs(proxy.Inputs(SELF), [resolved("a", T4, ports=(("tcp", 1, 1),)),
                                             resolved("b", T7, ports=(("tcp", 2, 2),))])
    one = rules.Inputs(proxy.Inputs(SELF), [resolved("a", T4, ports=(("tcp", 1, 1),))])
    before, _ = rules.plan(S, both)
    after, _ = rules.plan(S, one)
    assert before.rules - after.rules == {PortMap("tcp", 2, T7, 2), Snat(T7, L4)}
    assert after.rules <= before.rules


def test_thousand_services_one_plan() -> None:
    many = [resolved(f"s{i:04}", ipaddress.IPv4Address(int(T4) + i), ports=(("tcp", 10000 + i, 80),))
            for i in range(1000)]
    plan, notes = rules.plan(S, rules.Inputs(proxy.Inputs(SELF), many))
    assert len(plan.rules) == 2001 and not notes


# ---- the CLI sees the same rules ------------------------------------------------------------------------------


def test_cli_plan_includes_services(tmp_path: Any) -> None:
    import subprocess

    from containerboot.settings import load
    from tests.conftest import containerboot_exe

    (tmp_path / "eg").mkdir()
    (tmp_path / "eg" / "egress-services").write_bytes(cfg(web=svc("100.64.0.7", "", ("tcp", 8080, 80)),
                                                          named=svc("", "db.ts.net", ("tcp", 9, 9))))
    (tmp_path / "ingress.json").write_text(json.dumps({"svc:a": {"IPv4Mapping": {
        "TailscaleServiceIP": "100.100.0.1", "ClusterIP": "10.96.0.10"}}}))
    env = {"PATH": "/usr/bin:/bin", "KUBERNETES_SERVICE_HOST": "10.96.0.1", "TS_KUBE_SECRET": "pg-0",
           "TS_USERSPACE": "false", "POD_IPS": "10.1.0.5", "TS_EGRESS_PROXIES_CONFIG_PATH": str(tmp_path / "eg"),
           "TS_INGRESS_PROXIES_CONFIG_PATH": str(tmp_path / "ingress.json")}
    assert not [n for n in load(env).notes if "not implemented" in n]
    proc = subprocess.run([containerboot_exe(), "plan", "--tailnet-ip", "100.64.0.1", "--json", "--status"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    rules_json, status = map(json.loads, proc.stdout.splitlines())
    assert {r["kind"] for r in rules_json} == {"dnat", "portmap", "snat", "mss-clamp"}
    assert {"kind": "portmap", "family": 4, "iface": "tailscale0", "proto": "tcp", "port": 8080, "to": "100.64.0.7",
            "to_port": 80} in rules_json
    assert status["egress-services"]["podIPv4"] == "10.1.0.5"
    assert status["egress-services"]["services"]["named"]["tailnetTargetIPs"] is None
    assert status["ingress-config.json"]["configs"]["svc:a"]["IPv4Mapping"]["ClusterIP"] == "10.96.0.10"
    assert "db.ts.net is a name" in proc.stderr
    # A bad file: one line, exit 1.
    (tmp_path / "eg" / "egress-services").write_text('{"x": {"tailnetTarget": {}}}')
    proc = subprocess.run([containerboot_exe(), "plan", "--tailnet-ip", "100.64.0.1"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "neither ip nor fqdn" in proc.stderr, proc.stderr


# ---- the pre-stop drain against a loopback health check endpoint ----------------------------------------------


class _HEP:
    def __init__(self, header: str, value: str) -> None:
        import http.server
        import threading

        self.hits = 0
        hep = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                hep.hits += 1
                self.send_response(200)
                self.send_header(header, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/healthz"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def drain_for(tmp_path: Any, url: str, pings: int, pod: tuple[str, str] = ("10.1.0.5", ""),
              **kw: Any) -> tuple[egress.Drain, list[str]]:
    import threading

    (tmp_path / "egress-services").write_bytes(cfg(web=svc("100.64.0.7", "", ("tcp", 1, 1), hep=url)))
    (tmp_path / "hep-pings").write_text(str(pings))
    lines: list[str] = []
    opts: dict[str, Any] = {"short": 0.05, "long": 0.1, **kw}
    return egress.Drain(str(tmp_path), pod, threading.Event(), log=lines.append, **opts), lines


@pytest.mark.parametrize(("header", "value", "pod", "pings", "hits"), [
    ("Pod-IPv4", "10.1.0.6", ("10.1.0.5", ""), 3, 3),  # another replica answers every ping: drained
    ("Pod-IPv4", "10.1.0.5", ("10.1.0.5", ""), 0, 0),  # no pings asked for: nothing to check
    ("Pod-IPv6", "FD00::5", ("", "fd00::5"), 2, 2),  # an IPv6-only Pod is matched by its header, any case
])
def test_drain_ends_when_no_answer_is_ours(tmp_path: Any, header: str, value: str, pod: tuple[str, str], pings: int,
                                           hits: int) -> None:
    hep = _HEP(header, value)
    try:
        d, lines = drain_for(tmp_path, hep.url, pings, pod)
        if header == "Pod-IPv6":  # ours: it waits until the bound
            d.bound = 0.3
        assert d.answer() == (200, b"")
        assert hep.hits >= hits
        if header == "Pod-IPv6":
            assert any("did not stop being routed" in ln for ln in lines), lines
        else:
            assert hep.hits == hits and any("no longer routed" in ln for ln in lines), lines
    finally:
        hep.close()


def test_drain_unreachable_endpoint_counts_as_drained(tmp_path: Any) -> None:
    d, lines = drain_for(tmp_path, "http://127.0.0.1:1/healthz", 2)
    assert d.answer() == (200, b"")
    assert any("can not be reached" in ln for ln in lines)


def test_drain_stop_ends_it_at_once(tmp_path: Any) -> None:
    import threading
    import time

    hep = _HEP("Pod-IPv4", "10.1.0.5")
    try:
        d, _ = drain_for(tmp_path, hep.url, 1, long=30.0, bound=30.0)
        threading.Timer(0.3, d.stop.set).start()
        t0 = time.monotonic()
        assert d.answer() == (200, b"")
        assert time.monotonic() - t0 < 3
    finally:
        hep.close()


def test_drain_without_config_or_with_bad_pings(tmp_path: Any) -> None:
    import threading

    d = egress.Drain(str(tmp_path), ("10.1.0.5", ""), threading.Event())
    assert d.answer() == (200, b"safe to terminate")
    (tmp_path / "egress-services").write_bytes(cfg(web=svc("100.64.0.7")))
    (tmp_path / "hep-pings").write_text("many")
    status, body = d.answer()
    assert status == 500 and b"is not an integer" in body


def test_operator_upper_case_protocol_is_accepted_and_echoed() -> None:
    """The operator writes corev1.Protocol ("TCP"): the rules use the kernel's lower case, the status keeps
    the operator's spelling (it compares the status with what it wrote)."""
    services = egress.parse(cfg(web=svc("100.64.0.7", "", ("TCP", 80, 8080), ("UDP", 53, 53))))
    assert services is not None
    got, _ = egress.targets(services, node())
    plan, notes = rules.plan(S, rules.Inputs(proxy.Inputs(SELF), got))
    assert {r for r in plan.rules if isinstance(r, PortMap)} == {PortMap("tcp", 80, T4, 8080),
                                                                  PortMap("udp", 53, T4, 53)} and not notes
    ports = json.loads(egress.status_bytes(egress.status(got, ("10.1.0.5", ""))))["services"]["web"]["ports"]
    assert {p["protocol"] for p in ports} == {"TCP", "UDP"}
