"""A web server exposed through the Tailscale operator's proxies on the Kubernetes lab (tests/lab/cluster.py):
`web_pod` runs one (our image's Python), `expose` puts a LoadBalancer Service of class tailscale in front of it,
and `wait_proxy` waits for what the operator makes for it (`Exposed`): its StatefulSet and the proxy's state
Secret with the device's name and addresses.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tests.lab.cluster import OPERATOR_NS, Cluster

# A web server in our image's Python: answers "web <client address>" so a test sees where a request came from;
# on both families (one IPv6 socket that takes IPv4 too, whose IPv4 clients it names without the ::ffff: prefix).
WEB_SERVER = """
import http.server, socket, socketserver
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("web " + self.client_address[0].removeprefix("::ffff:") + "\\n").encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
S(("::", 8080), H).serve_forever()
"""


@dataclass
class Exposed:
    """A web server pod behind a LoadBalancer Service of class tailscale, and what the operator made for it."""

    ns: str
    service: str
    created: float  # time.monotonic() when the Service was created
    sts: dict[str, Any] | None = None
    secret: dict[str, str] | None = None

    @property
    def pod(self) -> str:
        assert self.sts is not None
        return f"{self.sts['metadata']['name']}-0"


def labels_of(ns: str, service: str) -> str:
    """The label selector of what the operator makes for a Service (cmd/k8s-operator's childResourceLabels)."""
    return (f"tailscale.com/managed=true,tailscale.com/parent-resource={service},"
            f"tailscale.com/parent-resource-ns={ns},tailscale.com/parent-resource-type=svc")


def web_pod(c: Cluster, ns: str, name: str, image: str = "containerboot-lab:ours") -> None:
    c.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
             "spec": {"terminationGracePeriodSeconds": 0, "containers": [{
                 "name": "web", "image": image, "imagePullPolicy": "IfNotPresent",
                 "command": ["python3", "-c", WEB_SERVER], "ports": [{"containerPort": 8080}]}]}})


def wait_pod_ready(c: Cluster, ns: str, name: str, timeout: float = 60) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        pod = c.get(f"/api/v1/namespaces/{ns}/pods/{name}")
        if pod and any(x["type"] == "Ready" and x["status"] == "True"
                       for x in pod.get("status", {}).get("conditions", [])):
            return pod
        return None
    return dict(c.wait_for(ready, timeout, f"pod {ns}/{name} Ready"))


