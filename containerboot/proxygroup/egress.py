"""Egress services (ProxyGroup of type egress): their config, target resolution and status (pure), and
the pre-stop drain (the one part that does I/O).

The operator mounts a directory (`TS_EGRESS_PROXIES_CONFIG_PATH`) holding `egress-services` (JSON: service
name -> tailnet target and port mappings) and `hep-pings` (how often to ask a health check endpoint so that
every replica is hit once). Upstream: cmd/containerboot/egressservices.go, kube/egressservices.

What differs from upstream, on purpose:
- a bad config update is logged in one line and the last good config stays in force (upstream's sync
  returns the error and containerboot exits, taking every service of the replica down with it);
- the rules are recomputed from config + netmap on every change (one Plan), so a Tailscale Service or
  4via6 target whose address changes is followed too (upstream compares peer names only).
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from containerboot.log import go_list
from containerboot.settings import shown
from containerboot.tailscale import ipn
from firewall.model import IPAddress

SETTING = "TS_EGRESS_PROXIES_CONFIG_PATH"
KEY_CONFIG = "egress-services"  # the file in the mounted dir, and the state Secret's status key
KEY_HEP_PINGS = "hep-pings"
POD_IPV4_HEADER = "Pod-IPv4"
POD_IPV6_HEADER = "Pod-IPv6"
PRESHUTDOWN_PATH = "/internal-egress-services-preshutdown"
MAX_CONFIG = 16 << 20  # 1,000 services are about 200 KB; a ConfigMap holds at most 1 MiB


class ConfigError(ValueError):
    """A config file that cannot be used, as one line naming the setting, the file and what is wrong."""


@dataclass(frozen=True, order=True)
class PortSpec:
    """One port of an egress service: the port a client uses and the port on the target."""

    protocol: str
    match_port: int
    target_port: int

    def to_json(self) -> dict[str, object]:
        return {"protocol": self.protocol, "matchPort": self.match_port, "targetPort": self.target_port}


@dataclass(frozen=True)
class Service:
    """One egress service as configured: exactly one of `ip` (parsed) or `fqdn`; the raw text of both is
    kept because the status echoes them as given."""

    name: str
    ip_text: str
    fqdn: str
    ports: tuple[PortSpec, ...]  # sorted, no duplicates (upstream's PortMaps is a set)
    health_check: str = ""
    ip: IPAddress | None = None


Configs = tuple[Service, ...]  # sorted by name


def show(value: Any) -> str:
    """A value in an error line: a string JSON-quoted, anything else as JSON; cut short either way."""
    if isinstance(value, str):
        return shown(value)
    text = json.dumps(value)
    return text if len(text) <= 60 else f"{text[:60]}… ({len(text)} characters)"


def field(obj: Mapping[str, Any], name: str) -> Any:
    """Go's encoding/json matches field names case-insensitively, preferring the exact one."""
    if name in obj:
        return obj[name]
    low = name.lower()
    return next((v for k, v in obj.items() if k.lower() == low), None)


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{where} {show(value)}: must be a port number 1-65535")
    return value


def json_object(data: bytes, prefix: str, names: str, shape: str) -> dict[str, Any] | None:
    """A services config file (egress or ingress) as its JSON object of `names` -> config; None for an
    empty file or `null` (upstream: no config). `shape` is one config as the error line shows it."""
    if not data.strip():
        return None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{prefix} not JSON ({exc}); expected an object of {names} -> {shape}") from None
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError(f"{prefix} expected a JSON object of {names} -> config, got {type(doc).__name__}")
    return doc


