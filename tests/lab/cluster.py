"""A real single-node dual-stack Kubernetes cluster with the Tailscale operator, in network namespaces, for
tests/k8s and `make demo-k8s` (issues 12 and 20). Every piece is the real program, built by scripts/build-go.sh
and scripts/k8s-images.sh at the versions in versions.env; nothing is pulled from a registry.

  lan (bridge br0, 198.18.0.0/24 and fd18::/64; no route beyond it)
   |-- hs      198.18.0.2   headscale (HTTPS :443, DERP, STUN :3478) behind the admin-API shim on :80
   |           fd18::2      (tests/lab/adminapi.py): the operator's control URL and API base, http://198.18.0.2
   |-- node    198.18.0.10  the node: etcd, kube-apiserver (:6443), kube-controller-manager, kube-scheduler,
   |           fd18::10     containerd (a second one, Debian's, with its own root/state/socket), kubelet,
   |                        kube-proxy --proxy-mode=nftables, the operator; pods on the CNI bridge cni0
   |                        (198.18.64.0/24 and fd18:64::/64, routed on the LAN), Services in 198.18.96.0/24
   |                        and fd18:96::/112 (IPv4 the primary family)
   |-- client  198.18.0.3   a tailnet node (real tailscaled) that fetches through the operator's proxies
               fd18::3

The node is a network namespace only: its processes are started with `nsenter --net`, so they share the
machine's mount namespace, which the kubelet needs (its volume mounts must be seen by containerd and runc). The
kubelet's root is a shared bind mount of a directory of ours; cgroups go under a cgroupRoot of ours (this
machine is cgroup v1 without systemd: cgroupfs driver, failCgroupV1: false). Its iptables and nftables are
the namespace's own, so kube-proxy's nf_tables rules and the CNI plugins' rules never touch the machine's.
headscale serves HTTPS on :443 with its embedded DERP relay, which nodes use without checking its certificate
(InsecureForTests in the DERP map: pods cannot be given the lab's CA); the shim on :80 is plain HTTP. The pod
network is flat: pods keep their addresses on the LAN, and the LAN's nodes route it through the node. Admin
access from the test process (which stays in the machine's namespace) goes through sockets opened in the node's
namespace by a short-lived thread (setns).

One piece is a stand-in: a node kernel without usable legacy xtables (the seed's nf_tables-only node). This
machine's kernel has legacy iptables built in, so a pod's legacy rules work here; the ProxyClasses
"<image>-no-legacy-xtables" run the proxy container under a seccomp profile that fails legacy xtables' socket
options as such a kernel does (no_legacy_xtables_profile). The rest of the node stays what it is.

`Cluster.close()` stops every process it started (by pid), removes the pods' containers, every mount under
its directory, its cgroups (runc's mirror under the unified hierarchy too) and the namespaces.
"""

from __future__ import annotations

import base64
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.lab.kubeapi import _make_ca, _make_cert, _openssl, _Process, _tail
from tests.lab.netns import Lab, sh
from tests.lab.tailnet import Node, Tailnet, pinned
from tests.lab.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
CONTROL_IP = "198.18.0.2"
CONTROL_URL = f"http://{CONTROL_IP}"
NODE_IP = "198.18.0.10"
NODE_NAME = "lab-node"
CLIENT_IP = "198.18.0.3"
POD_CIDR = "198.18.64.0/24"
SERVICE_CIDR = "198.18.96.0/24"
KUBERNETES_SERVICE_IP = "198.18.96.1"
# IPv6: the LAN, the pods and the Services each get a range beside the IPv4 one (a ULA range, as in the netns lab).
LAN6 = {"hs": "fd18::2", "node": "fd18::10", "client": "fd18::3"}
NODE_IP6 = LAN6["node"]
POD_CIDR6 = "fd18:64::/64"
SERVICE_CIDR6 = "fd18:96::/112"
KUBERNETES_SERVICE_IP6 = "fd18:96::1"
API_PORT = 6443
TAILNET_DOMAIN = "lab.ts.net"  # the operator only accepts MagicDNS names of the form <tailnet>.ts.net
OPERATOR_NS = "tailscale"
IMAGES = {"ours": "containerboot-lab:ours", "upstream-legacy": "containerboot-lab:upstream-legacy",
          "upstream-nft": "containerboot-lab:upstream-nft"}
# The stand-in for a node kernel without legacy xtables (see no_legacy_xtables_profile): a seccomp profile in the
# kubelet's seccomp directory, and per image a ProxyClass "<image>-no-legacy-xtables" whose proxy runs under it.
NO_LEGACY_XTABLES = "no-legacy-xtables"
NO_LEGACY_XTABLES_PROFILE = f"{NO_LEGACY_XTABLES}.json"  # relative to <kubelet root>/seccomp, as Localhost wants
# And "ours-metrics": our image with the ProxyClass's metrics on (TS_ENABLE_METRICS, TS_LOCAL_ADDR_PORT=<pod IP>:9002).
METRICS_CLASS = "ours-metrics"
PROXY_CLASSES = {**{name: (image, False, False) for name, image in IMAGES.items()},
                 **{f"{name}-{NO_LEGACY_XTABLES}": (image, True, False) for name, image in IMAGES.items()},
                 METRICS_CLASS: (IMAGES["ours"], False, True)}
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

DEPLOY = "cmd/k8s-operator/deploy"


def cache() -> Path:
    return Path(os.environ.get("CONTAINERBOOT_CACHE", "/var/cache/containerboot"))


