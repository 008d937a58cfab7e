"""The subcommands: detect, plan, apply, flush, status, healthcheck (and, without one, the boot)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from containerboot import log, startup, system
from containerboot.settings import Settings, parse_host_ip, shown
from containerboot.startup import _fail, settings_or_exit
from firewall.model import FirewallError, IPAddress

if TYPE_CHECKING:
    from firewall.detect import Detection


def _detection(settings: Settings) -> Detection:
    from firewall.detect import DetectionError

    try:
        return system.detect_firewall(settings)
    except DetectionError as exc:
        _fail(str(exc))


def _ips(values: Sequence[str], option: str) -> tuple[IPAddress, ...]:
    """Addresses of one host each, checked like TS_DEST_IP: no zone, not unspecified, broadcast or multicast."""
    out = []
    for value in values:
        try:
            out.append(parse_host_ip(value))
        except ValueError as exc:
            raise click.BadParameter(f"{shown(value)} {exc}; expected an IPv4 or IPv6 address of one host, e.g. "
                                     "100.64.0.1 or fd7a:115c:a1e0::1", param_hint=option) from None
    return tuple(out)


def _services(settings: Settings, families: Sequence[int]) -> tuple[Any, Any, list[str]]:
    """The egress services (IP targets only: names are resolved from the netmap at run time) and ingress
    services of the config files, as a replica reads them."""
    from containerboot.proxygroup import egress, ingress
    from containerboot.tailscale import ipn

    resolved: list[egress.Resolved] = []
    icfg: ingress.Configs | None = None
    notes: list[str] = []
    try:
        if settings.egress_proxies_config_path:
            cfg = egress.read_config(settings.egress_proxies_config_path) or ()
            resolved, notes = egress.targets(cfg, ipn.Node(), families, settings.pod_ips)
            notes += [f"egress service {svc.name}: target {svc.fqdn} is a name, resolved from the netmap at run "
                      "time; no rules for it here" for svc in cfg if svc.ip is None]
        if settings.ingress_proxies_config_path:
            icfg = ingress.read_config(settings.ingress_proxies_config_path)
    except (egress.ConfigError, ingress.ConfigError) as exc:
        _fail(str(exc))
    return resolved, icfg, notes


def _plan(settings: Settings, tailnet_ips: Sequence[str], target_addrs: Sequence[str],
          families: Sequence[int] = (4, 6)) -> Any:
    from containerboot import dns, proxy, rules

    backends: tuple[IPAddress, ...] = ()
    if settings.dest_dns_name:
        try:
            backends = dns.lookup(settings.dest_dns_name)
        except OSError as exc:
            _fail(f"resolving TS_EXPERIMENTAL_DEST_DNS_NAME: {exc}")
    resolved, icfg, notes = _services(settings, families)
    inputs = rules.Inputs(proxy.Inputs(_ips(tailnet_ips, "--tailnet-ip"),
                                       proxy.egress_targets(settings, _ips(target_addrs, "--target-addr")), backends),
                          resolved, icfg or ())
    try:
        plan, more = rules.plan(settings, inputs, families)
    except rules.ProxyError as exc:
        _fail(str(exc))
    for note in notes + more:
        log.info(note)
    return plan


def _status(settings: Settings) -> dict[str, Any]:
    """The services' status a replica with these config files writes to its state Secret."""
    from containerboot.proxygroup import egress, ingress

    resolved, icfg, _ = _services(settings, (4, 6))
    pod = egress.pod_ips(settings.pod_ips)
    out: dict[str, Any] = {}
    if settings.egress_proxies_config_path:
        out[egress.KEY_CONFIG] = egress.status(resolved, pod)
    if settings.ingress_proxies_config_path:
        out[ingress.KEY_STATUS] = ingress.status(icfg, pod)
    return out


tailnet_ip_option = click.option("--tailnet-ip", "tailnet_ips", multiple=True, required=True, metavar="IP",
                                 help="The node's tailnet address (repeat for IPv4 and IPv6).")
target_addr_option = click.option(
    "--target-addr", "target_addrs", multiple=True, metavar="IP",
    help="Addresses TS_TAILNET_TARGET_FQDN resolves to (at run time the netmap resolves it).")


@click.group(invoke_without_command=True)
@click.pass_context
def commands(ctx: click.Context) -> None:
    """Entrypoint for Tailscale containers. Without a subcommand: boot tailscaled and keep its rules."""
    if ctx.invoked_subcommand is None:
        startup.boot()


@commands.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def detect(as_json: bool) -> None:
    """Print the netfilter backend (nf_tables or legacy), then the evidence, one line each."""
    detection = _detection(settings_or_exit())
    click.echo(json.dumps(detection.to_json()) if as_json else "\n".join(detection.lines()))


@commands.command()
@tailnet_ip_option
@target_addr_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--status", "show_status", is_flag=True,
              help="Also print the egress-services / ingress-config.json status a replica would write (JSON).")
def plan(tailnet_ips: tuple[str, ...], target_addrs: tuple[str, ...], as_json: bool, show_status: bool) -> None:
    """Print the rules the environment asks for (proxy settings, egress and ingress services); touches nothing."""
    settings = settings_or_exit()
    result = _plan(settings, tailnet_ips, target_addrs)
    click.echo(json.dumps(result.to_json()) if as_json else str(result))
    if show_status:
        click.echo(json.dumps(_status(settings)))


@commands.command()
@tailnet_ip_option
@target_addr_option
def apply(tailnet_ips: tuple[str, ...], target_addrs: tuple[str, ...]) -> None:
    """Install the rules the environment asks for, in the detected (or forced) backend."""
    from firewall.detect import make_driver

    settings = settings_or_exit()
    detection = _detection(settings)
    result = _plan(settings, tailnet_ips, target_addrs, detection.families)
    try:
        make_driver(detection).apply(result)
    except FirewallError as exc:
        _fail(str(exc))
    log.info(f"applied {len(result.rules)} rules with {detection.backend} ({detection.variant})")


@commands.command()
def flush() -> None:
    """Remove every rule, chain and table containerboot owns, in both backends, and nothing else."""
    from firewall.iptables import IptablesDriver, legacy_tables
    from firewall.nftables import NftablesDriver, open_libnft

    settings = settings_or_exit()
    if settings.fake_netfilter:
        return
    try:
        NftablesDriver(open_libnft(system.nft_path())[0]).flush()
    except (FirewallError, OSError, ImportError) as exc:
        log.info(f"nftables: nothing to flush ({exc})")
    if legacy_tables(4) or legacy_tables(6):
        try:
            IptablesDriver().flush()
        except (FirewallError, ImportError) as exc:
            _fail(str(exc))


@commands.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Print the rules containerboot owns in the detected backend, as read back from the kernel."""
    from containerboot import proxy
    from firewall.detect import make_driver

    settings = settings_or_exit()
    detection = _detection(settings)
    found = make_driver(detection).installed()
    notes = [proxy.cross_family(settings.dest_ip)] if settings.dest_ip else []
    if as_json:
        click.echo(json.dumps({"backend": detection.backend, "rules": found.to_json(), "notes": notes}))
    else:
        click.echo("\n".join([detection.variant, str(found), *notes]))


@commands.command()
def healthcheck() -> None:
    """Exit 0 when the node is healthy (for a Docker HEALTHCHECK), else 1."""
    from containerboot import health

    sys.exit(health.check(settings_or_exit()))
