"""Host plumbing the boot needs: the TUN device node, IP forwarding sysctls, the socket symlink."""

from __future__ import annotations

import os
import stat

from containerboot.settings import Settings
from firewall.detect import Detection, detect, iptables_version, variant_of
from firewall.paths import which

FORWARDING = {4: "proc/sys/net/ipv4/ip_forward", 6: "proc/sys/net/ipv6/conf/all/forwarding"}
DEFAULT_SOCKET = "/var/run/tailscale/tailscaled.sock"


class ForwardingError(RuntimeError):
    pass


def ensure_tun(s: Settings) -> None:
    """<root>/dev/net/tun as a character device 10:200, created if missing (kernel mode only)."""
    net = s.root_path("dev/net")
    if not os.path.exists(net):
        os.makedirs(net, mode=0o755)
    tun = os.path.join(net, "tun")
    if not os.path.exists(tun):
        os.mknod(tun, mode=stat.S_IFCHR | 0o600, device=os.makedev(10, 200))


def forwarding_families(s: Settings) -> set[int]:
    """Which forwarding sysctls the settings need (upstream: by the families of the targets and routes)."""
    fams: set[int] = set()
    for ip in (s.dest_ip, s.tailnet_target_ip):
        if ip:
            fams.add(ip.version)
    if s.tailnet_target_fqdn:
        fams.add(4)
    fams |= {p.version for p in s.route_prefixes}
    return fams


def enable_forwarding(s: Settings) -> None:
    """Write 1 where the value is not already 1, so read-only but enabled sysctls pass."""
    for fam in sorted(forwarding_families(s)):
        path = s.root_path(FORWARDING[fam])
        try:
            with open(path) as f:
                current = f.read().strip()
        except OSError as exc:
            raise ForwardingError(f'reading "{path}": {exc}') from exc
        if current == "1":
            continue
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError as exc:
            raise ForwardingError(f'enabling "{path}": {exc}') from exc


def forwarding_help(s: Settings) -> str:
    if s.in_kubernetes:
        return ("you can either set the sysctls as a privileged initContainer, or run the tailscale container "
                "with privileged=true.")
    return ("you can fix this by running the container with privileged=true, or the equivalent in your container "
            "runtime that permits access to sysctls.")


def link_socket(s: Settings) -> str | None:
    """Point /var/run/tailscale/tailscaled.sock at TS_SOCKET so the CLI works without --socket.

    Under TS_TEST_ONLY_ROOT the link is made inside the test root (upstream writes the real path)."""
    link = s.root_path(DEFAULT_SOCKET)
    if os.path.abspath(s.socket) == link:
        return None
    try:
        os.makedirs(os.path.dirname(link), mode=0o700, exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(s.socket, link)
    except OSError as exc:
        return (f"[warning] failed to symlink socket: {exc}\n\tTo interact with the Tailscale CLI please use "
                f'`tailscale --socket="{s.socket}"`')
    return None


LEGACY_TOOLS = ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "iptables-restore", "ip6tables-restore")


def legacy_xtables_path(s: Settings) -> str | None:
    """tailscaled in iptables mode runs the `iptables` on its PATH. Where that is iptables-nft, its rules
    would land in nf_tables while ours are legacy: a directory of *-legacy links put first on its PATH
    keeps both in one backend. None when PATH already gives legacy (or there is no iptables-legacy)."""
    version = iptables_version()
    if version is not None and variant_of(version) == "legacy":
        return None
    shim = s.root_path("run/containerboot/xtables-legacy")
    os.makedirs(shim, exist_ok=True)
    for tool in LEGACY_TOOLS:
        target = which(tool.replace("tables", "tables-legacy", 1))
        if target is None:
            return None
        link = os.path.join(shim, tool)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(target, link)
    return shim


def nft_path() -> str | None:
    """CONTAINERBOOT_NFT: "binding" or "cli" forces that libnftables path (None: the binding when it imports)."""
    return os.environ.get("CONTAINERBOOT_NFT") or None


def detect_firewall(s: Settings) -> Detection:
    """The netfilter backend for these settings, as the boot and the subcommands both detect it."""
    return detect(s.firewall_mode, nft_path(), fake=s.fake_netfilter, fake_ipv6=s.fake_netfilter_6)
