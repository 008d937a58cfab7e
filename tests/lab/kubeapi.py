"""A real Kubernetes API server for tests: etcd and kube-apiserver on 127.0.0.1, built by scripts/build-go.sh
at the versions pinned in versions.env. Standard library only (urllib, ssl, subprocess, the openssl CLI).

    with Etcd() as etcd, KubeAPI(etcd) as kube:
        ns = kube.create_namespace()
        kube.create_service_account(ns, "proxy")
        kube.create_role(ns, "proxy", proxy_rules("proxy-0"))
        kube.bind_role(ns, "proxy", role="proxy", service_account="proxy")
        env = kube.pod_files(root, ns, kube.token(ns, "proxy"))

What runs: etcd (no fsync, data in a temporary directory) and kube-apiserver serving HTTPS with a certificate
for 127.0.0.1 from a CA made at start, authorizing with RBAC, signing service-account tokens with a key pair
made at start. The admin is a client certificate in group system:masters. Several servers can share one etcd
(each has its own --etcd-prefix). No controller-manager runs: a deleted namespace stays Terminating (use a
fresh namespace per test), no namespace gets a default ServiceAccount, and nothing garbage-collects.
`close()` stops every process it started (by pid) and removes its temporary directory. With audit=True the
server also logs every request it answers (who, verb, URI, status; no bodies), and `requests_by(user)` reads
them back: the server's own count of what a client asked, whatever connection or code path it used.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.lab.ports import free_port
from tests.lab.tailnet import pinned

HOST = "127.0.0.1"
ISSUER = "https://kubernetes.default.svc.cluster.local"  # the issuer and audience real clusters use
SA_DIR = "var/run/secrets/kubernetes.io/serviceaccount"
START_TIMEOUT = 30.0

Rule = dict[str, list[str]]


def binaries() -> dict[str, str]:
    """Paths of etcd and kube-apiserver (built by scripts/build-go.sh)."""
    v = pinned()
    cache = Path(os.environ.get("CONTAINERBOOT_CACHE", "/var/cache/containerboot")) / "bin"
    return {"etcd": str(cache / f"etcd-{v['ETCD_VERSION']}" / "etcd"),
            "kube-apiserver": str(cache / f"kubernetes-{v['KUBERNETES_VERSION']}" / "kube-apiserver")}


def have_binaries() -> bool:
    return all(os.access(p, os.X_OK) for p in binaries().values())


def proxy_rules(secret_name: str) -> list[Rule]:
    """The Role rules the Tailscale operator gives a proxy whose state Secret is `secret_name`.

    From tailscale.com v1.102.5 (TAILSCALE_VERSION), cmd/k8s-operator/proxygroup_specs.go, pgRole(): the Role of
    a ProxyGroup's proxies, for one replica. Replica i of ProxyGroup pg keeps its state in Secret "pg-i"
    (pgStateSecretName, also the pod's name) and reads its config from "pg-i-config" (pgConfigSecretName); the
    operator names both of every replica in one rule and grants no create. list/watch on all Secrets is there
    for k8s-proxy (upstream's comment), events for the proxy's own events. See PROXIES_ROLE_RULES for the
    older one-proxy-per-StatefulSet Role, which is not limited to named Secrets.
    """
    return [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "patch", "update"],
         "resourceNames": [f"{secret_name}-config", secret_name]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch", "get"]},
    ]


# The Role "proxies" of the ServiceAccount "proxies" that the operator's per-Service/Ingress/Connector
# StatefulSets run as, from tailscale.com v1.102.5 cmd/k8s-operator/deploy/chart/templates/proxy-rbac.yaml (the
# same rules are in deploy/manifests/operator.yaml): every Secret in the namespace, including create.
PROXIES_ROLE_RULES: list[Rule] = [
    {"apiGroups": [""], "resources": ["secrets"],
     "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch", "get"]},
]


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_cert(d: Path, name: str, ca: str, subject: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext + "\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
                                   "basicConstraints=critical,CA:FALSE\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Process:
    """A server process with its output in a file; stopped by pid."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def failure(self, what: str) -> RuntimeError:
        state = f"exited with {self.proc.returncode}" if self.exited() else "still running"
        return RuntimeError(f"{what} ({state}); the last lines of its output:\n{_tail(self.log)}")

    def stop(self, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait(ready: Callable[[], bool], proc: _Process, what: str, timeout: float | None = None) -> None:
    timeout = START_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.exited():
            raise proc.failure(f"{what} did not start")
        if ready():
            return
        time.sleep(0.1)
    raise proc.failure(f"{what} not ready after {timeout:.0f} s")


class Etcd:
    """etcd on 127.0.0.1 (random ports, no fsync), its data in a temporary directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kubeapi-etcd-"))
        try:
            for attempt in range(3):  # a free port can be taken between free_port() and etcd's bind
                client, peer = free_port(), free_port()
                self.url = f"http://{HOST}:{client}"
                peer_url = f"http://{HOST}:{peer}"
                self.proc = _Process([
                    binaries()["etcd"], "--name", "lab", "--data-dir", str(self.dir / f"data{attempt}"),
                    "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                    "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                    "--initial-cluster", f"lab={peer_url}", "--unsafe-no-fsync", "--log-level", "warn",
                ], self.dir / f"etcd{attempt}.log")
                try:
                    _wait(self._healthy, self.proc, "etcd")
                    return
                except RuntimeError as e:
                    self.proc.stop(grace=1)
                    if "address already in use" not in str(e) or attempt == 2:
                        raise
        except BaseException:
            self.close()
            raise

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return bool(json.load(r).get("health") == "true")
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        if hasattr(self, "proc"):
            self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KubeAPI:
    """kube-apiserver on 127.0.0.1:<port> over `etcd` (its own etcd when None), with admin helpers.

    Attributes: url, port, ca_file (the CA of the serving certificate: a pod's ca.crt), dir (its files).
    """

    def __init__(self, etcd: Etcd | None = None, audit: bool = False) -> None:
        self.own_etcd = etcd is None
        self.dir = Path(tempfile.mkdtemp(prefix="kubeapi-"))
        self.proc: _Process | None = None
        self.audit_log: Path | None = self.dir / "audit.log" if audit else None
        try:
            self.etcd = etcd or Etcd()
            self._credentials()
            self._start()
        except BaseException:
            self.close()
            raise

    def _credentials(self) -> None:
        d = self.dir
        _make_ca(d, "ca")
        _make_cert(d, "serving", "ca", "/CN=kube-apiserver",
                   "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
                   "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth")
        _make_ca(d, "client-ca")
        _make_cert(d, "admin", "client-ca", "/O=system:masters/CN=lab-admin",
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth")
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=d)
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
        self.ca_file = d / "ca.crt"
        self._anon = ssl.create_default_context(cafile=str(self.ca_file))
        self._admin = ssl.create_default_context(cafile=str(self.ca_file))
        self._admin.load_cert_chain(str(d / "admin.crt"), str(d / "admin.key"))

    def _start(self) -> None:
        d = self.dir
        for attempt in range(3):  # a free port can be taken between free_port() and the server's bind
            self.port = free_port()
            self.url = f"https://{HOST}:{self.port}"
            self.proc = _Process([
                binaries()["kube-apiserver"],
                f"--etcd-servers={self.etcd.url}", f"--etcd-prefix=/registry-{uuid.uuid4().hex}",
                f"--bind-address={HOST}", f"--secure-port={self.port}", f"--advertise-address={HOST}",
                f"--tls-cert-file={d / 'serving.crt'}", f"--tls-private-key-file={d / 'serving.key'}",
                f"--client-ca-file={d / 'client-ca.crt'}",
                f"--service-account-issuer={ISSUER}", f"--api-audiences={ISSUER}",
                f"--service-account-key-file={d / 'sa.pub'}", f"--service-account-signing-key-file={d / 'sa.key'}",
                "--authorization-mode=RBAC", "--endpoint-reconciler-type=none",
                # Never routed (no kube-proxy); inside the lab's 198.18.0.0/15 rather than the default 10.0.0.0/24.
                "--service-cluster-ip-range=198.19.255.0/24",
                f"--cert-dir={d / 'certs'}", "--profiling=false", *self._audit_args(),
            ], d / f"kube-apiserver{attempt}.log")
            try:
                _wait(self._ready, self.proc, "kube-apiserver")
                return
            except RuntimeError as e:
                self.proc.stop(grace=1)
                if "address already in use" not in str(e) or attempt == 2:
                    raise

    def _audit_args(self) -> list[str]:
        """The server's own record of every request (audit.k8s.io, Metadata level: who, verb, URI, status;
        no bodies), one JSON line each once answered, for tests that count what a client asked."""
        if self.audit_log is None:
            return []
        policy = self.dir / "audit-policy.json"
        policy.write_text(json.dumps({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                                      "omitStages": ["RequestReceived", "ResponseStarted"],
                                      "rules": [{"level": "Metadata"}]}))
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-mode=blocking",
                "--audit-log-format=json"]

    def _ready(self) -> bool:
        try:
            status, _ = self.request("GET", "/readyz", timeout=2)
        except OSError:
            return False
        return status == 200

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self, lines: int = 30) -> str:
        """The last lines of the server's output."""
        return _tail(self.proc.log, lines) if self.proc else ""

    # -- requests ----------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                token: str | None = None, timeout: float = 30) -> tuple[int, Any]:
        """(status, decoded JSON body or text) of one request: as the admin, or with `token` as bearer.

        For PATCH pass content_type "application/merge-patch+json", "application/strategic-merge-patch+json" or
        "application/json-patch+json". Errors are returned as a status, not raised (network failures raise).
        """
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        ctx = self._anon if token is not None else self._admin
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
                return r.status, _decode(r.read())
        except urllib.error.HTTPError as e:
            with e:
                return e.code, _decode(e.read())

    def _ok(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
            ok: tuple[int, ...] = (200, 201)) -> Any:
        status, out = self.request(method, path, body, content_type)
        if status not in ok:
            raise RuntimeError(f"{method} {path} -> {status}: {out}")
        return out

    def version(self) -> str:
        """The server's gitVersion, e.g. v1.37.2."""
        return str(self._ok("GET", "/version")["gitVersion"])

    def requests_by(self, user: str) -> list[dict[str, Any]]:
        """Every request `user` made (e.g. system:serviceaccount:<ns>:<sa>), as the server's audit log has it:
        {"verb", "uri", "resource", "code"} in the order logged. Only for a server started with audit=True.
        A request is logged just after it is answered, so a count can lag its answer by a moment."""
        assert self.audit_log is not None, "start the server with audit=True"
        out = []
        try:
            text = self.audit_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line being written
            if (ev.get("user") or {}).get("username") == user and ev.get("stage") == "ResponseComplete":
                out.append({"verb": ev.get("verb"), "uri": ev.get("requestURI"),
                            "resource": (ev.get("objectRef") or {}).get("resource"),
                            "code": (ev.get("responseStatus") or {}).get("code")})
        return out

    # -- objects -----------------------------------------------------------------------------------------------

    def create_namespace(self, prefix: str = "t") -> str:
        """A new namespace with a unique name, returned."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self._ok("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        return name

    def create_service_account(self, ns: str, name: str) -> None:
        self._ok("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
                 {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})

    def create_role(self, ns: str, name: str, rules: list[Rule]) -> None:
        self._ok("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
                 {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
                  "rules": rules})

    def bind_role(self, ns: str, name: str, role: str, service_account: str, sa_namespace: str | None = None) -> None:
        """RoleBinding `name` in `ns` of Role `role` to ServiceAccount `service_account` (in `ns` by default)."""
        self._ok("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
                 {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
                  "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
                  "subjects": [{"kind": "ServiceAccount", "name": service_account,
                                "namespace": sa_namespace or ns}]})

    def token(self, ns: str, sa: str, seconds: int = 600, audiences: list[str] | None = None) -> str:
        """A token for ServiceAccount `sa` from the TokenRequest API (600 s is the shortest the server grants)."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audiences is not None:
            spec["audiences"] = audiences
        out = self._ok("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token",
                       {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return str(out["status"]["token"])

    def create_pod(self, ns: str, name: str, service_account: str) -> str:
        """A Pod (never scheduled: no scheduler or kubelet runs) run as `service_account`; its UID."""
        out = self._ok("POST", f"/api/v1/namespaces/{ns}/pods",
                       {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                        "spec": {"serviceAccountName": service_account,
                                 "containers": [{"name": "tailscale", "image": "tailscale/tailscale"}]}})
        return str(out["metadata"]["uid"])

    def events(self, ns: str, field_selector: str = "") -> list[dict[str, Any]]:
        """The core v1 Events in `ns`, e.g. with kubectl describe's selector
        "involvedObject.kind=Pod,involvedObject.name=<name>,involvedObject.uid=<uid>"."""
        query = f"?fieldSelector={urllib.parse.quote(field_selector)}" if field_selector else ""
        return list(self._ok("GET", f"/api/v1/namespaces/{ns}/events{query}")["items"])

    def get_secret(self, ns: str, name: str) -> dict[str, str] | None:
        """The Secret's data, decoded (bytes that are not UTF-8 as surrogate escapes), or None when absent."""
        status, out = self.request("GET", f"/api/v1/namespaces/{ns}/secrets/{name}")
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET secret {ns}/{name} -> {status}: {out}")
        return {k: base64.b64decode(v).decode("utf-8", "surrogateescape") for k, v in (out.get("data") or {}).items()}

    def create_secret(self, ns: str, name: str, data: dict[str, str] | None = None) -> None:
        self._ok("POST", f"/api/v1/namespaces/{ns}/secrets",
                 {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque",
                  "data": _encode(data or {})})

    def patch_secret(self, ns: str, name: str, data: dict[str, str | None]) -> None:
        """Merge `data` into the Secret's data; a None value removes that key."""
        self._ok("PATCH", f"/api/v1/namespaces/{ns}/secrets/{name}", {"data": _encode(data)},
                 "application/merge-patch+json")

    def delete_secret(self, ns: str, name: str) -> None:
        """Deletes the Secret; an absent one is fine."""
        self._ok("DELETE", f"/api/v1/namespaces/{ns}/secrets/{name}", ok=(200, 202, 404))

    def can_i(self, token: str, verb: str, resource: str, ns: str, name: str = "", group: str = "") -> bool:
        """Whether `token`'s holder may `verb` the resource: a SelfSubjectAccessReview made with that token."""
        attrs = {"namespace": ns, "verb": verb, "resource": resource, "group": group, "name": name}
        status, out = self.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                                   {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                                    "spec": {"resourceAttributes": attrs}}, token=token)
        if status != 201:
            raise RuntimeError(f"SelfSubjectAccessReview -> {status}: {out}")
        return bool(out["status"].get("allowed"))

    # -- a pod's view ------------------------------------------------------------------------------------------

    def pod_files(self, root: Path, ns: str, token: str) -> dict[str, str]:
        """Writes a pod's service-account files under `root` (token, ca.crt, namespace in
        root/var/run/secrets/kubernetes.io/serviceaccount) and returns the environment a pod has for the API."""
        d = root / SA_DIR
        d.mkdir(parents=True, exist_ok=True)
        (d / "token").write_text(token)
        (d / "ca.crt").write_bytes(self.ca_file.read_bytes())
        (d / "namespace").write_text(ns)
        port = str(self.port)
        return {"KUBERNETES_SERVICE_HOST": HOST, "KUBERNETES_SERVICE_PORT_HTTPS": port,
                "KUBERNETES_SERVICE_PORT": port}

    # -- teardown ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        if self.own_etcd and hasattr(self, "etcd"):
            self.etcd.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> KubeAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


def _encode(data: dict[str, str] | dict[str, str | None]) -> dict[str, str | None]:
    return {k: None if v is None else base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
            for k, v in data.items()}