def parse(data: bytes, path: str = KEY_CONFIG) -> Configs | None:
    """The services in an `egress-services` file; None for an empty file (upstream: no config)."""
    prefix = f"{SETTING}: {path}:"
    doc = json_object(data, prefix, "service name", '{"tailnetTarget": {"ip"|"fqdn": ...}, "ports": [...]}')
    if doc is None:
        return None
    out: list[Service] = []
    for name, cfg in sorted(doc.items()):
        where = f"{prefix} service {show(name)}"
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: expected an object, got {show(cfg)}")
        target = field(cfg, "tailnetTarget") or {}
        if not isinstance(target, dict):
            raise ConfigError(f"{where}: tailnetTarget must be an object with ip or fqdn")
        ip_text, fqdn = field(target, "ip") or "", field(target, "fqdn") or ""
        if not isinstance(ip_text, str) or not isinstance(fqdn, str):
            raise ConfigError(f"{where}: tailnetTarget ip and fqdn must be strings")
        ip: IPAddress | None = None
        if ip_text:  # upstream: the IP wins when both are set
            try:
                ip = ipaddress.ip_address(ip_text)
            except ValueError:
                raise ConfigError(f"{where}: tailnetTarget.ip {show(ip_text)} is not an IP address") from None
        elif not fqdn:
            raise ConfigError(f"{where}: tailnetTarget has neither ip nor fqdn (set exactly one)")
        ports_doc = field(cfg, "ports")
        if ports_doc is None:
            ports_doc = []
        if not isinstance(ports_doc, list):
            raise ConfigError(f"{where}: ports must be a list of {{protocol, matchPort, targetPort}}")
        ports: set[PortSpec] = set()
        for i, pm in enumerate(ports_doc):
            pwhere = f"{where}: ports[{i}]"
            if not isinstance(pm, dict):
                raise ConfigError(f"{pwhere}: expected {{protocol, matchPort, targetPort}}, got "
                                  f"{show(pm)}")
            proto = field(pm, "protocol")
            # The operator writes Kubernetes' "TCP"/"UDP"; upstream hands them to iptables and nftables, which
            # take either case. Kept as written, so the status echoes it (the operator compares it).
            if not isinstance(proto, str) or proto.lower() not in ("tcp", "udp"):
                raise ConfigError(f"{pwhere}.protocol {show(proto)}: must be tcp or udp (any case)")
            ports.add(PortSpec(proto, _port(field(pm, "matchPort"), f"{pwhere}.matchPort"),
                               _port(field(pm, "targetPort"), f"{pwhere}.targetPort")))
        hep = field(cfg, "healthCheckEndpoint") or ""
        if not isinstance(hep, str):
            raise ConfigError(f"{where}: healthCheckEndpoint must be a string (a URL)")
        out.append(Service(str(name), ip_text, fqdn, tuple(sorted(ports)), hep, ip))
    return tuple(out)


