"""A ProxyGroup egress replica with real tailscaled, headscale, kube-apiserver and kernel rules: a mounted
egress-services config carries a cluster Pod's connections to a tailnet node, the status lands in the
state Secret, and a config change (kubelet's ..data swap) moves the rules with it, in both backends."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.fakes import kubelet_publish
from tests.lab.kubeapi import KubeAPI
from tests.lab.kubepod import KubePod
from tests.lab.tailnet import Node, Tailnet, tailscale_ip
from tests.lab.tailnet_boot import Booted, site
from tests.lab.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.kube]


@pytest.fixture
def kube_pod(net: Tailnet, kubeapi: KubeAPI, kns: str) -> Iterator[Callable[[str, str], KubePod]]:
    pods: list[KubePod] = []

    def make(node_ns: str, secret: str) -> KubePod:
        pod = KubePod(net, kubeapi, kns, node_ns, secret)
        pods.append(pod)
        return pod

    yield make
    for pod in pods:
        pod.close()


def services(target: str, match: int, fqdn: str = "") -> dict[str, Any]:
    return {"web": {"tailnetTarget": {"ip": "" if fqdn else target, "fqdn": fqdn},
                    "ports": [{"protocol": "tcp", "matchPort": match, "targetPort": 8080}]}}


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_egress_services_carry_cluster_traffic_and_follow_the_config(
        net: Tailnet, client: Node, boot: Callable[..., Booted], kube_pod: Callable[[str, str], KubePod],
        tmp_path: Path, backend: str) -> None:
    ns, cluster_pod, n = site(net, "egs")
    pod = kube_pod(ns, f"egs{n}-0")
    cfg = tmp_path / "egress"
    cfg.mkdir()
    cfg.chmod(0o755)
    target = tailscale_ip(net.status(client))
    kubelet_publish(cfg, {"egress-services": json.dumps(services(target, 9080))}, 1)
    # The operator's init container turns forwarding on for ProxyGroup replicas; containerboot does not.
    net.lab.run(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    node = boot(ns, f"egs{n}", setup=pod.setup, TS_USERSPACE="false", TS_DEBUG_FIREWALL_MODE=backend,
                TS_EGRESS_PROXIES_CONFIG_PATH=str(cfg), POD_IPS=f"198.18.{n}.1", **pod.env)
    me = node.ip()
    # The cluster Pod connects to the replica's Pod IP on the match port and lands on the tailnet node,
    # coming from the replica's tailnet address (SNAT).
    assert net.wait_fetch(cluster_pod, f"http://198.18.{n}.1:9080/", f"client {me}") == f"client {me}"
    status = json.loads(wait_for(lambda: pod.secret().get("egress-services"), 10))
    assert status == {"podIPv4": f"198.18.{n}.1", "services": {"web": {
        "ports": [{"protocol": "tcp", "matchPort": 9080, "targetPort": 8080}], "tailnetTargetIPs": [target],
        "tailnetTarget": {"ip": target, "fqdn": ""}}}}
    # The operator moves the service to another port and names the target instead: the old port stops
    # forwarding, the new one works, the status follows.
    kubelet_publish(cfg, {"egress-services": json.dumps(services(target, 9081, fqdn="client.lab.test"))}, 2)
    assert net.wait_fetch(cluster_pod, f"http://198.18.{n}.1:9081/", f"client {me}") == f"client {me}"
    assert net.fetch(cluster_pod, f"http://198.18.{n}.1:9080/", timeout=2) is None
    status = json.loads(wait_for(lambda: (s := pod.secret().get("egress-services")) and "9081" in s and s, 10))
    assert status["services"]["web"]["tailnetTarget"] == {"ip": "", "fqdn": "client.lab.test"}
    assert target in status["services"]["web"]["tailnetTargetIPs"]
    # Every service leaves: no forwarding, the status says so.
    kubelet_publish(cfg, {"egress-services": "{}"}, 3)
    wait_for(lambda: json.loads(pod.secret().get("egress-services") or "{}").get("services", 0) is None, 10)
    assert net.fetch(cluster_pod, f"http://198.18.{n}.1:9081/", timeout=2) is None
