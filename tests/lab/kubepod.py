"""A Pod of the Tailscale operator's proxies, for a node of the tailnet lab (tests/lab/tailnet.py) and the
kube-apiserver lab (tests/lab/kubeapi.py): its service account, its files, and its way to the API server.

The API server listens on the machine's loopback; a node's namespace has its own loopback, so a socat
pair carries 127.0.0.1:<port> inside the node's namespace to the server through a unix socket (the
filesystem is shared, the network is not). Each node gets a private /run holding the service-account
files at the fixed path (/var/run is /run here), as a Pod's mount would, and reaches the server through
TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV=true with KUBERNETES_SERVICE_HOST/_PORT_HTTPS.

`Pod` is the same for containerboot in a test root with the fake tailscaled (tests/lab/fakes.py), on this
machine's network: `make_pod` gives it a service account with the rights it is given and its files, and
`upstream()` is upstream's Go containerboot, the reference the kube layer runs beside ours.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import need
from tests.lab.fakes import Root
from tests.lab.kubeapi import PROXIES_ROLE_RULES, KubeAPI, Rule
from tests.lab.tailnet import Tailnet
from tests.lab.tailnet import binaries as tailnet_binaries
from tests.lab.wait import wait_for

SA = "/run/secrets/kubernetes.io/serviceaccount"


class KubePod:
    """What a Pod of the operator's proxies has: a service account with the proxies' Role, its files,
    and a way to the API server from inside the node's namespace."""

    def __init__(self, net: Tailnet, api: KubeAPI, ns: str, node_ns: str, secret: str) -> None:
        self.net, self.api, self.ns, self.secret_name = net, api, ns, secret
        api.create_service_account(ns, "proxies")
        api.create_role(ns, "proxies", PROXIES_ROLE_RULES)
        api.bind_role(ns, "proxies", "proxies", "proxies")
        api.create_secret(ns, secret, {})
        self.dir = Path(tempfile.mkdtemp(prefix="cbsa", dir="/tmp"))
        self.env = api.pod_files(self.dir, ns, api.token(ns, "proxies"))
        self.files = self.dir / "var/run/secrets/kubernetes.io/serviceaccount"
        sock = self.dir / "api.sock"
        port = self.env["KUBERNETES_SERVICE_PORT_HTTPS"]
        self.relays = [
            subprocess.Popen(["socat", f"UNIX-LISTEN:{sock},fork,mode=600", f"TCP:127.0.0.1:{port}"]),
        ]
        wait_for(sock.exists, 5)
        # The in-cluster name answers too, as cluster DNS and the kubernetes Service would: clients that
        # ignore TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV for some calls (upstream's kubeclient checks
        # Events rights before it is told the address) reach the server instead of waiting on a DNS timeout.
        for listen in (port, "443"):
            self.relays.append(net.lab.spawn(node_ns, ["socat", f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr",
                                                       f"UNIX-CONNECT:{sock}"]))
        self.hosts = self.dir / "hosts"
        self.hosts.write_text("127.0.0.1 localhost\n::1 localhost\n127.0.0.1 kubernetes.default.svc\n")
        self.env.update(TS_KUBE_SECRET=secret, TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV="true",
                        POD_UID="uid-e2e", POD_NAME=secret)

    @property
    def setup(self) -> str:
        """Shell that lays the service-account files out where tailscaled and containerboot look, and
        /etc/hosts with the in-cluster name (inside the node's private mount namespace)."""
        return (f"mkdir -p {SA} && cp {shlex.quote(str(self.files))}/* {SA}/ && "
                f"mount --bind {shlex.quote(str(self.hosts))} /etc/hosts")

    def secret(self) -> dict[str, str]:
        return self.api.get_secret(self.ns, self.secret_name) or {}

    def close(self) -> None:
        for proc in self.relays:
            proc.terminate()
            proc.wait(5)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


# ---- a Pod for containerboot in a fake root ---------------------------------------------------------------

SECRET_NAME = "ts-proxy-0"


@dataclass
class Pod:
    api: KubeAPI
    ns: str
    root: Root
    env: dict[str, str]

    def secret(self, name: str = SECRET_NAME) -> dict[str, str] | None:
        return self.api.get_secret(self.ns, name)

    def wait_key(self, key: str, value: str | None = None, timeout: float = 10) -> str:
        def found() -> str | None:
            data = self.secret() or {}
            got = data.get(key)
            return got if got is not None and (value is None or got == value) else None
        got = wait_for(found, timeout, 0.1)
        assert got is not None, f"{key}={value!r} not in {self.secret()}"
        return str(got)


def make_pod(api: KubeAPI, ns: str, root: Root, rules: list[Rule], secret: dict[str, str] | None = None,
             name: str = SECRET_NAME) -> Pod:
    api.create_service_account(ns, "proxies")
    api.create_role(ns, "proxies", rules)
    api.bind_role(ns, "proxies", "proxies", "proxies")
    if secret is not None:
        api.create_secret(ns, name, secret)
    env = api.pod_files(root.d, ns, api.token(ns, "proxies"))
    env.update(TS_KUBE_SECRET=name, POD_UID="uid-1", POD_NAME=name)
    return Pod(api, ns, root, env)


def upstream() -> str:
    exe = tailnet_binaries()["containerboot-upstream"]
    need(os.access(exe, os.X_OK), "needs upstream's containerboot: run scripts/build-go.sh")
    return exe
