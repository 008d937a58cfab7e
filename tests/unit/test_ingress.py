"""Ingress services (pure): config parsing and its errors, and the ingress-config.json status in upstream's
shape (the rules are in tests/unit/test_egress.py's reconciler table)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from containerboot.proxygroup import ingress

V4 = {"TailscaleServiceIP": "100.100.0.1", "ClusterIP": "10.96.0.10"}
V6 = {"TailscaleServiceIP": "fd7a:115c:a1e0::a", "ClusterIP": "fd00::10"}


def doc(**services: Any) -> bytes:
    return json.dumps(services).encode()


def test_parse_and_status_round_trip() -> None:
    cfgs = ingress.parse(doc(**{"svc:b": {"IPv4Mapping": V4, "IPv6Mapping": V6}, "svc:a": {"IPv6Mapping": V6}}))
    assert cfgs is not None and [s.name for s in cfgs] == ["svc:a", "svc:b"]
    st = ingress.status(cfgs, ("10.1.0.5", ""))
    assert st == {"configs": {"svc:a": {"IPv6Mapping": V6}, "svc:b": {"IPv4Mapping": V4, "IPv6Mapping": V6}},
                  "podIPv4": "10.1.0.5"}


def test_status_omits_empty_fields_like_omitempty() -> None:
    assert ingress.status((), ("", "fd00::5")) == {"podIPv6": "fd00::5"}
    assert ingress.status(None, ("10.1.0.5", "")) == {"podIPv4": "10.1.0.5"}


def test_written_once_a_file_exists_then_on_change() -> None:
    assert not ingress.wants_write(None, {"podIPv4": "10.1.0.5"}, None)
    assert ingress.wants_write((), {"podIPv4": "10.1.0.5"}, None)  # "{}" in the file: upstream writes
    assert not ingress.wants_write((), {"podIPv4": "10.1.0.5"}, {"podIPv4": "10.1.0.5"})


@pytest.mark.parametrize("data", [b"", b"null"])
def test_empty_is_no_config(data: bytes) -> None:
    assert ingress.parse(data) is None


@pytest.mark.parametrize(("data", "says"), [
    (b"{", "not JSON"),
    (b'"x"', "expected a JSON object"),
    (doc(a=1), 'service "a": expected an object, got 1'),
    (doc(a={"IPv4Mapping": {"TailscaleServiceIP": "100.100.0.1"}}), 'IPv4Mapping.ClusterIP null: must be an IPv4'),
    (doc(a={"IPv4Mapping": {**V4, "ClusterIP": "fd00::1"}}), 'IPv4Mapping.ClusterIP "fd00::1": must be an IPv4'),
    (doc(a={"IPv6Mapping": V4}), 'IPv6Mapping.TailscaleServiceIP "100.100.0.1": must be an IPv6'),
    (doc(a={"IPv4Mapping": "x"}), 'IPv4Mapping: expected {TailscaleServiceIP, ClusterIP}'),
])
def test_errors_are_one_line(data: bytes, says: str) -> None:
    with pytest.raises(ingress.ConfigError) as info:
        ingress.parse(data, "/etc/cfg/ingress-config.json")
    text = str(info.value)
    assert text.startswith("TS_INGRESS_PROXIES_CONFIG_PATH: /etc/cfg/ingress-config.json:") and says in text, text
    assert "\n" not in text