def read_file(path: str, setting: str, limit: int = MAX_CONFIG) -> bytes | None:
    """A mounted config file's bytes (egress or ingress services); None when it is missing; ConfigError
    naming `setting` when it cannot be read or is larger than `limit`."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{setting}: {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ConfigError(f"{setting}: {path}: larger than {limit >> 20} MiB")
    return data


def read_config(directory: str) -> Configs | None:
    """The config in the mounted dir; None when the file is missing or empty (upstream's getConfigs)."""
    path = os.path.join(directory, KEY_CONFIG)
    data = read_file(path, SETTING)
    return None if data is None else parse(data, path)


def read_hep_pings(directory: str) -> int:
    """How often to ask each health check endpoint (upstream's getHEPPings): 0 when absent."""
    path = os.path.join(directory, KEY_HEP_PINGS)
    try:
        with open(path, "rb") as f:
            text = f.read(64).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise ConfigError(f"{SETTING}: {path}: {exc.strerror or exc}") from None
    if not text:
        return 0
    try:
        n = int(text)  # like strconv.Atoi: no surrounding space
    except ValueError:
        raise ConfigError(f"{SETTING}: {path}: {show(text)} is not an integer") from None
    return max(0, n)


# ---- resolving targets (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """The netmap indexed once per resolution pass (1,000 services look up in it)."""

    names: Mapping[str, tuple[IPAddress, ...]]  # peers' addresses by bare lower-case MagicDNS name
    singles: frozenset[IPAddress]  # every peer's single-address AllowedIPs (Tailscale Service VIPs among them)
    routes6: tuple[ipaddress.IPv6Network, ...]  # IPv6 routes peers carry (4via6 targets)
    records: tuple[tuple[str, str], ...]  # DNS extra records, (name, address)


def lookup(node: ipn.Node) -> Lookup:
    nets = [net for peer in node.peers.values() for net in peer.allowed]
    return Lookup({_bare(p.name): p.addrs for p in node.peers.values() if p.name},
                  frozenset(n.network_address for n in nets if n.prefixlen == n.max_prefixlen),
                  tuple(n for n in nets if isinstance(n, ipaddress.IPv6Network)), node.extra_records)


def _bare(name: str) -> str:
    return name.rstrip(".").lower()


def via_address(name: str) -> ipaddress.IPv6Address | None:
    """The 4via6 address a name like 10-1-0-5-via-7.tailnet.ts.net stands for (upstream's ResolveViaDomain):
    fd7a:115c:a1e0:b1a::/64 + the 32-bit site ID + the IPv4 address."""
    bare = name.rstrip(".")
    if len(bare) < 13 or "-via-" not in bare:
        return None
    first, _, domain = bare.partition(".")
    d = domain.lower()
    if domain and not any(d == s or d.endswith("." + s) for s in ("ts.net", "tailscale.net")):
        return None
    v4, sep, site_text = first.partition("-via-")
    if not sep:
        return None
    try:
        v4addr = ipaddress.IPv4Address(v4.replace("-", "."))
        site = int(site_text, 0)
    except ValueError:
        return None
    if not 0 <= site < 2**32:
        return None
    base = int(ipaddress.IPv6Address("fd7a:115c:a1e0:b1a::"))
    return ipaddress.IPv6Address(base | site << 32 | int(v4addr))


def resolve(name: str, lk: Lookup) -> tuple[tuple[IPAddress, ...], str]:
    """A tailnet FQDN's addresses: a peer's, else a Tailscale Service's, else a 4via6 name's; and, when
    none, why (upstream's resolveTailnetFQDN)."""
    want = _bare(name)
    found = lk.names.get(want)
    if found:
        return found, ""
    svc: list[IPAddress] = []
    for rec_name, value in lk.records:
        if _bare(rec_name) != want:
            continue
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            continue
        if ip in lk.singles:
            svc.append(ip)
    if svc:
        return tuple(svc), ""
    via = via_address(name)
    if via is not None:
        if any(via in net for net in lk.routes6):
            return (via,), ""
        return (), f"resolved 4via6 address {via} for {name!r} but no peer advertises a route containing it"
    return (), (f"could not find Tailscale node, service or 4via6 address {name!r}; it either does not exist, "
                "or not reachable because of ACLs")


@dataclass(frozen=True)
class Resolved:
    """A service with the tailnet addresses its rules go to (upstream's TailnetTargetIPs)."""

    service: Service
    targets: tuple[IPAddress, ...]


def targets(services: Configs, node: ipn.Node, families: Iterable[int] = (4, 6),
            pod: Iterable[IPAddress] = ()) -> tuple[list[Resolved], list[str]]:
    """Each service's target addresses, IPv6 ones only where the host has IPv6 NAT; and notes, among them a
    Pod address of a family no target has (POD_IPS: `pod`). Names resolve only once the node knows itself
    (before that the netmap is not there)."""
    v6 = 6 in set(families)
    out: list[Resolved] = []
    notes: list[str] = []
    lk: Lookup | None = None
    for svc in services:
        if svc.ip is not None:
            found: tuple[IPAddress, ...] = (svc.ip,)
        elif not node.self_known:
            found = ()
        else:
            lk = lk or lookup(node)
            found, why = resolve(svc.fqdn, lk)
            if why:
                notes.append(f"egress service {svc.name}: {why}")
        kept = tuple(a for a in found if a.version == 4 or v6)
        if len(kept) < len(found):
            notes.append(f"egress service {svc.name}: tailnet target {svc.ip_text or svc.fqdn} has IPv6 addresses, "
                         "but this host does not support IPv6 in the chosen firewall mode; skipping them")
        out.append(Resolved(svc, kept))
        notes += _cross_family(svc.name, kept, pod)
    return out, notes


def _cross_family(name: str, kept: tuple[IPAddress, ...], pod: Iterable[IPAddress]) -> list[str]:
    """A cluster client that reaches this Pod over the family no target has gets nothing: a port map DNATs
    within one family (upstream skips that family without a word, tailscale/tailscale#18518)."""
    have = {a.version for a in kept}
    out = []
    for addr in (a for a in pod if kept and a.version not in have):
        fam, alt = addr.version, 10 - addr.version
        out.append(f"egress service {name}: its tailnet targets {go_list(kept)} are IPv{alt} only: connections to "
                   f"this Pod's IPv{fam} address {addr} are not forwarded (netfilter cannot translate IPv{fam} to "
                   f"IPv{alt}); cluster clients reach it over IPv{alt} (the Service's IPv{alt} ClusterIP)")
    return out


# ---- status (pure) ------------------------------------------------------------------------------------------


def pod_ips(ips: Iterable[IPAddress]) -> tuple[str, str]:
    """(podIPv4, podIPv6) as upstream takes them from POD_IPS: the last of each family wins."""
    v4 = v6 = ""
    for ip in ips:
        if ip.version == 4:
            v4 = str(ip)
        else:
            v6 = str(ip)
    return v4, v6


def status(resolved: Iterable[Resolved] | None, pod: tuple[str, str]) -> dict[str, Any]:
    """The `egress-services` status (kube/egressservices.Status) for these services on this Pod."""
    services: dict[str, Any] | None = None
    for r in resolved or ():
        services = services or {}
        svc = r.service
        services[svc.name] = {
            "ports": [p.to_json() for p in svc.ports],
            "tailnetTargetIPs": [str(a) for a in r.targets] if r.targets else None,
            "tailnetTarget": {"ip": svc.ip_text, "fqdn": svc.fqdn},
        }
    out: dict[str, Any] = {"podIPv4": pod[0]}
    if pod[1]:
        out["podIPv6"] = pod[1]
    out["services"] = services
    return out


def status_bytes(st: Mapping[str, Any]) -> bytes:
    return json.dumps(st, separators=(",", ":")).encode()


def wants_write(new: Mapping[str, Any], written: Mapping[str, Any] | None) -> bool:
    """Upstream writes nothing while no service was ever configured for this Pod, and otherwise whenever
    the status changes."""
    if written is None:
        return bool(new.get("services"))
    return dict(new) != dict(written)


# ---- pre-stop drain -------------------------------------------------------------------------------------------


@dataclass
class Drain:
    """`GET /internal-egress-services-preshutdown` (upstream's waitTillSafeToShutdown): for each service with
    a health check endpoint (a cluster Service whose backends are the replicas), ask it `hep-pings` times
    on fresh connections; while any answer carries this Pod's IP header, cluster traffic still arrives
    here: ask again every `short` seconds. Then wait `long` seconds for the kube-proxies of other nodes.
    Every wait is bounded (`bound` for the polling) and ends at once when `stop` is set (SIGTERM)."""

    directory: str
    pod: tuple[str, str]
    stop: threading.Event
    short: float = 1.0
    long: float = 10.0
    bound: float = 40.0
    request_timeout: float = 2.0
    log: Callable[[str], None] = print

    def answer(self) -> tuple[int, bytes]:
        try:
            cfgs = read_config(self.directory)
        except ConfigError as exc:
            return 500, f"error retrieving egress services configs: {exc}".encode()
        if cfgs is None:
            return 200, b"safe to terminate"
        try:
            pings = read_hep_pings(self.directory)
        except ConfigError as exc:
            return 500, (f"error determining the number of times health check endpoint should be pinged: "
                         f"{exc}").encode()
        self.wait(cfgs, pings)
        return 200, b""

    def wait(self, cfgs: Configs, pings: int) -> None:
        if not cfgs:
            return
        self.log("Ensuring that cluster traffic for egress targets is no longer routed via this Pod...")
        deadline = time.monotonic() + self.bound
        ip, header = (self.pod[0], POD_IPV4_HEADER) if self.pod[0] else (self.pod[1], POD_IPV6_HEADER)
        threads = []
        for svc in cfgs:
            if not svc.health_check:
                self.log(f"Tailnet target {svc.name!r} does not have a cluster healthcheck specified, unable to "
                         "verify if cluster traffic for the target is still routed via this Pod")
                continue
            t = threading.Thread(target=self._one, args=(svc, ip, header, pings, deadline), daemon=True,
                                 name="egress-drain")
            t.start()
            threads.append(t)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + self.request_timeout + 1)
        if self.stop.is_set():
            return
        self.log(f"Sleeping for {self.long:g}s before shutdown to ensure that kube proxies on all nodes have updated "
                 "routing configuration")
        self.stop.wait(self.long)

    def _one(self, svc: Service, ip: str, header: str, pings: int, deadline: float) -> None:
        self.log(f"Ensuring that cluster traffic is no longer routed to {svc.name!r} via this Pod...")
        while not self.stop.is_set():
            if not self._routed_here(svc.health_check, ip, header, pings, deadline):
                self.log(f"service {svc.name!r} is no longer routed through this Pod")
                return
            if time.monotonic() + self.short >= deadline:
                self.log(f"Cluster traffic for {svc.name} did not stop being routed to this Pod.")
                return
            self.log(f"service {svc.name!r} is still routed through this Pod, waiting...")
            self.stop.wait(self.short)

    def _routed_here(self, url: str, ip: str, header: str, pings: int, deadline: float) -> bool:
        for _ in range(pings):
            if self.stop.is_set():
                return False
            got = self._ask(url, header, max(0.1, min(self.request_timeout, deadline - time.monotonic())))
            if got is None:
                return False  # unreachable: likely no (more) healthy backends, as upstream assumes
            if got.lower() == ip.lower():
                return True
        return False

    def _ask(self, url: str, header: str, timeout: float) -> str | None:
        """The header's value from one GET on a new connection ("" when absent); None when unreachable."""
        import http.client  # only a pre-stop drain pays for these (http.client brings email.parser)
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        try:
            conn = conn_type(parts.hostname or "", parts.port, timeout=timeout)
            try:
                conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                             headers={"Connection": "close"})
                resp = conn.getresponse()
                resp.read(65536)
                return resp.getheader(header) or ""
            finally:
                conn.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.log(f"Endpoint {url!r} can not be reached: {exc}, likely because there are no (more) healthy "
                     "backends")
            return None
