"""The second main job: the Tailscale operator's proxies on a real single-node dual-stack Kubernetes whose
kube-proxy runs in nftables mode (tests/lab/cluster.py), the seed's case run once with each image side by side: a
LoadBalancer Service of class tailscale in front of a web server pod, and a tailnet client fetching the page
through the operator's proxy. Prints the lab's start time and, per image, the time from Service created to page
fetched, what containerboot chose and where its rules are. Then the same with an IPv6-only Service for ours and
upstream's nf_tables image, fetched over the proxy's IPv6 tailnet address. Cleans up after itself.

Two of the runs are on a STAND-IN node: this machine's kernel has legacy iptables built in, so upstream's legacy
image works here; the ProxyClasses "<image>-no-legacy-xtables" run the proxy under a seccomp profile that fails
legacy xtables' socket options as a kernel without them does (tests/lab/cluster.py, no_legacy_xtables_profile),
standing in for the seed's nf_tables-only node. There upstream's legacy image joins the tailnet and serves
nothing, and ours serves the page.

Run as root: `make demo-k8s` (it builds the Go components and the images first). With `--repeat N` it then
measures Service created -> page fetched N more times for ours and for upstream's nf_tables image, alternating,
and prints each run and the medians (the figure the README quotes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.cluster import NO_LEGACY_XTABLES, OPERATOR_NS, Cluster, missing  # noqa: E402
from tests.lab.expose import expose, labels_of, unique, wait_pod_ready, wait_proxy, web_pod  # noqa: E402

STANDIN = "on the stand-in node without legacy xtables"
IPV6 = "ipv6"  # the suffix of a run whose Service is IPv6 only
VARIANTS = [
    ("ours", "this project's image"),
    ("upstream-legacy", "upstream's containerboot, iptables = legacy (the seed's image)"),
    ("upstream-nft", "upstream's containerboot, iptables = nf_tables"),
    (f"upstream-legacy-{NO_LEGACY_XTABLES}", f"the seed's image {STANDIN}"),
    (f"ours-{NO_LEGACY_XTABLES}", f"this project's image {STANDIN}"),
    (f"ours {IPV6}", "this project's image, an IPv6-only Service"),
    (f"upstream-nft {IPV6}", "upstream's containerboot (nf_tables), an IPv6-only Service"),
]
REACH_TIMEOUT = 60.0
NO_DEVICE_IPS_FOR = 45.0  # how long a proxy that joined may take to write device_ips before the demo moves on


def say(text: str) -> None:
    print(f"demo-k8s: {text}", flush=True)


def decision(log: str) -> str:
    """containerboot's own line about its firewall choice."""
    for line in log.splitlines():
        if "Configuration: " in line:
            return line.split("Configuration: ", 1)[1][:220]
    picks = [line.split(" ", 3)[-1] for line in log.splitlines()
             if "choosing" in line or "firewall mode" in line or "netfilter running in" in line]
    return "; ".join(picks[:3]) or "(no firewall line in its log)"