def expose(c: Cluster, ns: str, app: str, proxy_class: str, hostname: str, families: dict[str, Any] | None = None,
           annotated: bool = False) -> Exposed:
    """A LoadBalancer Service with loadBalancerClass tailscale in front of pod `app`, proxied with `proxy_class`;
    with `annotated`, a ClusterIP Service with `tailscale.com/expose: "true"` instead. `families`: the Service's
    ipFamilyPolicy and ipFamilies (the cluster's primary family alone when not given)."""
    annotations = {"tailscale.com/hostname": hostname, **({"tailscale.com/expose": "true"} if annotated else {})}
    kind = {"type": "ClusterIP"} if annotated else {"type": "LoadBalancer", "loadBalancerClass": "tailscale"}
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": app, "namespace": ns, "labels": {"tailscale.com/proxy-class": proxy_class},
                        "annotations": annotations},
           "spec": {**kind, **(families or {}), "selector": {"app": app},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    created = time.monotonic()
    c.apply(svc)
    return Exposed(ns, app, created)


def wait_proxy(c: Cluster, e: Exposed, timeout: float = 120) -> Exposed:
    """Waits for the operator's StatefulSet and for the proxy's state Secret to hold device_fqdn and device_ips."""
    sel = labels_of(e.ns, e.service)
    path = f"/apis/apps/v1/namespaces/{OPERATOR_NS}/statefulsets"
    e.sts = c.wait_for(lambda: next(iter(c.list_items(path, sel)), None), 60,
                       f"the operator's StatefulSet for {e.ns}/{e.service}")

    def secret() -> dict[str, str] | None:
        for s in c.list_items(f"/api/v1/namespaces/{OPERATOR_NS}/secrets", sel):
            data = c.secret_data(OPERATOR_NS, s["metadata"]["name"])
            if data.get("device_fqdn") and data.get("device_ips"):
                return data
        return None
    try:
        e.secret = c.wait_for(secret, timeout, f"device_fqdn and device_ips in the proxy Secret of {e.service}")
    except TimeoutError as err:
        raise AssertionError(f"{err}\n--- proxy log:\n{c.pod_log(OPERATOR_NS, e.pod, 'tailscale')[-4000:]}"
                             f"\n--- operator log:\n{c.log('operator', 15)}") from None
    return e


def fetch_through_tailnet(c: Cluster, e: Exposed, timeout: float) -> str | None:
    """What the tailnet client gets from the proxy's first tailnet address on port 80 within `timeout`."""
    assert e.secret is not None
    return fetch_from(c, json.loads(e.secret["device_ips"])[0], timeout)


def fetch_from(c: Cluster, ip: str, timeout: float) -> str | None:
    """What the tailnet client gets from http://`ip`/ within `timeout` (None: nothing)."""
    assert c.tailnet is not None and c.client is not None
    got: list[str | None] = [None]

    def attempt() -> bool:
        assert c.tailnet is not None and c.client is not None
        got[0] = c.tailnet.fetch(c.client.ns, f"http://[{ip}]/" if ":" in ip else f"http://{ip}/", timeout=2.0)
        return bool(got[0])

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not attempt():
        time.sleep(0.3)
    return got[0]


def run_pod(c: Cluster, ns: str, name: str, code: str, timeout: float = 60) -> str:
    """Runs `code` in our image's Python as a one-shot pod and returns its output."""
    c.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
             "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0, "containers": [{
                 "name": "main", "image": "containerboot-lab:ours", "imagePullPolicy": "IfNotPresent",
                 "command": ["python3", "-c", code]}]}})
    c.wait_for(lambda: (c.get(f"/api/v1/namespaces/{ns}/pods/{name}") or {}).get("status", {}).get("phase")
               in ("Succeeded", "Failed"), timeout, f"pod {ns}/{name} to finish")
    return c.pod_log(ns, name, "main")


FETCH = """
import sys, time, urllib.request
url, deadline = sys.argv[1] if len(sys.argv) > 1 else "{url}", time.monotonic() + {timeout}
while True:
    try:
        print(urllib.request.urlopen(url, timeout=3).read().decode().strip()); break
    except OSError as e:
        if time.monotonic() > deadline:
            print("failed:", e); break
        time.sleep(0.5)
"""


def proxy_group_ready(c: Cluster, name: str) -> bool:
    obj = c.get(f"/apis/tailscale.com/v1alpha1/proxygroups/{name}") or {}
    return any(x["type"] == "ProxyGroupReady" and x["status"] == "True"
               for x in obj.get("status", {}).get("conditions", []))


def egress_proxy_group(c: Cluster, name: str, proxy_class: str, replicas: int = 2) -> str:
    """An egress ProxyGroup of `replicas` replicas through `proxy_class`, waited for until Ready."""
    c.apply({"apiVersion": "tailscale.com/v1alpha1", "kind": "ProxyGroup", "metadata": {"name": name},
             "spec": {"type": "egress", "replicas": replicas, "proxyClass": proxy_class}})
    try:
        c.wait_for(lambda: proxy_group_ready(c, name), 150, f"ProxyGroup {name} Ready")
    except TimeoutError as err:
        obj = c.get(f"/apis/tailscale.com/v1alpha1/proxygroups/{name}")
        raise AssertionError(f"{err}: {json.dumps((obj or {}).get('status'))[:1500]}\n"
                             f"{c.pod_log(OPERATOR_NS, f'{name}-0', 'tailscale')[-3000:]}") from None
    return name


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"
