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
from tests.lab.expose import FETCH, expose, fetch_from, run_pod, unique, wait_pod_ready, wait_proxy, web_pod

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