def run_variant(c: Cluster, variant: str, what: str) -> tuple[float | None, str]:
    assert c.tailnet is not None and c.client is not None
    proxy_class, _, family = variant.partition(" ")
    v6 = family == IPV6
    ns = c.apply({"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": unique(proxy_class)}})["metadata"]["name"]
    web_pod(c, ns, "web")
    wait_pod_ready(c, ns, "web")
    say(f"[{variant}] {what}: creating Service {ns}/web (type LoadBalancer, loadBalancerClass tailscale)")
    hostname = unique("web")
    e = expose(c, ns, "web", proxy_class, hostname,
               {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv6"]} if v6 else None)
    tailnet = c.tailnet
    node = c.wait_for(lambda: tailnet.node_by_name(hostname), 120, f"the proxy {hostname} in headscale")
    joined = time.monotonic() - e.created
    ip = next(a for a in node.get("ip_addresses") or [] if (":" in a) == v6)
    url = f"http://[{ip}]/" if v6 else f"http://{ip}/"
    say(f"[{variant}] proxy joined the tailnet as {hostname} {ip} ({joined:.1f} s after the Service)")
    fetch_for = REACH_TIMEOUT
    try:
        wait_proxy(c, e, timeout=NO_DEVICE_IPS_FOR)
    except AssertionError:  # joined, but its Secret never got device_ips: upstream writes them after its rules
        log = c.pod_log(OPERATOR_NS, e.pod, "tailscale")
        failure = next((line.split("boot: ", 1)[-1] for line in log.splitlines()
                        if "installing ingress proxy rules" in line), "(no rule failure in its log)")
        pod = c.get(f"/api/v1/namespaces/{OPERATOR_NS}/pods/{e.pod}") or {}
        restarts = sum(int(x.get("restartCount", 0)) for x in pod.get("status", {}).get("containerStatuses") or []
                       if x["name"] == "tailscale")
        short = failure if len(failure) < 300 else failure[:90] + " ... " + failure[-190:]
        say(f"[{variant}] no device_ips in its Secret within {NO_DEVICE_IPS_FOR:.0f} s; container restarted "
            f"{restarts} times; its error: {short}")
        fetch_for = 20.0
    deadline = time.monotonic() + fetch_for
    body = None
    while time.monotonic() < deadline and body is None:
        body = c.tailnet.fetch(c.client.ns, url, timeout=2.0)
        if body is None:
            time.sleep(0.3)
    reached = time.monotonic() - e.created if body else None
    log = c.pod_log(OPERATOR_NS, e.pod, "tailscale")
    say(f"[{variant}] containerboot: {decision(log)}")
    across = next((line.split("boot: ", 1)[-1].split(" ", 2)[-1] for line in log.splitlines()
                   if "forwards nothing (netfilter cannot translate" in line), "")
    if across:
        say(f"[{variant}] {across[:260]}")
    svc_ip = (c.get(f"/api/v1/namespaces/{ns}/services/web") or {}).get("spec", {}).get("clusterIP", "?")
    # iptables-nft's IPv6 DNAT lists in nft as an xt target without its address: ask ip6tables-nft-save too.
    nft = "".join(c.in_pod(OPERATOR_NS, e.pod, *argv, check=False).stdout
                  for argv in (["nft", "list", "ruleset"], ["ip6tables-nft-save"]))
    legacy = "".join(c.in_pod(OPERATOR_NS, e.pod, exe, check=False).stdout
                     for exe in ("iptables-legacy-save", "ip6tables-legacy-save"))
    where = [name for name, text in (("nf_tables", nft), ("legacy iptables", legacy)) if svc_ip in text]
    say(f"[{variant}] DNAT to the Service's cluster IP {svc_ip} is in: {', '.join(where) or 'nowhere'}")
    if body:
        say(f"[{variant}] client fetched {url} through the tailnet: {body!r}, "
            f"{reached:.1f} s after the Service was created")
    else:
        say(f"[{variant}] client got nothing from {url} within {fetch_for:.0f} s")
    c.delete(f"/api/v1/namespaces/{ns}/services/web")
    c.wait_for(lambda: not c.list_items(f"/apis/apps/v1/namespaces/{OPERATOR_NS}/statefulsets", labels_of(ns, "web")),
               60, "the proxy's StatefulSet to go")
    return reached, where[0] if where else "nowhere"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=0, metavar="N",
                        help="then time ours vs upstream-nft N more times each, alternating (default 0)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        say("needs root (network namespaces, a kubelet, containerd)")
        return 2
    lack = missing()
    if lack:
        say(f"missing: {', '.join(lack)}: run scripts/build-go.sh and scripts/k8s-images.sh")
        return 2
    say("starting the lab: headscale + admin-API shim, etcd, kube-apiserver, controller-manager, scheduler, "
        "containerd, kubelet, kube-proxy (nftables), the operator, a tailnet client")
    results: dict[str, tuple[float | None, str]] = {}
    with Cluster() as c:
        say("lab up in " + ", ".join(f"{k} {v:.1f} s" for k, v in c.timings.items()))
        for proxy_class, what in VARIANTS:
            results[proxy_class] = run_variant(c, proxy_class, what)
        series: dict[str, list[float]] = {"ours": [], "upstream-nft": []}
        for i in range(args.repeat):
            for proxy_class in series:
                reached, _ = run_variant(c, proxy_class, f"timing run {i + 1}/{args.repeat}")
                if reached is not None:
                    series[proxy_class].append(reached)
        say("cleaning up (processes by pid, containers, mounts, cgroups, namespaces)")
    say("summary: Service created -> page fetched through the tailnet")
    for proxy_class, what in VARIANTS:
        reached, where = results[proxy_class]
        shown = f"{reached:.1f} s" if reached is not None else "no traffic"
        say(f"  {proxy_class:34} {shown:>10}   rules in {where:16} {what}")
    for proxy_class, values in series.items() if args.repeat else ():
        shown = ", ".join(f"{v:.1f}" for v in values)
        median = f"{statistics.median(values):.1f} s" if values else "n/a"
        say(f"  {proxy_class:16} median {median} of {len(values)}/{args.repeat} runs: {shown}")
    ours = all(results[v][0] is not None for v in ("ours", f"ours-{NO_LEGACY_XTABLES}", f"ours {IPV6}"))
    return 0 if ours else 1


if __name__ == "__main__":
    sys.exit(main())
