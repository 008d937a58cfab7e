"""The pure decisions about the state Secret, as tables (upstream's kube_test.go cases and ours)."""

from __future__ import annotations

import ipaddress
import os
import struct
from pathlib import Path

import pytest

from containerboot.kube import client as kube
from containerboot.kube import configdir, secret
from containerboot.log import go_duration
from containerboot.settings import CAPABILITY_VERSION, load


@pytest.mark.parametrize(("existing", "pod_uid", "config_key", "expected_reissue"), [
    ({}, "", "", "absent"),
    ({"reissue_authkey": b"old"}, "uid", "old", "absent"),  # operator has not answered yet: keep the request
    ({"reissue_authkey": b"old"}, "uid", "new", None),  # answered: clear it
    ({"reissue_authkey": b"old"}, "uid", "", "absent"),  # no config key to compare with: keep
])
def test_reset_patch(existing: dict[str, bytes], pod_uid: str, config_key: str, expected_reissue: object) -> None:
    patch = secret.reset_patch(existing, pod_uid, config_key)
    assert patch["tailscale_capver"] == str(CAPABILITY_VERSION).encode()
    assert patch["https_endpoint"] is None and patch["egress-services"] is None
    assert patch["ingress-config.json"] is None
    assert patch.get("pod_uid", "absent") == (pod_uid.encode() if pod_uid else "absent")
    assert patch.get("reissue_authkey", "absent") == expected_reissue
    # Device identity survives a restart, so the operator can still delete the old device.
    assert not {"device_id", "device_fqdn", "device_ips"} & set(patch)


def test_clear_reissue_patch_forgets_the_node() -> None:
    patch = secret.clear_reissue_patch({"_current-profile": b"profile-abcd", "profile-abcd": b"{}"})
    assert patch == dict.fromkeys(["reissue_authkey", "device_id", "device_fqdn", "device_ips", "_machinekey",
                                   "_current-profile", "_profiles", "profile-abcd"])
    assert not any(k.startswith("profile-") for k in secret.clear_reissue_patch({}))


@pytest.mark.parametrize(("keys", "ok"), [
    ((), True),
    (("_current-profile", "_profiles", "_machinekey", "profile-1"), True),
    (("_machinekey",), False),
    (("_current-profile", "_profiles", "_machinekey"), False),
    (("_current-profile", "_profiles", "_machinekey", "profile-1", "profile-2"), False),
    (("device_id", "authkey"), True),  # containerboot's own keys do not count
])
def test_consistent(keys: tuple[str, ...], ok: bool) -> None:
    assert secret.consistent(dict.fromkeys(keys, b"x")) is ok


def test_endpoints_patch_is_gos_json() -> None:
    addrs = (ipaddress.ip_address("100.64.0.1"), ipaddress.ip_address("fd7a:115c:a1e0::1"))
    assert secret.endpoints_patch("n.ts.net.", addrs) == {
        "device_fqdn": b"n.ts.net.", "device_ips": b'["100.64.0.1","fd7a:115c:a1e0::1"]'}
    assert secret.endpoints_patch("n.ts.net.", ())["device_ips"] == b"null"  # a nil []string


def test_decode_data() -> None:
    assert kube.decode_data("s", {"a": "aGk=", "b": ""}) == {"a": b"hi", "b": b""}
    assert kube.decode_data("s", None) == {}
    with pytest.raises(kube.KubeError, match='Secret "s": data key "a" is not valid base64'):
        kube.decode_data("s", {"a": "not base64!"})


def test_status_errors_are_one_line() -> None:
    err = kube.KubeError('secrets "x" is forbidden:\n  User "u" cannot get', 403)
    assert str(err) == 'secrets "x" is forbidden: User "u" cannot get' and not err.not_found
    assert kube.KubeError("gone", 404).not_found


def test_server_address() -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT_HTTPS": "6443",
           "KUBERNETES_SERVICE_PORT": "443"}
    assert kube.server_address(load({}), env) == ("kubernetes.default.svc", 443)
    from_env = load({"TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV": "true"})
    assert kube.server_address(from_env, env) == ("fd00::1", 6443)
    with pytest.raises(kube.KubeError, match="KUBERNETES_SERVICE_PORT_HTTPS"):
        kube.server_address(from_env, {**env, "KUBERNETES_SERVICE_PORT_HTTPS": "x" * 500})


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (45, "45s"), (65, "1m5s"), (600, "10m0s"),
                                               (3600, "1h0m0s")])
def test_go_duration(seconds: int, text: str) -> None:
    assert go_duration(seconds) == text


def test_config_authkey(tmp_path: Path) -> None:
    f = tmp_path / "cap-95.hujson"
    f.write_text('{"Version":"alpha0", // a comment\n "authKey": "tskey-1",}')
    assert configdir.authkey(str(f)) == "tskey-1"
    f.write_text('{"Version":"alpha0"}')
    assert configdir.authkey(str(f)) == ""
    assert configdir.authkey(str(tmp_path / "missing")) == ""


def test_inotify_event_names() -> None:
    def event(name: bytes) -> bytes:
        padded = name + b"\0" * (16 - len(name))
        return struct.pack("iIII", 1, configdir.IN_MOVED_TO, 0, len(padded)) + padded
    assert configdir.event_names(event(b"..data") + event(b"..2026_11_29")) == ["..data", "..2026_11_29"]
    assert configdir.event_names(b"") == []


def test_dir_watch_sees_a_kubelet_swap(tmp_path: Path) -> None:
    import threading
    seen = threading.Event()
    watch = configdir.DirWatch(str(tmp_path), seen.set)
    try:
        assert watch.mode == "inotify"
        (tmp_path / "unrelated").write_text("x")
        assert not seen.wait(0.3)
        (tmp_path / "..data_tmp").symlink_to("elsewhere")
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
        assert seen.wait(2)
    finally:
        watch.close()


def test_path_segments_are_encoded_as_urllib_would() -> None:
    import urllib.parse

    from containerboot.kube.client import _segment

    for text in ("tailscale", "ts-proxy-0", "a b/c", "ü-x.y_z~", "%", "?#"):
        assert _segment(text) == urllib.parse.quote(text, safe="")
