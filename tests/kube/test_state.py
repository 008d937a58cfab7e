"""The state Secret against a real kube-apiserver: containerboot runs with the fake tailscaled/LocalAPI
(upstream's harness) and a service account with exactly the operator's rights, and every key is read back
from the API server. Upstream's Go containerboot runs the same scenarios as the reference."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable

import pytest

from containerboot.kube import client as kube
from containerboot.settings import CAPABILITY_VERSION
from tests.lab.fakes import SECRET, Root, Run, kubelet_publish, netmap, peer, state, temp_root
from tests.lab.kubeapi import PROXIES_ROLE_RULES, KubeAPI, Rule
from tests.lab.kubepod import SECRET_NAME, Pod, make_pod, upstream
from tests.lab.wait import wait_for

pytestmark = pytest.mark.kube

PROXY = {"TS_USERSPACE": "false", "TS_DEST_IP": "10.0.0.9", "TS_AUTHKEY": SECRET}


def test_proxy_writes_each_key_at_its_moment(pod: Pod, start: Callable[..., Run]) -> None:
    # What a previous Pod left: stale status fields go, device identity stays for the operator.
    pod.api.patch_secret(pod.ns, SECRET_NAME, {"https_endpoint": "old.ts.net", "egress-services": "{}",
                                               "ingress-config.json": "{}", "device_id": "oldID",
                                               "device_fqdn": "old.ts.net.", "pod_uid": "uid-0"})
    # The egress target is not in the netmap yet: the device ID is stored, nothing else.
    pod.root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(pod, TS_USERSPACE="false", TS_TAILNET_TARGET_FQDN="web.test.ts.net", TS_AUTHKEY=SECRET)
    pod.wait_key("device_id", "myID")
    data = pod.secret() or {}
    assert data["tailscale_capver"] == str(CAPABILITY_VERSION) and data["pod_uid"] == "uid-1"
    assert not {"https_endpoint", "egress-services", "ingress-config.json"} & set(data)
    assert data["device_fqdn"] == "old.ts.net.", "device_fqdn must wait until the rules are live"
    run.wait_contains('could not find Tailscale node "web.test.ts.net."')
    assert "Startup complete, waiting for shutdown signal" not in run.output
    # The target appears: rules go in, then name and addresses, then startup is complete.
    pod.root.api.notify(netmap(["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
                               peers=[peer(7, "web.test.ts.net.", "100.64.0.7")]))
    run.wait_log("Startup complete, waiting for shutdown signal")
    data = pod.secret() or {}
    assert data["device_fqdn"] == "test-node.test.ts.net."
    assert json.loads(data["device_ips"]) == ["100.64.0.1", "fd7a:115c:a1e0::1"]
    lines = run.output.splitlines()
    assert next(i for i, ln in enumerate(lines) if "rules live in" in ln) < \
        next(i for i, ln in enumerate(lines) if ln.endswith("Startup complete, waiting for shutdown signal"))
    # An address change is written again.
    pod.root.api.notify(netmap(["100.64.0.2/32"], peers=[peer(7, "web.test.ts.net.", "100.64.0.7")]))
    pod.wait_key("device_ips", '["100.64.0.2"]')


def test_restart_of_the_pod_writes_the_new_uid(pod: Pod, start: Callable[..., Run]) -> None:
    pod.root.api.notify(netmap(["100.64.0.1/32"]))
    first = start(pod, **PROXY)
    first.wait_log("Startup complete, waiting for shutdown signal")
    assert first.stop() == 0
    pod.env["POD_UID"] = "uid-2"
    second = start(pod, **PROXY)
    second.wait_log("Startup complete, waiting for shutdown signal")
    data = pod.secret() or {}
    assert data["pod_uid"] == "uid-2" and data["device_id"] == "myID"
    assert data["device_fqdn"] == "test-node.test.ts.net."


def test_empty_kube_secret_writes_nothing(pod: Pod, start: Callable[..., Run]) -> None:
    pod.root.api.notify(netmap(["100.64.0.1/32"]))
    before = pod.api.request("GET", f"/api/v1/namespaces/{pod.ns}/secrets/{SECRET_NAME}")[1]
    run = start(pod, **{**PROXY, "TS_KUBE_SECRET": ""})
    run.wait_log("Startup complete, waiting for shutdown signal")
    after = pod.api.request("GET", f"/api/v1/namespaces/{pod.ns}/secrets/{SECRET_NAME}")[1]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert "--state=mem:" in pod.root.args()[0]


def test_auth_once_uses_the_secrets_key_then_deletes_it(pod: Pod, start: Callable[..., Run]) -> None:
    pod.api.patch_secret(pod.ns, SECRET_NAME, {"authkey": SECRET})
    pod.root.api.notify(state("NeedsLogin"))
    run = start(pod, TS_AUTH_ONCE="true")
    assert wait_for(lambda: any(" up " in a for a in pod.root.args()), 10), run.output
    pod.root.api.notify(netmap(["100.64.0.1/32"]))
    run.wait_log("Deleting authkey from Kubernetes Secret")
    run.wait_log("Startup complete, waiting for shutdown signal")
    assert "authkey" not in (pod.secret() or {})
    run.wait_log("No authkey found in state Secret and TS_AUTHKEY not provided, login will be interactive if needed.")
    assert any("--state=kube:ts-proxy-0" in a for a in pod.root.args())


def test_serve_config_writes_https_endpoint(pod: Pod, start: Callable[..., Run]) -> None:
    pod.root.api.notify(netmap(["100.64.0.1/32"], cert_domains=["test-node.test.ts.net"]))
    run = start(pod, TS_SERVE_CONFIG=f"{pod.root.d}/etc/tailscaled/serve-config.json", TS_AUTHKEY=SECRET)
    run.wait_log("Startup complete, waiting for shutdown signal")
    pod.wait_key("https_endpoint", "test-node.test.ts.net")


def test_shutdown_waits_for_consistent_state(pod: Pod, start: Callable[..., Run]) -> None:
    pod.root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(pod, **PROXY)
    run.wait_log("Startup complete, waiting for shutdown signal")
    # tailscaled is half way through writing its login state.
    pod.api.patch_secret(pod.ns, SECRET_NAME, {"_machinekey": "m", "_current-profile": "profile-1"})
    run.proc.send_signal(signal.SIGTERM)
    run.wait_log(f'Waiting for tailscaled to finish writing state to Secret "{SECRET_NAME}"')
    time.sleep(1)
    assert "Sending SIGTERM to tailscaled" not in run.output
    pod.api.patch_secret(pod.ns, SECRET_NAME, {"_profiles": "{}", "profile-1": "{}"})
    assert run.wait_exit(10) == 0
    lines = run.output.splitlines()
    assert [ln.split(" ", 3)[3] for ln in lines if "consistent state" in ln or "Sending SIGTERM" in ln] == \
        ["Checking for consistent state", "Sending SIGTERM to tailscaled"]


# ---- permissions ----------------------------------------------------------------------------------------


def only(*verbs: str, create: bool = False) -> list[Rule]:
    rules: list[Rule] = [{"apiGroups": [""], "resources": ["secrets"], "verbs": list(verbs),
                          "resourceNames": [SECRET_NAME]}]
    if create:
        rules.append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]})
    return rules


@pytest.mark.parametrize(("verbs", "message"), [
    (("update", "patch"), f'missing get permission on secret "{SECRET_NAME}"'),
    (("get", "patch"), f'missing update permission on secret "{SECRET_NAME}"'),
    (("patch",), f'missing get permission on secret "{SECRET_NAME}"; missing update permission on secret '
                 f'"{SECRET_NAME}"'),
])
def test_missing_rights_exit_1_naming_them(kubeapi: KubeAPI, kns: str, root: Root, start: Callable[..., Run],
                                          verbs: tuple[str, ...], message: str) -> None:
    p = make_pod(kubeapi, kns, root, only(*verbs), secret={})
    run = start(p, **PROXY)
    assert run.wait_exit(15) == 1
    run.wait_log("error setting up for running on Kubernetes: some Kubernetes permissions are missing, please "
                 f"check your RBAC configuration: {message}")
    assert not root.args(), "tailscaled must not start"


def test_missing_secret_without_create(kubeapi: KubeAPI, kns: str, root: Root, start: Callable[..., Run]) -> None:
    p = make_pod(kubeapi, kns, root, only("get", "update", "patch"), secret=None)
    run = start(p, **PROXY)
    assert run.wait_exit(15) == 1
    run.wait_contains(f"tailscale state Secret {SECRET_NAME} does not exist and we don't have permissions to "
                      "create it. If you intend to store tailscale state elsewhere than a Kubernetes Secret, you can "
                      "explicitly set TS_KUBE_SECRET env var to an empty string.")


def test_no_patch_right_writes_nothing(kubeapi: KubeAPI, kns: str, root: Root, start: Callable[..., Run]) -> None:
    p = make_pod(kubeapi, kns, root, only("get", "update"), secret={"keep": "me"})
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(p, **PROXY)
    run.wait_log("Startup complete, waiting for shutdown signal")
    assert p.secret() == {"keep": "me"}
    assert f"--state=kube:{SECRET_NAME}" in root.args()[0]


# ---- bad input and a misbehaving API server -------------------------------------------------------------------


def test_authkey_in_secret_that_is_not_a_token(pod: Pod, start: Callable[..., Run]) -> None:
    pod.api.patch_secret(pod.ns, SECRET_NAME, {"authkey": "tskey-auth-k1\nrm -rf /"})
    run = start(pod, TS_USERSPACE="true")
    assert run.wait_exit(15) == 1
    errors = [ln for ln in run.lines if "authkey in Secret" in ln]
    assert len(errors) == 1 and "is not one printable token" in errors[0] and "rm -rf" not in run.output
    assert "Traceback" not in run.output


def test_expired_token_is_one_line(pod: Pod, start: Callable[..., Run]) -> None:
    (pod.root.d / "var/run/secrets/kubernetes.io/serviceaccount/token").write_text("expired-or-forged")
    run = start(pod, **PROXY)
    assert run.wait_exit(15) == 1
    line = run.wait_contains("error setting up for running on Kubernetes")
    assert "Unauthorized" in line and "Traceback" not in run.output and "expired-or-forged" not in run.output


def test_token_is_read_again_after_401(pod: Pod, start: Callable[..., Run]) -> None:
    # The kubelet rotates the projected token; the first read gets a stale one, the retry the new one.
    token_file = pod.root.d / "var/run/secrets/kubernetes.io/serviceaccount/token"
    good = token_file.read_text()
    token_file.write_text("stale")
    client = kube.Client(str(token_file.parent), "127.0.0.1", pod.api.port)
    assert client.token() == "stale"
    token_file.write_text(good)
    assert client.get_secret(SECRET_NAME) == {}
    client.close()


def test_reissue_asks_the_operator_and_exits_0_on_a_new_key(pod: Pod, start: Callable[..., Run]) -> None:
    cfg = pod.root.d / "cfg"
    cfg.mkdir()
    kubelet_publish(cfg, {"cap-95.hujson": '{"Version":"alpha0","AuthKey":"tskey-old"}'}, 1)
    pod.api.patch_secret(pod.ns, SECRET_NAME, {"device_id": "oldID", "_current-profile": "profile-9",
                                               "profile-9": "{}", "_profiles": "{}", "_machinekey": "m"})
    pod.root.api.notify(state("NeedsLogin"))
    run = start(pod, TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR=str(cfg))
    run.wait_log("Auth key missing or invalid (NeedsLogin state), disconnecting from control and requesting new "
                 "key from operator", timeout=10)
    pod.wait_key("reissue_authkey", "tskey-old")
    assert pod.root.api.posted("/localapi/v0/disconnect-control")
    run.wait_log("Waiting for operator to provide new auth key (max wait: 10m0s)")
    run.wait_log("auth key reissue: watching for config changes via fsnotify")
    kubelet_publish(cfg, {"cap-95.hujson": '{"Version":"alpha0","AuthKey":"tskey-new"}'}, 2)
    assert run.wait_exit(10) == 0
    run.wait_contains("New auth key received from operator after ")
    run.wait_log("Successfully received new auth key, restarting to apply configuration")
    data = pod.secret() or {}
    assert not {"reissue_authkey", "device_id", "_current-profile", "_profiles", "_machinekey", "profile-9"} & set(data)
    # The restart with the new key: the reset keeps nothing stale and the node starts normally.
    pod.root.api.notify(netmap(["100.64.0.1/32"]))
    again = start(pod, TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR=str(cfg))
    again.wait_log("Startup complete, waiting for shutdown signal")
    pod.wait_key("device_id", "myID")


# ---- the reference: upstream's Go containerboot on the same server ---------------------------------------------


def test_secret_matches_upstreams(kubeapi: KubeAPI) -> None:
    results: dict[str, dict[str, str]] = {}
    for who in ("upstream", "ours"):
        with temp_root() as r:
            p = make_pod(kubeapi, kubeapi.create_namespace(), r, PROXIES_ROLE_RULES,
                         secret={"device_id": "stale", "https_endpoint": "x"}, name=f"ts-{who}")
            r.api.notify(netmap(["100.64.0.1", "fd7a:115c:a1e0::1"]))  # ipnstate's form: no prefix length
            run = Run(r.env(**p.env, **PROXY), argv=[upstream()] if who == "upstream" else None)
            try:
                run.wait_log("Startup complete, waiting for shutdown signal", timeout=15)
                results[who] = p.secret(f"ts-{who}") or {}
            finally:
                run.stop()
    assert results["ours"] == results["upstream"], results
    assert {"device_id", "device_fqdn", "device_ips", "tailscale_capver", "pod_uid"} <= set(results["ours"])


class BadServer:
    """An HTTPS server with the API server's certificate that answers every request with 500 (a k8s Status),
    or accepts and never answers. The real server cannot be made to fail like this, so this stands in."""

    def __init__(self, api: KubeAPI, mode: str) -> None:
        self.mode, self.requests = mode, 0
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(str(api.dir / "serving.crt"), str(api.dir / "serving.key"))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "hang":
                self.held.append(conn)  # never read, never answered
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            with self.tls.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(5)
                while tls.recv(65536).find(b"\r\n\r\n") < 0:
                    pass
                self.requests += 1
                body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500,
                                   "message": "etcdserver: request timed out"}).encode()
                tls.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.mark.parametrize("mode", ["500", "hang"])
def test_failing_api_server_is_one_line_with_bounded_retries(pod: Pod, start: Callable[..., Run], mode: str) -> None:
    bad = BadServer(pod.api, mode)
    try:
        began = time.monotonic()
        run = start(pod, **{**PROXY, "KUBERNETES_SERVICE_PORT_HTTPS": str(bad.port), "TS_BOOT_TIMEOUT": "12s"})
        assert run.wait_exit(40) == 1
        took = time.monotonic() - began
        errors = [ln for ln in run.lines if "error setting up for running on Kubernetes" in ln]
        assert len(errors) == 1 and "Traceback" not in run.output, run.output
        if mode == "500":
            # SSARs for get, update, patch, create at once (an error asking is logged, as upstream), then the
            # GET: 3 attempts each.
            assert "etcdserver: request timed out (gave up after 3 attempts)" in errors[0] and bad.requests == 15
            assert took < 15
        else:
            # Every attempt is cut at 5 s, and the whole setup by the boot deadline.
            assert "deadline passed" in errors[0] and "no answer from https://127.0.0.1" in run.output
            assert took < 14
        assert not pod.root.args(), "tailscaled must not start"
    finally:
        bad.close()


def test_sigterm_during_a_hung_api_call_exits_at_once(pod: Pod, start: Callable[..., Run]) -> None:
    bad = BadServer(pod.api, "hang")
    try:
        run = start(pod, **{**PROXY, "KUBERNETES_SERVICE_PORT_HTTPS": str(bad.port)})
        assert wait_for(lambda: bad.held, 10)
        time.sleep(0.5)
        began = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait_exit(10) == 0
        assert time.monotonic() - began < 1.0
        run.wait_log("Received SIGTERM, shutting down")
    finally:
        bad.close()


def test_the_proxy_says_its_backend_on_its_pod(pod: Pod, start: Callable[..., Run]) -> None:
    """The FirewallBackend Event on the proxy's own Pod, as `kubectl describe pod` lists it."""
    uid = pod.api.create_pod(pod.ns, "proxy-pod", "proxies")
    pod.env.update(POD_NAME="proxy-pod", POD_UID=uid)
    pod.root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(pod, **PROXY)
    run.wait_log("Startup complete, waiting for shutdown signal")
    selector = f"involvedObject.kind=Pod,involvedObject.name=proxy-pod,involvedObject.uid={uid}"
    events = wait_for(lambda: pod.api.events(pod.ns, selector), 10)
    assert [(e["reason"], e["type"], e["source"]["component"]) for e in events] == \
        [("FirewallBackend", "Normal", "containerboot")]
    summary = next(ln for ln in run.lines if "Configuration: mode proxy; firewall " in ln)
    assert events[0]["message"] and events[0]["message"].split(":")[0] in summary