def binaries() -> dict[str, str]:
    """Paths of every program the cluster runs."""
    v = pinned()
    b = cache() / "bin"
    k8s = b / f"kubernetes-{v['KUBERNETES_VERSION']}"
    out = {c: str(k8s / c) for c in ("kube-apiserver", "kubelet", "kube-proxy", "kube-controller-manager",
                                     "kube-scheduler")}
    out["etcd"] = str(b / f"etcd-{v['ETCD_VERSION']}" / "etcd")
    out["k8s-operator"] = str(b / f"k8s-operator-{v['TAILSCALE_VERSION']}" / "k8s-operator")
    return out


def operator_deploy_dir() -> Path:
    return cache() / "go" / "mod" / f"tailscale.com@{pinned()['TAILSCALE_VERSION']}" / DEPLOY


def missing() -> list[str]:
    """What the lab needs and does not find (programs, images, manifests); empty when it can start."""
    out = [p for p in binaries().values() if not os.access(p, os.X_OK)]
    out += [p for p in ("/usr/bin/containerd", "/usr/bin/ctr", "/usr/sbin/runc", "/usr/lib/cni/bridge",
                        "/usr/bin/nsenter") if not os.access(p, os.X_OK)]
    out += [str(p) for p in (operator_deploy_dir() / "manifests" / "operator.yaml",) if not p.exists()]
    return out


def load_yaml(path: Path) -> list[dict[str, Any]]:
    """The documents of a YAML file. Debian's python3-yaml does the parsing, in the system Python, so the
    project's venv needs no YAML package for a test fixture."""
    code = "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)"
    out = sh("/usr/bin/python3", "-c", code, str(path)).stdout
    return list(json.loads(out))


# ---- the node namespace's sockets ----------------------------------------------------------------------------


