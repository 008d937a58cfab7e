"""Ingress services (ProxyGroup of type ingress, network layer): Tailscale Service VIPs -> cluster IPs.

`TS_INGRESS_PROXIES_CONFIG_PATH` names a file (in a mounted ConfigMap) of Tailscale Service name ->
{IPv4Mapping, IPv6Mapping}, each {TailscaleServiceIP, ClusterIP}. Each mapping is a DNAT of the VIP to the
cluster IP; the status (`ingress-config.json` in the state Secret) echoes the config with this Pod's IPs.
Upstream: cmd/containerboot/ingressservices.go, kube/ingressservices. As for egress services, a bad
update is logged and the last good config stays (upstream exits).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from containerboot.proxygroup import egress
from containerboot.proxygroup.egress import field, json_object, read_file, show
from firewall.model import IPAddress

SETTING = "TS_INGRESS_PROXIES_CONFIG_PATH"
KEY_STATUS = "ingress-config.json"
MAX_CONFIG = 16 << 20


# One error type for both service configs (read_file raises it for either).
ConfigError = egress.ConfigError


@dataclass(frozen=True)
class VipMap:
    """One family's mapping: a Tailscale Service's VIP to the Kubernetes Service's cluster IP."""

    vip: IPAddress
    cluster_ip: IPAddress


@dataclass(frozen=True)
class Service:
    """One ingress service of the config: its name and its mapping per family."""

    name: str
    v4: VipMap | None = None
    v6: VipMap | None = None

    @property
    def mappings(self) -> tuple[VipMap, ...]:
        return tuple(m for m in (self.v4, self.v6) if m is not None)


Configs = tuple[Service, ...]  # sorted by name




def _mapping(doc: Any, where: str, fam: int) -> VipMap | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected {{TailscaleServiceIP, ClusterIP}}, got {show(doc)}")
    addrs = []
    for key in ("TailscaleServiceIP", "ClusterIP"):
        text = field(doc, key)
        try:
            ip = ipaddress.ip_address(text if isinstance(text, str) else "")
        except ValueError:
            raise ConfigError(f"{where}.{key} {show(text)}: must be an IPv{fam} address") from None
        if ip.version != fam:
            raise ConfigError(f"{where}.{key} {show(str(ip))}: must be an IPv{fam} address")
        addrs.append(ip)
    return VipMap(addrs[0], addrs[1])


def parse(data: bytes, path: str = KEY_STATUS) -> Configs | None:
    """The services in the config file; None for an empty file or `null` (upstream: no config)."""
    prefix = f"{SETTING}: {path}:"
    doc = json_object(data, prefix, "Tailscale Service name",
                      '{"IPv4Mapping": {"TailscaleServiceIP": ..., "ClusterIP": ...}, "IPv6Mapping": ...}')
    if doc is None:
        return None
    out = []
    for name, cfg in sorted(doc.items()):
        where = f"{prefix} service {show(name)}"
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: expected an object, got {show(cfg)}")
        out.append(Service(str(name), _mapping(field(cfg, "IPv4Mapping"), f"{where}: IPv4Mapping", 4),
                           _mapping(field(cfg, "IPv6Mapping"), f"{where}: IPv6Mapping", 6)))
    return tuple(out)


def read_config(path: str) -> Configs | None:
    data = read_file(path, SETTING, MAX_CONFIG)
    return None if data is None else parse(data, path)


def _mapping_json(m: VipMap) -> dict[str, str]:
    return {"TailscaleServiceIP": str(m.vip), "ClusterIP": str(m.cluster_ip)}


def status(cfgs: Configs | None, pod: tuple[str, str]) -> dict[str, Any]:
    """The `ingress-config.json` status (kube/ingressservices.Status): the config, this Pod's IPs; empty
    fields left out as upstream's omitempty does."""
    out: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    for svc in cfgs or ():
        entry: dict[str, Any] = {}
        if svc.v4:
            entry["IPv4Mapping"] = _mapping_json(svc.v4)
        if svc.v6:
            entry["IPv6Mapping"] = _mapping_json(svc.v6)
        configs[svc.name] = entry
    if configs:
        out["configs"] = configs
    if pod[0]:
        out["podIPv4"] = pod[0]
    if pod[1]:
        out["podIPv6"] = pod[1]
    return out


def wants_write(cfgs: Configs | None, new: Mapping[str, Any], written: Mapping[str, Any] | None) -> bool:
    """Upstream writes once a config file exists (even an empty object), and again whenever it changes."""
    if written is None:
        return cfgs is not None
    return dict(new) != dict(written)
