"""The kube-apiserver lab itself (tests/lab/kubeapi.py): what later tests rely on holds."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
from pathlib import Path

import pytest

from tests.lab.kubeapi import ISSUER, PROXIES_ROLE_RULES, KubeAPI, pinned, proxy_rules

pytestmark = pytest.mark.kube


def proxy_token(kube: KubeAPI, ns: str, sa: str = "proxy", secret: str = "proxy-0") -> str:
    kube.create_service_account(ns, sa)
    kube.create_role(ns, sa, proxy_rules(secret))
    kube.bind_role(ns, sa, role=sa, service_account=sa)
    return kube.token(ns, sa)


def test_version_is_the_pinned_one(kubeapi: KubeAPI) -> None:
    assert kubeapi.version() == pinned()["KUBERNETES_VERSION"]


def test_proxy_role_reaches_its_secret_and_no_other(kubeapi: KubeAPI, kns: str) -> None:
    kubeapi.create_secret(kns, "proxy-0", {"a": "1"})
    kubeapi.create_secret(kns, "other", {"b": "2"})
    tok = proxy_token(kubeapi, kns)
    base = f"/api/v1/namespaces/{kns}/secrets"

    status, body = kubeapi.request("GET", f"{base}/proxy-0", token=tok)
    assert status == 200 and base64.b64decode(body["data"]["a"]) == b"1"
    status, _ = kubeapi.request("PATCH", f"{base}/proxy-0", {"data": {"c": base64.b64encode(b"3").decode()}},
                                "application/merge-patch+json", token=tok)
    assert status == 200
    assert kubeapi.get_secret(kns, "proxy-0") == {"a": "1", "c": "3"}
    assert kubeapi.request("GET", f"{base}/other", token=tok)[0] == 403
    assert kubeapi.request("PATCH", f"{base}/other", {"data": {}}, "application/merge-patch+json", token=tok)[0] == 403
    assert kubeapi.request("POST", base, {"metadata": {"name": "new"}}, token=tok)[0] == 403

    def allowed(verb: str, name: str, resource: str = "secrets") -> bool:
        return kubeapi.can_i(tok, verb, resource, kns, name)

    assert [allowed(v, "proxy-0") for v in ("get", "update", "patch")] == [True, True, True]
    assert allowed("get", "proxy-0-config")
    assert [allowed(v, "other") for v in ("get", "update", "patch")] == [False, False, False]
    assert not allowed("create", "proxy-0")  # pgRole grants no create
    assert allowed("create", "", "events")


def test_proxies_role_grants_every_secret_and_create(kubeapi: KubeAPI, kns: str) -> None:
    kubeapi.create_service_account(kns, "proxies")
    kubeapi.create_role(kns, "proxies", PROXIES_ROLE_RULES)
    kubeapi.bind_role(kns, "proxies", role="proxies", service_account="proxies")
    tok = kubeapi.token(kns, "proxies")
    assert kubeapi.can_i(tok, "create", "secrets", kns)
    assert kubeapi.can_i(tok, "patch", "secrets", kns, "anything")


def test_token_request(kubeapi: KubeAPI, kns: str) -> None:
    kubeapi.create_service_account(kns, "sa")
    tok = kubeapi.token(kns, "sa", seconds=600)
    claims = json.loads(base64.urlsafe_b64decode(tok.split(".")[1] + "=="))
    assert claims["iss"] == ISSUER and claims["aud"] == [ISSUER]
    assert claims["exp"] - claims["iat"] >= 600
    assert claims["sub"] == f"system:serviceaccount:{kns}:sa"

    status, review = kubeapi.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                     {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
                                     token=tok)
    assert status == 201 and review["status"]["userInfo"]["username"] == claims["sub"]
    # No RBAC grant yet: authenticated but not allowed.
    assert kubeapi.request("GET", f"/api/v1/namespaces/{kns}/secrets", token=tok)[0] == 403
    assert kubeapi.request("GET", "/api", token="not-a-token")[0] == 401
    assert kubeapi.request("POST", f"/api/v1/namespaces/{kns}/serviceaccounts/nobody/token",
                           {"spec": {}})[0] == 404


def test_pod_files_reach_the_api(kubeapi: KubeAPI, kns: str, tmp_path: Path) -> None:
    kubeapi.create_secret(kns, "proxy-0")
    env = kubeapi.pod_files(tmp_path, kns, proxy_token(kubeapi, kns))
    d = tmp_path / "var/run/secrets/kubernetes.io/serviceaccount"
    assert (d / "namespace").read_text() == kns
    assert env == {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT_HTTPS": str(kubeapi.port),
                   "KUBERNETES_SERVICE_PORT": str(kubeapi.port)}
    # What an in-cluster client does with them.
    req = urllib.request.Request(
        f"https://{env['KUBERNETES_SERVICE_HOST']}:{env['KUBERNETES_SERVICE_PORT_HTTPS']}"
        f"/api/v1/namespaces/{(d / 'namespace').read_text()}/secrets/proxy-0",
        headers={"Authorization": f"Bearer {(d / 'token').read_text()}"})
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        assert json.load(r)["metadata"]["name"] == "proxy-0"


def test_secret_helpers(kubeapi: KubeAPI, kns: str) -> None:
    assert kubeapi.get_secret(kns, "s") is None
    kubeapi.create_secret(kns, "s", {"k": "v", "j": '{"x": 1}'})
    kubeapi.patch_secret(kns, "s", {"k": None, "n": "new"})
    assert kubeapi.get_secret(kns, "s") == {"j": '{"x": 1}', "n": "new"}
    kubeapi.delete_secret(kns, "s")
    kubeapi.delete_secret(kns, "s")
    assert kubeapi.get_secret(kns, "s") is None


def test_servers_sharing_etcd_are_separate(kubeapi: KubeAPI) -> None:
    ns = kubeapi.create_namespace()
    with KubeAPI(kubeapi.etcd) as other:
        assert other.request("GET", f"/api/v1/namespaces/{ns}")[0] == 404
        assert kubeapi.request("GET", f"/api/v1/namespaces/{ns}")[0] == 200
    assert kubeapi.etcd.proc.exited() is False