def connect_in(netns: str, addr: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection made from inside network namespace `netns` (a /run/netns name). A socket keeps the
    namespace it was created in, so a thread enters the namespace, connects, and ends."""
    result: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result.append(socket.create_connection(addr, timeout=timeout))
        except BaseException as e:  # handed to the caller's thread
            result.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class _NetnsHTTPS(http.client.HTTPSConnection):
    def __init__(self, netns: str, host: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self.netns = netns
        self._ctx = context

    def connect(self) -> None:
        raw = connect_in(self.netns, (self.host, self.port), self.timeout or 30)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host)


# ---- the tailnet: headscale over HTTP without DERP, behind the admin-API shim --------------------------------

HEADSCALE_CONFIG = """
server_url: {url}
listen_addr: "[::]:443"
tls_cert_path: {d}/control.crt
tls_key_path: {d}/control.key
metrics_listen_addr: 127.0.0.1:9090
grpc_listen_addr: 127.0.0.1:50443
grpc_allow_insecure: false
noise:
  private_key_path: {d}/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: true
    region_id: 999
    region_code: lab
    region_name: Lab DERP (headscale's embedded server)
    stun_listen_addr: "[::]:3478"
    private_key_path: {d}/derp_server_private.key
    automatically_add_embedded_derp_region: false
    ipv4: {ip}
    ipv6: {ip6}
  urls: []
  paths: [{d}/derp.yaml]
  auto_update_enabled: false
disable_check_updates: true
node:
  expiry: 0
database:
  type: sqlite
  sqlite:
    path: {d}/db.sqlite
    write_ahead_log: true
log:
  level: info
policy:
  mode: file
  path: {d}/policy.json
dns:
  magic_dns: true
  base_domain: {domain}
  override_local_dns: false
  nameservers:
    global: []
unix_socket: {d}/headscale.sock
unix_socket_permission: "0770"
logtail:
  enabled: false
taildrop:
  enabled: false
"""


class K8sTailnet(Tailnet):
    """The lab tailnet with the control URL the operator can use: http://198.18.0.2 (the shim)."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.shim: subprocess.Popen[str] | None = None
        self.api_log = self.dir / "adminapi.log"

    def start_control(self) -> None:
        cfg = self.dir / "headscale.yaml"
        # headscale's certificate, for its DERP relay and the Noise-over-HTTPS fallback on 443 (tailscaled falls
        # back to it when it dialled control less than two minutes before, controlhttp's forceNoise443, and the
        # operator's tsnet does that on its first login here); only the operator, a process of ours, trusts it.
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-days", "3", "-subj", "/CN=containerboot k8s lab control", "-addext", f"subjectAltName=IP:{CONTROL_IP}",
           "-keyout", str(self.dir / "control.key"), "-out", str(self.dir / "control.crt"))
        cfg.write_text(HEADSCALE_CONFIG.format(url=CONTROL_URL, d=self.dir,
                                               domain=TAILNET_DOMAIN, ip=CONTROL_IP, ip6=LAN6["hs"]))
        # Everyone may reach everyone, tagged nodes included (with no policy, headscale gave the operator's tagged
        # proxies an empty packet filter: they could dial out but accepted nothing). The tags the operator asks
        # for need owners.
        (self.dir / "policy.json").write_text(json.dumps({
            "tagOwners": {"tag:k8s-operator": ["lab@"], "tag:k8s": ["tag:k8s-operator", "lab@"]},
            "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}))
        # headscale's embedded DERP relay, marked InsecureForTests so that nodes skip checking its certificate:
        # pods cannot be given the lab's CA. (A STUN-only map left tailscaled rebinding its sockets every second,
        # "last netcheck reported send error", and no WireGuard packet got through.)
        (self.dir / "derp.yaml").write_text(
            "regions:\n  999:\n    regionid: 999\n    regioncode: lab\n    regionname: Lab DERP\n    nodes:\n"
            f"      - {{name: 999a, regionid: 999, hostname: '{CONTROL_IP}', ipv4: '{CONTROL_IP}',"
            f" ipv6: '{LAN6['hs']}', derpport: 443,"
            " stunport: 3478, insecurefortests: true}\n")
        log = open(self.dir / "headscale.log", "w")  # noqa: SIM115 - closed with the process
        self.headscale = self.lab.spawn(self.hs, [self.bins["headscale"], "serve", "-c", str(cfg)],
                                        stdout=log, stderr=subprocess.STDOUT)
        ok = wait_for(lambda: self.lab.run(self.hs, "curl", "-sf", "--cacert", self.ca, "-o", "/dev/null",
                                           f"https://{CONTROL_IP}/health",
                                           check=False).returncode == 0, timeout=30, interval=0.1)
        if not ok:
            raise RuntimeError("headscale did not start:\n" + (self.dir / "headscale.log").read_text()[-3000:])
        self.hs_cli("users", "create", "lab")
        users = json.loads(self.hs_cli("users", "list", "-o", "json"))
        self.user_id = str(next(u["id"] for u in users if u["name"] == "lab"))
        self.shim = self.lab.spawn(self.hs, [
            "/usr/bin/python3", str(Path(__file__).with_name("adminapi.py")), CONTROL_IP, "80",
            f"{CONTROL_IP}:443", self.bins["headscale"], str(cfg), self.user_id, str(self.api_log)],
            stdout=subprocess.PIPE, stderr=open(self.dir / "adminapi.err", "w"))  # noqa: SIM115
        assert self.shim.stdout is not None
        if self.shim.stdout.readline().strip() != "ready":
            raise RuntimeError("admin-API shim did not start:\n" + (self.dir / "adminapi.err").read_text()[-2000:])

    def client(self, name: str, addr: str, *up_args: str, userspace: bool = False, ns: str = "") -> Node:
        """A tailnet node logged in through the shim (as the operator's proxies are); in namespace `ns` when
        given (attached to the LAN already), else in a new one."""
        ns = ns or self.attach(name, addr)
        node = Node(name, ns, addr, str(self.dir / f"{name}.sock"))
        state = self.dir / f"{name}-state"
        state.mkdir()
        log = open(self.dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        argv = [self.bins["tailscaled"], f"--socket={node.socket}", f"--statedir={state}",
                *(["--tun=userspace-networking"] if userspace else [f"--tun=ts-{name[:8]}"])]
        node.proc = self.lab.spawn(ns, self.private_run(ns, argv), env=self.tailscaled_env(), stdout=log,
                                   stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(node.socket), timeout=15, interval=0.1)
        self.cli(node, "up", f"--login-server={CONTROL_URL}", f"--authkey={self.authkey()}", f"--hostname={name}",
                 "--accept-dns=false", *up_args, timeout=60)
        self.nodes.append(node)
        return node

    def node_by_name(self, given_name: str) -> dict[str, Any] | None:
        nodes = json.loads(self.hs_cli("nodes", "list", "-o", "json") or "null") or []  # "null" when none
        return next((n for n in nodes if n.get("given_name") == given_name), None)


# ---- the cluster -----------------------------------------------------------------------------------------------


class Cluster:
    """The whole lab: tailnet, control plane, node, operator. `timings` holds how long each start step took."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}
        self.procs: dict[str, _Process] = {}
        self.lab = Lab("k")
        self.dir = Path(tempfile.mkdtemp(prefix="cbk8s", dir="/tmp"))
        self.cgroup = f"/cbk8s{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.kubelet_root = self.dir / "kubelet"
        self.sock = str(self.dir / "containerd.sock")
        self.tailnet: K8sTailnet | None = None
        self.client: Node | None = None
        self._cgroups_made: list[Path] = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- steps ----------------------------------------------------------------------------------------------

    def _mark(self, step: str, since: float) -> None:
        self.timings[step] = time.monotonic() - since

    def _start(self) -> None:
        t = time.monotonic()
        self.tailnet = K8sTailnet(self.lab)
        self.tailnet.start_control()
        self.node_ns = self.tailnet.attach("node", NODE_IP)
        # A flat pod network: pods keep their own addresses on the LAN (no masquerade) and the LAN's nodes route
        # the pod network through the node. With no DERP relay to pass "call me maybe", a tailnet peer must reach a
        # pod's own endpoint, and see its packets come from it (masqueraded, WireGuard from an unknown address
        # is dropped).
        self.client_ns = self.tailnet.attach("client", CLIENT_IP)
        for name, ns in (("hs", self.tailnet.hs), ("node", self.node_ns), ("client", self.client_ns)):
            self.lab.addr(ns, "eth0", f"{LAN6[name]}/64")
        for ns in (self.tailnet.hs, self.client_ns):
            self.lab.route(ns, POD_CIDR, NODE_IP)
            self.lab.route(ns, POD_CIDR6, NODE_IP6)
        self._mark("tailnet", t)
        t = time.monotonic()
        self._credentials()
        self._mark("credentials", t)
        t = time.monotonic()
        images = threading.Thread(target=self._containerd_and_images)
        images.start()
        try:
            self._etcd()
            self._apiserver()
        finally:
            images.join()
        if self._image_error:
            raise self._image_error
        self._mark("control plane + containerd + images", t)
        t = time.monotonic()
        self._controllers()
        self._kubelet()
        self._kube_proxy()
        self.wait_node_ready()
        self._mark("node Ready", t)
        t = time.monotonic()
        self._operator()
        self._mark("operator", t)
        t = time.monotonic()
        self.client = self.tailnet.client("client", CLIENT_IP, ns=self.client_ns)
        self._mark("tailnet client", t)
        self.timings["total"] = time.monotonic() - self.t0

    def rss_mib(self) -> float:
        """The resident memory of the lab's own processes (control plane, node, operator), now."""
        from tests.lab.procfs import figures

        total = 0
        for proc in self.procs.values():
            try:
                total += figures(proc.pid).rss_kib
            except OSError:
                continue
        return total / 1024

    def _nsenter(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.node_ns}", "--", *argv]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> _Process:
        proc = _EnvProcess(self._nsenter(argv), self.dir / f"{name}.log", env)
        self.procs[name] = proc
        return proc

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float = 60) -> None:
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.exited():
                raise proc.failure(f"{name} did not start")
            if ready():
                return
            time.sleep(0.1)
        raise proc.failure(f"{name} not ready after {timeout:.0f} s")

    def _credentials(self) -> None:
        d = self.dir
        _make_ca(d, "ca")
        _make_cert(d, "serving", "ca", "/CN=kube-apiserver",
                   f"subjectAltName=IP:{NODE_IP},IP:{NODE_IP6},IP:127.0.0.1,IP:{KUBERNETES_SERVICE_IP},"
                   f"IP:{KUBERNETES_SERVICE_IP6},DNS:localhost,"
                   "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
                   "DNS:kubernetes.default.svc.cluster.local\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth")
        _make_ca(d, "client-ca")
        client = "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth"
        _make_cert(d, "admin", "client-ca", "/O=system:masters/CN=lab-admin", client)
        _make_cert(d, "node", "client-ca", f"/O=system:nodes/CN=system:node:{NODE_NAME}", client)
        _make_cert(d, "proxy", "client-ca", "/CN=system:kube-proxy", client)
        _make_cert(d, "kcm", "client-ca", "/CN=system:kube-controller-manager", client)
        _make_cert(d, "scheduler", "client-ca", "/CN=system:kube-scheduler", client)
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=d)
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
        for who in ("admin", "node", "proxy", "kcm", "scheduler"):
            (d / f"{who}.kubeconfig").write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "lab",
                "clusters": [{"name": "lab", "cluster": {"server": f"https://{NODE_IP}:{API_PORT}",
                                                         "certificate-authority": str(d / "ca.crt")}}],
                "users": [{"name": who, "user": {"client-certificate": str(d / f"{who}.crt"),
                                                 "client-key": str(d / f"{who}.key")}}],
                "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": who}}]}))
        self._admin = ssl.create_default_context(cafile=str(d / "ca.crt"))
        self._admin.load_cert_chain(str(d / "admin.crt"), str(d / "admin.key"))

    def _etcd(self) -> None:
        # The node's own loopback: fixed ports cannot collide with anything outside the namespace.
        self._spawn("etcd", [binaries()["etcd"], "--name", "lab", "--data-dir", str(self.dir / "etcd"),
                             "--listen-client-urls", "http://127.0.0.1:2379",
                             "--advertise-client-urls", "http://127.0.0.1:2379",
                             "--listen-peer-urls", "http://127.0.0.1:2380",
                             "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                             "--initial-cluster", "lab=http://127.0.0.1:2380", "--unsafe-no-fsync",
                             "--log-level", "warn"])

    def _apiserver(self) -> None:
        d = self.dir
        self._spawn("kube-apiserver", [
            binaries()["kube-apiserver"], "--etcd-servers=http://127.0.0.1:2379",
            f"--bind-address={NODE_IP}", f"--secure-port={API_PORT}", f"--advertise-address={NODE_IP}",
            f"--tls-cert-file={d / 'serving.crt'}", f"--tls-private-key-file={d / 'serving.key'}",
            f"--client-ca-file={d / 'client-ca.crt'}",
            f"--kubelet-client-certificate={d / 'admin.crt'}", f"--kubelet-client-key={d / 'admin.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={d / 'sa.pub'}", f"--service-account-signing-key-file={d / 'sa.key'}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            f"--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}", f"--cert-dir={d / 'apiserver-certs'}",
            "--profiling=false"])
        self._wait("kube-apiserver", lambda: self._get_ok("/readyz"), timeout=90)

    def _get_ok(self, path: str) -> bool:
        try:
            return self.request("GET", path, timeout=3)[0] == 200
        except OSError:
            return False

    def _controllers(self) -> None:
        d = self.dir
        self._spawn("kube-controller-manager", [
            binaries()["kube-controller-manager"], f"--kubeconfig={d / 'kcm.kubeconfig'}",
            f"--authentication-kubeconfig={d / 'kcm.kubeconfig'}",
            f"--authorization-kubeconfig={d / 'kcm.kubeconfig'}",
            "--controllers=*", f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={d / 'ca.crt'}", f"--cluster-signing-cert-file={d / 'client-ca.crt'}",
            f"--cluster-signing-key-file={d / 'client-ca.key'}", "--use-service-account-credentials",
            "--leader-elect=false", f"--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}",
            "--bind-address=127.0.0.1", "--secure-port=10257", "--profiling=false"])
        self._spawn("kube-scheduler", [
            binaries()["kube-scheduler"], f"--kubeconfig={d / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={d / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={d / 'scheduler.kubeconfig'}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259", "--profiling=false"])

    # -- containerd -------------------------------------------------------------------------------------------

    _image_error: BaseException | None = None

    def _containerd_and_images(self) -> None:
        try:
            self._containerd()
            t = time.monotonic()
            images = cache() / "k8s-images"
            for name in ("pause", "ours", "upstream-legacy", "upstream-nft"):
                sh("ctr", "-a", self.sock, "-n", "k8s.io", "images", "import", str(images / f"{name}.tar"),
                   timeout=300)
            self.timings["image import"] = time.monotonic() - t
        except BaseException as e:  # raised by _start in its own thread
            self._image_error = e

    def _containerd(self) -> None:
        d = self.dir
        (d / "cni" / "net.d").mkdir(parents=True)
        # host-local keeps its leases in our directory; pods' addresses are routed on the LAN, not masqueraded.
        (d / "cni" / "net.d" / "10-lab.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "lab", "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}], [{"subnet": POD_CIDR6}]],
                          "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}], "dataDir": str(d / "cni" / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}}]}))
        pause = f"docker.io/containerboot-lab/pause:{pinned()['KUBERNETES_VERSION']}"
        # restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and runc fails every sandbox that asks
        # for a lower OOM score than its own ("can't get final child's PID from pipe: EOF").
        # netns_mounts_under_state_dir: pod network namespaces under our state dir, not /run/netns.
        (d / "containerd.toml").write_text(f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.tracing", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
""")
        self._spawn("containerd", ["/usr/bin/containerd", "--config", str(d / "containerd.toml")],
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        self._wait("containerd", lambda: sh("ctr", "-a", self.sock, "version", check=False,
                                            timeout=5).returncode == 0, timeout=30)

    # -- the node ---------------------------------------------------------------------------------------------

    def _kubelet(self) -> None:
        d = self.dir
        # Its root a shared mount point, so the mounts it makes for volumes propagate as Kubernetes expects.
        self.kubelet_root.mkdir()
        sh("mount", "--bind", str(self.kubelet_root), str(self.kubelet_root))
        sh("mount", "--make-rshared", str(self.kubelet_root))
        # The cgroupRoot must exist in every v1 hierarchy; cpuset's needs its cpus and mems filled in.
        for h in sorted(Path("/sys/fs/cgroup").iterdir()):
            if h.name == "unified" or not (h / "cgroup.procs").exists():
                continue
            g = h / self.cgroup.lstrip("/")
            g.mkdir(exist_ok=True)
            self._cgroups_made.append(g)
            if h.name == "cpuset":
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (g / f).write_text((h / f).read_text())
        (d / "pod-logs").mkdir()
        # The stand-in profile, where a Localhost seccompProfile is looked up (<root-dir>/seccomp/<name>).
        (self.kubelet_root / "seccomp").mkdir()
        (self.kubelet_root / "seccomp" / NO_LEGACY_XTABLES_PROFILE).write_text(
            json.dumps(no_legacy_xtables_profile(), indent=1))
        (d / "kubelet.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup, "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.sock}", "address": NODE_IP, "readOnlyPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(d / "client-ca.crt")}},
            "authorization": {"mode": "Webhook"}, "clusterDomain": "cluster.local", "resolvConf": "",
            "podLogsDir": str(d / "pod-logs"), "staticPodPath": "",
            # A shared, busy machine: never evict or garbage-collect the lab's pods and images.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "nodeStatusUpdateFrequency": "2s"}))
        self._spawn("kubelet", [
            binaries()["kubelet"], f"--config={d / 'kubelet.yaml'}", f"--kubeconfig={d / 'node.kubeconfig'}",
            f"--root-dir={self.kubelet_root}", f"--cert-dir={d / 'kubelet-certs'}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP},{NODE_IP6}"],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

    def _kube_proxy(self) -> None:
        d = self.dir
        (d / "kube-proxy.yaml").write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "nftables", "clientConnection": {"kubeconfig": str(d / "proxy.kubeconfig")},
            "hostnameOverride": NODE_NAME, "clusterCIDR": f"{POD_CIDR},{POD_CIDR6}",
            "healthzBindAddress": "127.0.0.1:10256", "metricsBindAddress": "127.0.0.1:10249",
            # conntrack sysctls are the machine's, not the namespace's: leave them alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s",
                          "udpTimeout": "0s", "udpStreamTimeout": "0s"},
            "nftables": {"syncPeriod": "30s", "minSyncPeriod": "0s"}}))
        self._spawn("kube-proxy", [binaries()["kube-proxy"], f"--config={d / 'kube-proxy.yaml'}"],
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

    def wait_node_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            status, node = self.request("GET", f"/api/v1/nodes/{NODE_NAME}")
            if status != 200:
                return False
            return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        self._wait("kubelet", ready, timeout=timeout)

    # -- the operator -------------------------------------------------------------------------------------------

    def _operator(self) -> None:
        deploy = operator_deploy_dir()
        # CRDs, namespace, RBAC and IngressClass from the pinned version's static manifest; its Deployment is
        # not applied: the operator runs on the node as a process, with an admin kubeconfig.
        for doc in load_yaml(deploy / "manifests" / "operator.yaml"):
            if doc["kind"] in ("Deployment", "Secret"):
                continue
            self.apply(doc)
        self.wait_for(lambda: all(self._crd_established(n) for n in ("proxyclasses", "connectors", "proxygroups")),
                      60, "CRDs established")
        self.wait_for(lambda: self.request("GET", f"/api/v1/namespaces/{OPERATOR_NS}/serviceaccounts/default")[0]
                      == 200, 60, "default ServiceAccount in the operator's namespace")
        # The default ProxyClass: the images are imported, never pulled (the operator's proxies ask Always), and
        # there is no cluster DNS, so proxies find the API server from the environment.
        for name, (image, standin, metrics) in PROXY_CLASSES.items():
            self.apply(proxy_class(name, image, no_legacy_xtables=standin, metrics=metrics))
        creds = self.dir / "oauth"
        creds.mkdir()
        (creds / "client_id").write_text("lab-client")
        (creds / "client_secret").write_text(uuid.uuid4().hex)
        # The operator runs as its Deployment's ServiceAccount would, with the in-cluster configuration: its
        # token, CA and namespace appear at the in-cluster path in a mount namespace of its own (a tmpfs on
        # /run), so the machine's /run/secrets never exists for anyone else.
        sa = self.dir / "operator-sa"
        sa.mkdir()
        token = self.ok("POST", f"/api/v1/namespaces/{OPERATOR_NS}/serviceaccounts/operator/token",
                        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                         "spec": {"expirationSeconds": 86400}})["status"]["token"]
        (sa / "token").write_text(token)
        shutil.copy(self.dir / "ca.crt", sa / "ca.crt")
        (sa / "namespace").write_text(OPERATOR_NS)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.dir), "TS_NO_LOGS_NO_SUPPORT": "true",
               "SSL_CERT_FILE": str(self.tailnet.dir / "control.crt") if self.tailnet else "",
               "KUBERNETES_SERVICE_HOST": NODE_IP, "KUBERNETES_SERVICE_PORT": str(API_PORT),
               "OPERATOR_NAMESPACE": OPERATOR_NS, "OPERATOR_SECRET": "operator",
               "OPERATOR_HOSTNAME": "tailscale-operator", "OPERATOR_INITIAL_TAGS": "tag:k8s-operator",
               "OPERATOR_LOGIN_SERVER": CONTROL_URL, "OPERATOR_LOGGING": "info",
               "OPERATOR_INGRESS_CLASS_NAME": "tailscale",
               "CLIENT_ID_FILE": str(creds / "client_id"), "CLIENT_SECRET_FILE": str(creds / "client_secret"),
               "PROXY_IMAGE": IMAGES["ours"], "PROXY_TAGS": "tag:k8s", "APISERVER_PROXY": "false",
               "PROXY_DEFAULT_CLASS": "ours", "POD_NAME": "operator-on-node", "POD_UID": str(uuid.uuid4()),
               "OPERATOR_SERVICE_ACCOUNT_NAME": "operator"}
        # No cluster DNS: the name its kube store asks for is in an /etc/hosts of its own, naming the
        # `kubernetes` Service's address (kube-proxy translates it in the node's namespace).
        (self.dir / "operator-hosts").write_text(f"127.0.0.1 localhost\n{KUBERNETES_SERVICE_IP} "
                                                 "kubernetes.default.svc kubernetes.default.svc.cluster.local\n")
        in_cluster = "/run/secrets/kubernetes.io/serviceaccount"
        self._spawn("operator", [
            "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            f"mount -t tmpfs tmpfs /run && mkdir -p {in_cluster} && cp {sa}/* {in_cluster}/ && "
            f'mount --bind {self.dir / "operator-hosts"} /etc/hosts && exec "$0"',
            binaries()["k8s-operator"]], env=env)
        self._wait("operator", lambda: self.tailnet is not None
                   and self.tailnet.node_by_name("tailscale-operator") is not None, timeout=90)
        self.wait_for(lambda: all(self._proxyclass_ready(n) for n in PROXY_CLASSES), 60, "ProxyClasses Ready")

    def _crd_established(self, plural: str) -> bool:
        status, crd = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                                          f"{plural}.tailscale.com")
        return status == 200 and any(c["type"] == "Established" and c["status"] == "True"
                                     for c in crd.get("status", {}).get("conditions", []))

    def _proxyclass_ready(self, name: str) -> bool:
        status, pc = self.request("GET", f"/apis/tailscale.com/v1alpha1/proxyclasses/{name}")
        return status == 200 and any(c["type"] == "ProxyClassReady" and c["status"] == "True"
                                     for c in pc.get("status", {}).get("conditions", []))

    # -- API access ---------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                timeout: float = 30) -> tuple[int, Any]:
        """(status, decoded JSON) of one request as the admin; errors are statuses, network failures raise."""
        conn = _NetnsHTTPS(self.node_ns, NODE_IP, API_PORT, self._admin, timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            raw = r.read()
            try:
                return r.status, json.loads(raw) if raw else None
            except ValueError:
                return r.status, raw.decode(errors="replace")
        finally:
            conn.close()

    def ok(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
           accept: tuple[int, ...] = (200, 201)) -> Any:
        status, out = self.request(method, path, body, content_type)
        if status not in accept:
            raise RuntimeError(f"{method} {path} -> {status}: {str(out)[:500]}")
        return out

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Creates `obj` (server-side apply, so a second apply updates it)."""
        path = resource_path(obj)
        name = obj["metadata"]["name"]
        out = self.ok("PATCH", f"{path}/{name}?fieldManager=lab&force=true", obj, "application/apply-patch+yaml")
        return dict(out)

    def delete(self, obj_path: str) -> None:
        self.ok("DELETE", obj_path, accept=(200, 202, 404))

    def get(self, path: str) -> dict[str, Any] | None:
        status, out = self.request("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {str(out)[:300]}")
        return dict(out)

    def secret_data(self, ns: str, name: str) -> dict[str, str]:
        s = self.get(f"/api/v1/namespaces/{ns}/secrets/{name}") or {}
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in (s.get("data") or {}).items()}

    def list_items(self, path: str, selector: str = "") -> list[dict[str, Any]]:
        q = f"?labelSelector={urllib.parse.quote(selector)}" if selector else ""
        return list(self.ok("GET", path + q).get("items") or [])

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
        """Polls `predicate` until truthy (tests/lab/wait.py); raises naming `what` when it times out."""
        value = wait_for(predicate, timeout, interval)
        if not value:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        return value

    # -- looking inside ---------------------------------------------------------------------------------------

    def log(self, name: str, lines: int = 40) -> str:
        proc = self.procs.get(name)
        return _tail(proc.log, lines) if proc else ""

    def pod_log(self, ns: str, pod: str, container: str, uid: str = "*") -> str:
        """A container's output as the kubelet stored it (every restart's file, oldest first), of every pod of
        that name the kubelet still keeps logs of, or only of the one with `uid`."""
        out = []
        for d in sorted((self.dir / "pod-logs").glob(f"{ns}_{pod}_{uid}")):
            for f in sorted((d / container).glob("*.log"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
                for line in f.read_text(errors="replace").splitlines():
                    parts = line.split(" ", 3)  # <time> <stream> <P|F> <text>
                    out.append(parts[3] if len(parts) == 4 else line)
        return "\n".join(out)

    def _containers(self) -> list[dict[str, Any]]:
        ids = sh("ctr", "-a", self.sock, "-n", "k8s.io", "containers", "ls", "-q", check=False).stdout.split()
        out = []
        for cid in ids:
            info = sh("ctr", "-a", self.sock, "-n", "k8s.io", "containers", "info", cid, check=False).stdout
            if info:
                out.append(json.loads(info))
        return out

    def pod_netns(self, ns: str, pod: str) -> str:
        """The path of the pod's network namespace (from its sandbox container's spec)."""
        for c in self._containers():
            labels = c.get("Labels") or {}
            if (labels.get("io.cri-containerd.kind") == "sandbox" and labels.get("io.kubernetes.pod.name") == pod
                    and labels.get("io.kubernetes.pod.namespace") == ns):
                spec = c.get("Spec") or {}
                for n in spec.get("linux", {}).get("namespaces", []):
                    if n.get("type") == "network" and n.get("path"):
                        return str(n["path"])
        raise LookupError(f"no sandbox for pod {ns}/{pod}")

    def in_pod(self, ns: str, pod: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`argv` (a program of this machine) in the pod's network namespace."""
        return sh("nsenter", f"--net={self.pod_netns(ns, pod)}", "--", *argv, check=check)

    def container_id(self, ns: str, pod: str, container: str) -> str:
        """The id of the running container `container` of pod `ns`/`pod` (the newest start, after restarts)."""
        running = {line.split()[0] for line in sh("ctr", "-a", self.sock, "-n", "k8s.io", "tasks", "ls",
                                                  check=False).stdout.splitlines()[1:]
                   if line.split()[-1:] == ["RUNNING"]}
        for c in self._containers():
            labels = c.get("Labels") or {}
            if (labels.get("io.cri-containerd.kind") == "container" and c.get("ID") in running
                    and labels.get("io.kubernetes.pod.name") == pod
                    and labels.get("io.kubernetes.pod.namespace") == ns
                    and labels.get("io.kubernetes.container.name") == container):
                return str(c["ID"])
        raise LookupError(f"no running container {container} in pod {ns}/{pod}")

    def exec_in(self, ns: str, pod: str, container: str, *argv: str,
                timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`argv` (a program of the container's image) run inside the container, as `kubectl exec` would: runc
        exec, so under the container's own capabilities and seccomp profile. Not checked: the caller reads the
        return code."""
        cid = self.container_id(ns, pod, container)
        return sh("ctr", "-a", self.sock, "-n", "k8s.io", "tasks", "exec", "--exec-id", f"lab-{uuid.uuid4().hex[:8]}",
                  cid, *argv, check=False, timeout=timeout)

    # -- teardown -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        for name in ("operator", "kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager"):
            if name in self.procs:
                self.procs[name].stop(grace=5)
        if "containerd" in self.procs:
            self._remove_containers()
            self.procs["containerd"].stop(grace=10)
            self._kill_shims()
        for name in ("kube-apiserver", "etcd"):
            if name in self.procs:
                self.procs[name].stop(grace=5)
        self._unmount_all()
        self._remove_cgroups()
        if self.tailnet is not None:
            self.tailnet.close()
        else:
            self.lab.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_containers(self) -> None:
        ctr = ["ctr", "-a", self.sock, "-n", "k8s.io"]
        tasks = sh(*ctr, "tasks", "ls", "-q", check=False, timeout=20).stdout.split()
        for t in tasks:
            sh(*ctr, "tasks", "kill", "-s", "SIGKILL", t, check=False, timeout=20)
        for t in tasks:
            wait_for(lambda t=t: sh(*ctr, "tasks", "delete", t, check=False, timeout=20).returncode == 0  # type: ignore[misc]
                     or t not in sh(*ctr, "tasks", "ls", "-q", check=False, timeout=20).stdout.split(), timeout=10,
                     interval=0.1)

    def _kill_shims(self) -> None:
        """The runc shims outlive containerd by design; ours are those started with our socket's address."""
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and self.sock.encode() in argv:
                try:
                    os.kill(int(p.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _unmount_all(self) -> None:
        """Every mount under our directory (kubelet volumes, container roots, sandbox namespaces), deepest
        first; then the kubelet root's own bind mount."""
        prefix = str(self.dir) + "/"
        for _ in range(5):
            targets = [line for line in sh("findmnt", "-rn", "-o", "TARGET", check=False).stdout.splitlines()
                       if (line + "/").startswith(prefix)]
            if not targets:
                return
            for t in sorted(targets, key=lambda s: s.count("/"), reverse=True):
                if sh("umount", t, check=False).returncode != 0:
                    sh("umount", "-l", t, check=False)

    def _remove_cgroups(self) -> None:
        roots = [Path("/sys/fs/cgroup") / h.name / self.cgroup.lstrip("/")
                 for h in Path("/sys/fs/cgroup").iterdir()]
        for root in roots:
            if not root.is_dir():
                continue
            dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            for g in [*dirs, root]:
                wait_for(lambda g=g: _rmdir(g), timeout=5, interval=0.1)  # type: ignore[misc]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EnvProcess(_Process):
    """kubeapi's _Process with an environment of its own (None: ours)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)


def _rmdir(p: Path) -> bool:
    try:
        p.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# ---- objects -----------------------------------------------------------------------------------------------------

_CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "IngressClass",
                   "ProxyClass", "Connector", "ProxyGroup", "DNSConfig", "Recorder", "ProxyGroupPolicy",
                   "PeerRelay", "Tailnet", "Node"}
_PLURAL = {"Ingress": "ingresses", "IngressClass": "ingressclasses", "ProxyClass": "proxyclasses",
           "ProxyGroupPolicy": "proxygrouppolicies"}


def resource_path(obj: dict[str, Any]) -> str:
    """The collection URL of `obj` (from its apiVersion, kind and namespace)."""
    api = obj["apiVersion"]
    kind = obj["kind"]
    base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    plural = _PLURAL.get(kind, kind.lower() + "s")
    if kind in _CLUSTER_SCOPED:
        return f"{base}/{plural}"
    ns = obj["metadata"].get("namespace", "default")
    return f"{base}/namespaces/{ns}/{plural}"


def proxy_class(name: str, image: str, no_legacy_xtables: bool = False, metrics: bool = False) -> dict[str, Any]:
    """A ProxyClass running `image` for the proxy and its sysctl init container, never pulled, finding the API
    server from the environment (no cluster DNS here), uploading no logs. With `no_legacy_xtables` the proxy
    container runs on the stand-in for a node without legacy xtables: under the seccomp profile
    NO_LEGACY_XTABLES_PROFILE, which needs it unprivileged (containerd applies no seccomp profile to a privileged
    container), with NET_ADMIN and NET_RAW added (containerd's default capabilities hold NET_RAW and MKNOD
    already; its default device rules allow /dev/net/tun, which containerboot creates with mknod). The sysctl init
    container stays privileged: it writes /proc/sys, which an unprivileged container sees read-only."""
    pull = {"image": image, "imagePullPolicy": "IfNotPresent"}
    container: dict[str, Any] = {**pull, "env": [
        {"name": "TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV", "value": "true"},
        # No log uploads: tailscaled would otherwise keep trying log.tailscale.com (the lab has no
        # route out, so nothing leaves, but the proxies' logs fill with it).
        {"name": "TS_NO_LOGS_NO_SUPPORT", "value": "true"}]}
    if no_legacy_xtables:
        container["securityContext"] = {
            "privileged": False, "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "Localhost", "localhostProfile": NO_LEGACY_XTABLES_PROFILE}}
    spec: dict[str, Any] = {"statefulSet": {"pod": {"tailscaleContainer": container, "tailscaleInitContainer": pull}}}
    if metrics:
        spec["metrics"] = {"enable": True}
    return {"apiVersion": "tailscale.com/v1alpha1", "kind": "ProxyClass", "metadata": {"name": name}, "spec": spec}


# Socket option levels and the legacy xtables option numbers (linux/netfilter_ipv4/ip_tables.h, ip6_tables.h):
# IPT_SO_SET_REPLACE = IPT_SO_GET_INFO = IPT_BASE_CTL = 64, IPT_SO_SET_ADD_COUNTERS = IPT_SO_GET_ENTRIES = 65;
# the IP6T_ ones are the same numbers at level SOL_IPV6. No other IP or IPv6 option has these numbers.
SOL_IP, SOL_IPV6 = 0, 41
XTABLES_OPTNAMES = (64, 65)
ENOPROTOOPT = 92


def no_legacy_xtables_profile() -> dict[str, Any]:
    """The stand-in for a node kernel without usable legacy xtables (an nf_tables-only node, ip_tables neither
    built in nor loaded, the seed's node as we read it); this machine's kernel has them built in
    (CONFIG_IP_NF_IPTABLES=y), so the real thing cannot be had here. A seccomp profile (the OCI/Docker format
    the kubelet hands containerd for a Localhost profile) under which getsockopt/setsockopt of the legacy
    xtables options (level SOL_IP or SOL_IPV6, option 64 or 65: how iptables-legacy reads and replaces a table)
    fail with ENOPROTOOPT, the error such a kernel gives (no module registered those options); every other
    system call is allowed, nf_tables' netlink included. Everything else on the node stays real."""
    rules = [{"names": ["getsockopt", "setsockopt"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOPROTOOPT,
              "args": [{"index": 1, "value": level, "op": "SCMP_CMP_EQ"},
                       {"index": 2, "value": optname, "op": "SCMP_CMP_EQ"}],
              "comment": f"legacy xtables option {optname} at level {level}: ENOPROTOOPT, as without ip_tables"}
             for level in (SOL_IP, SOL_IPV6) for optname in XTABLES_OPTNAMES]
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}  # no architectures: the native one
