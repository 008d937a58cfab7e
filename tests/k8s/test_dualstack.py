"""IPv6 through the operator's proxies on the dual-stack lab cluster (issue 20), the cases upstream's own operator
e2e suite checks, for our image and, side by side, upstream's containerboot with nf_tables iptables
("upstream-nft"): each case runs for both and prints what each did.

- L3 ingress (upstream's TestL3Ingress): `tailscale.com/expose` on a ClusterIP Service of each family; the tailnet
  client fetches the page over the proxy's tailnet address of the ClusterIP's family, and the other family's
  address forwards nothing (netfilter cannot NAT between families; ours says so in one line).
- Egress (TestEgress): ExternalName Services to the tailnet client's IPv4 address, its IPv6 address, and its
  MagicDNS name; a cluster pod fetches the client's page through each, over the proxy pod's address of the
  target's family (both families for the name).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.lab.cluster import OPERATOR_NS, POD_CIDR6, SERVICE_CIDR6, Cluster
from tests.lab.expose import (
    FETCH,
    egress_proxy_group,
    expose,
    fetch_from,
    run_pod,
    unique,
    wait_pod_ready,
    wait_proxy,
    web_pod,
)

pytestmark = [pytest.mark.root, pytest.mark.docker]

REACH_TIMEOUT = 60.0
IMAGES = ["ours", "upstream-nft"]
FAMILIES: dict[str, dict[str, Any]] = {
    "IPv4": {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4"]},
    "IPv6": {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv6"]},
    "PreferDualStack": {"ipFamilyPolicy": "PreferDualStack"},
}


def namespace(c: Cluster, prefix: str) -> str:
    return str(c.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": unique(prefix)}})
               ["metadata"]["name"])


def url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}/" if ":" in ip else f"http://{ip}:{port}/"


def test_the_lab_is_dual_stack(cluster: Cluster) -> None:
    c = cluster
    node = c.get("/api/v1/nodes/lab-node")
    assert node is not None
    internal = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
    assert len(internal) == 2 and ":" in internal[1], internal
    ns = namespace(c, "ds")
    web_pod(c, ns, "web")
    pod = wait_pod_ready(c, ns, "web")
    ips = [p["ip"] for p in pod["status"]["podIPs"]]
    assert len(ips) == 2 and ips[1].startswith(POD_CIDR6.split("::")[0] + ":"), ips
    svc = c.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns},
                   "spec": {**FAMILIES["PreferDualStack"], "selector": {"app": "web"},
                            "ports": [{"port": 80, "targetPort": 8080}]}})
    assert len(svc["spec"]["clusterIPs"]) == 2 and svc["spec"]["clusterIPs"][1].startswith(
        SERVICE_CIDR6.split("::")[0] + ":"), svc["spec"]
    # kube-proxy (nftables) serves both families: a pod reaches the Service at each ClusterIP.
    for ip in svc["spec"]["clusterIPs"]:
        out = run_pod(c, ns, unique("via"), FETCH.format(url=url(ip, 80), timeout=30), timeout=60)
        assert out.startswith("web "), (ip, out)
    print(f"\ndual-stack lab: node {internal}, pod {ips}, Service {svc['spec']['clusterIPs']}")


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_l3_ingress_by_family(cluster: Cluster, family: str, image: str) -> None:
    c = cluster
    ns = namespace(c, "l3")
    web_pod(c, ns, "web")
    wait_pod_ready(c, ns, "web")
    e = wait_proxy(c, expose(c, ns, "web", image, unique(f"l3-{family.lower()}"), FAMILIES[family], annotated=True))
    assert e.secret is not None
    svc = c.get(f"/api/v1/namespaces/{ns}/services/web")
    assert svc is not None
    target = str(svc["spec"]["clusterIP"])  # the operator's TS_DEST_IP: the first ClusterIP
    fam = 6 if ":" in target else 4
    assert fam == (6 if family == "IPv6" else 4) and len(svc["spec"]["clusterIPs"]) == (2 if "Dual" in family else 1)
    tailnet = json.loads(e.secret["device_ips"])
    same = next(ip for ip in tailnet if (":" in ip) == (fam == 6))
    other = next(ip for ip in tailnet if (":" in ip) != (fam == 6))
    body = fetch_from(c, same, REACH_TIMEOUT)
    log = c.pod_log(OPERATOR_NS, e.pod, "tailscale")
    print(f"\n{image}, {family} Service (TS_DEST_IP {target}): over {same}: {body!r}")
    assert body is not None and body.startswith("web "), log[-3000:]
    assert fetch_from(c, other, 5) is None  # nothing forwarded across families
    if image == "ours":
        line = (f"TS_DEST_IP {target} is IPv{fam}: this proxy's IPv{10 - fam} tailnet address {other} forwards nothing "
                f"(netfilter cannot translate IPv{10 - fam} to IPv{fam}); clients reach the Service at {same}")
        assert line in log, log[-3000:]
        assert sum(line in ln for ln in log.splitlines()) == 1
        ruleset = c.in_pod(OPERATOR_NS, e.pod, "nft", "list", "ruleset").stdout
        assert f"table {'ip6' if fam == 4 else 'ip'} containerboot" not in ruleset  # nothing half-installed


def client_ips(c: Cluster) -> dict[int, str]:
    assert c.tailnet is not None and c.client is not None
    ips = c.tailnet.status(c.client)["Self"]["TailscaleIPs"]
    return {6 if ":" in ip else 4: ip for ip in ips}


def proxy_addresses(c: Cluster, ns: str, service: str) -> dict[int, str]:
    """Where the operator's ExternalName leads a pod, per family: the ready endpoints of the headless Service it
    names (cluster DNS would answer A and AAAA with them; the lab has no cluster DNS, so the test asks the API)."""
    def found() -> dict[int, str] | None:
        svc = c.get(f"/api/v1/namespaces/{ns}/services/{service}") or {}
        ext = svc.get("spec", {}).get("externalName", "")
        if not ext.endswith(".svc.cluster.local"):
            return None
        name, where = ext.split(".")[:2]
        slices = c.list_items(f"/apis/discovery.k8s.io/v1/namespaces/{where}/endpointslices",
                              f"kubernetes.io/service-name={name}")
        out = {6 if sl["addressType"] == "IPv6" else 4: ep["addresses"][0] for sl in slices
               for ep in sl.get("endpoints") or [] if ep.get("conditions", {}).get("ready")}
        return out if len(out) == 2 else None
    return dict(c.wait_for(found, 120, f"both families' endpoints of the proxy behind {ns}/{service}"))


EGRESS = {"IPv4": ("tailnet-ip", 4), "IPv6": ("tailnet-ip", 6), "FQDN": ("tailnet-fqdn", 0)}


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("target", list(EGRESS))
def test_egress_to_a_tailnet_address_of_each_family_and_a_name(cluster: Cluster, target: str, image: str) -> None:
    c = cluster
    assert c.tailnet is not None and c.client is not None
    port = {"IPv4": 8091, "IPv6": 8092, "FQDN": 8093}[target] + (10 if image != "ours" else 0)
    c.lab.serve(c.client.ns, f"tailnet-client-{target.lower()}", "::", port)
    kind, fam = EGRESS[target]
    value = client_ips(c)[fam] if fam else "client.lab.ts.net"
    ns = namespace(c, "eg")
    c.apply({"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "client", "namespace": ns, "annotations": {f"tailscale.com/{kind}": value},
                          "labels": {"tailscale.com/proxy-class": image}},
             "spec": {"type": "ExternalName", "externalName": "placeholder",
                      "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}})
    proxy = proxy_addresses(c, ns, "client")
    for via in ([fam] if fam else [4, 6]):
        out = run_pod(c, ns, unique(f"fetch{via}"), FETCH.format(url=url(proxy[via], port), timeout=REACH_TIMEOUT),
                      timeout=REACH_TIMEOUT + 30)
        print(f"\n{image}, egress to {value} through the proxy's IPv{via} address {proxy[via]}: {out}")
        assert out.startswith(f"tailnet-client-{target.lower()} "), out


def group_service_ips(c: Cluster, ns: str, service: str) -> dict[int, str]:
    """The ClusterIPs, per family, of the Service the operator puts in front of the ProxyGroup for `service`
    (its ExternalName names it), once both replicas are its endpoints."""
    def found() -> dict[int, str] | None:
        ext = ((c.get(f"/api/v1/namespaces/{ns}/services/{service}") or {}).get("spec") or {}).get("externalName", "")
        if not ext.endswith(".svc.cluster.local"):
            return None
        name, where = ext.split(".")[:2]
        target = (c.get(f"/api/v1/namespaces/{where}/services/{name}") or {}).get("spec") or {}
        slices = c.list_items(f"/apis/discovery.k8s.io/v1/namespaces/{where}/endpointslices",
                              f"kubernetes.io/service-name={name}")
        ready = {ep["addresses"][0] for sl in slices for ep in sl.get("endpoints") or []
                 if ep.get("conditions", {}).get("ready")}
        ips = {6 if ":" in ip else 4: ip for ip in target.get("clusterIPs") or []}
        return ips if len(ready) >= 2 and ips else None
    return dict(c.wait_for(found, 120, f"the ProxyGroup's Service for {ns}/{service} with both replicas"))


@pytest.mark.parametrize("image", IMAGES)
def test_ha_egress_to_a_tailnet_address_of_each_family_and_a_name(cluster: Cluster, image: str) -> None:
    """Upstream's TestHAEgress: the three egress Services above through one egress ProxyGroup of 2 replicas. A
    cluster pod reaches each through the ClusterIP of the operator's Service of the target's family (both for the
    name): a ProxyGroup replica maps a port of its Pod address to the target, within one family.

    Ours carries all four. Upstream's carries IPv4 only: its iptables port map writes `--to-destination
    <target>:<port>` without brackets (util/linuxfw iptables_for_svcs.go, portMapRule), which for an IPv6 target
    reads as one IPv6 address (fd7a:115c:a1e0::2 and port 8112 become fd7a:115c:a1e0::2:8112): its DNAT sends
    the connection to an address nobody has. The test asserts that too, from the replica's rules."""
    c = cluster
    assert c.tailnet is not None and c.client is not None
    pg = egress_proxy_group(c, unique(f"ha-{image}"), image)
    ns = namespace(c, "ha")
    base = 8121 if image == "ours" else 8131  # the tailnet client's ports are the session's: none shared
    ports = {target: base + i for i, target in enumerate(EGRESS)}
    for target, port in ports.items():
        c.lab.serve(c.client.ns, f"ha-client-{target.lower()}", "::", port)
        kind, fam = EGRESS[target]
        value = client_ips(c)[fam] if fam else "client.lab.ts.net"
        c.apply({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": target.lower(), "namespace": ns,
                              "annotations": {f"tailscale.com/{kind}": value, "tailscale.com/proxy-group": pg}},
                 "spec": {"type": "ExternalName", "externalName": "placeholder",
                          "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}})
    carried: dict[tuple[str, int], bool] = {}
    for target, port in ports.items():
        fam = EGRESS[target][1]
        ips = group_service_ips(c, ns, target.lower())
        for via in ([fam] if fam else [4, 6]):
            assert via in ips, f"no IPv{via} ClusterIP for {target}: {ips}"
            out = run_pod(c, ns, unique(f"ha{via}"), FETCH.format(url=url(ips[via], port),
                                                                  timeout=REACH_TIMEOUT if image == "ours" else 20),
                          timeout=REACH_TIMEOUT + 30)
            carried[(target, via)] = out.startswith(f"ha-client-{target.lower()} ")
            print(f"\n{image}, ProxyGroup {pg}, egress {target} through the IPv{via} ClusterIP {ips[via]}: {out}")
    log = c.pod_log(OPERATOR_NS, f"{pg}-0", "tailscale")
    if image == "ours":
        assert all(carried.values()), (carried, log[-2000:])
        # The IPv4 ClusterIP of the IPv6-only service leads to nothing, and the replica says so once.
        line = f"its tailnet targets [{client_ips(c)[6]}] are IPv6 only: connections to this Pod's IPv4 address "
        assert sum(line in ln for ln in log.splitlines()) == 1, log[-3000:]
        return
    assert carried == {("IPv4", 4): True, ("IPv6", 6): False, ("FQDN", 4): True, ("FQDN", 6): False}, (carried, log)
    mangled = f"{client_ips(c)[6]}:{ports['IPv6']}"  # the target and its port read as one address
    rules = "".join(c.in_pod(OPERATOR_NS, f"{pg}-{i}", "ip6tables-nft-save", check=False).stdout for i in range(2))
    assert f"--to-destination {mangled}" in rules, rules[-3000:]


def connector(c: Cluster, image: str, prefix: str, **spec: object) -> str:
    hostname = unique(prefix)
    c.apply({"apiVersion": "tailscale.com/v1alpha1", "kind": "Connector", "metadata": {"name": hostname},
             "spec": {"hostname": hostname, "proxyClass": image, **spec}})
    return hostname


def advertised(c: Cluster, hostname: str) -> set[str]:
    assert c.tailnet is not None
    node = c.tailnet.node_by_name(hostname) or {}
    return set(node.get("available_routes", []) + node.get("announced_routes", []))


def remove_connector(c: Cluster, hostname: str) -> None:
    """The Connector deleted and its proxy Pod gone (its device offline), so that no later test meets its routes."""
    c.delete(f"/apis/tailscale.com/v1alpha1/connectors/{hostname}")
    c.wait_for(lambda: not c.list_items(f"/apis/apps/v1/namespaces/{OPERATOR_NS}/statefulsets",
                                        f"tailscale.com/parent-resource={hostname}"), 90,
               f"{hostname}'s StatefulSet to go")


@pytest.mark.parametrize("image", IMAGES)
def test_connector_exit_node_advertises_both_default_routes(cluster: Cluster, image: str) -> None:
    c = cluster
    hostname = connector(c, image, "exit", exitNode=True)
    try:
        routes = c.wait_for(lambda: (r := advertised(c, hostname)) >= {"0.0.0.0/0", "::/0"} and r, 120,
                            f"the exit node {hostname} to advertise 0.0.0.0/0 and ::/0")
        print(f"\n{image}, exit node {hostname}: headscale shows {sorted(routes)}")
    finally:
        remove_connector(c, hostname)


@pytest.mark.parametrize("image", IMAGES)
def test_connector_app_connector_advertises_itself_and_its_ipv6_routes(cluster: Cluster, image: str) -> None:
    c = cluster
    route = "fd18:99::/64"  # a preconfigured route of the app connector's domains (nothing answers there)
    hostname = connector(c, image, "app", appConnector={"routes": [route]})
    try:
        routes = c.wait_for(lambda: (r := advertised(c, hostname)) >= {route} and r, 120,
                            f"the app connector {hostname} to advertise {route}")
        sts = c.list_items(f"/apis/apps/v1/namespaces/{OPERATOR_NS}/statefulsets",
                           f"tailscale.com/parent-resource={hostname}")
        assert sts, f"no StatefulSet for {hostname}"
        pod = f"{sts[0]['metadata']['name']}-0"
        prefs = c.exec_in(OPERATOR_NS, pod, "tailscale", "tailscale", "--socket=/tmp/tailscaled.sock", "debug",
                          "prefs")
        assert prefs.returncode == 0, prefs.stderr
        assert json.loads(prefs.stdout)["AppConnector"]["Advertise"] is True
        print(f"\n{image}, app connector {hostname}: advertises {sorted(routes)}, prefs AppConnector.Advertise true")
    finally:
        remove_connector(c, hostname)


@pytest.mark.parametrize("image", IMAGES)
def test_connector_subnet_router_with_an_ipv6_range_carries_traffic_once_approved(cluster: Cluster,
                                                                                   image: str) -> None:
    c = cluster
    assert c.tailnet is not None and c.client is not None
    ns = namespace(c, "sr6")
    web_pod(c, ns, "web")
    wait_pod_ready(c, ns, "web")
    svc = c.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns},
                   "spec": {**FAMILIES["IPv6"], "selector": {"app": "web"},
                            "ports": [{"port": 80, "targetPort": 8080}]}})
    ip = str(svc["spec"]["clusterIP"])
    hostname = connector(c, image, "sr6", subnetRouter={"advertiseRoutes": [SERVICE_CIDR6]})
    try:
        c.tailnet.cli(c.client, "set", "--accept-routes")
        c.wait_for(lambda: SERVICE_CIDR6 in advertised(c, hostname), 120, f"{hostname} to advertise {SERVICE_CIDR6}")
        assert c.tailnet.fetch(c.client.ns, url(ip, 80), timeout=3) is None  # not approved: no route
        c.tailnet.approve_routes(hostname, SERVICE_CIDR6)
        body = fetch_from(c, ip, REACH_TIMEOUT)
        print(f"\n{image}, subnet router {hostname}: {SERVICE_CIDR6} approved; [{ip}]:80 -> {body!r}")
        assert body is not None and body.startswith("web "), advertised(c, hostname)
    finally:
        remove_connector(c, hostname)
