"""Which netfilter backend to program, and the evidence for it.

Precedence: the override (TS_DEBUG_FIREWALL_MODE=iptables|nftables); then rules that already exist
in this network namespace in exactly one backend (kube-proxy's hint chains first, then rule
counts); then the variant `iptables -V` on PATH reports. The choice must pass a kernel probe
(create and delete an owned NAT chain or table); if it fails the other backend is probed and used.
Nothing here loads kernel modules, and nothing runs at all in fake mode.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from firewall.model import FirewallBusy, FirewallError

BACKENDS = ("iptables", "nftables")
VARIANT = {"nftables": "nf_tables", "iptables": "legacy"}
KUBE_HINTS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


class DetectionError(RuntimeError):
    """No usable backend; the message says what was tried."""


@dataclass(frozen=True)
class Census:
    rules: int
    hints: tuple[str, ...] = ()
    error: str | None = None  # the backend could not be read at all


@dataclass(frozen=True)
class Detection:
    backend: str
    evidence: tuple[str, ...]
    families: tuple[int, ...] = (4, 6)
    nft_path: str | None = None  # "binding" or "cli" when the backend is nftables
    fake: bool = False

    @property
    def variant(self) -> str:
        return VARIANT[self.backend]

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "variant": self.variant, "evidence": list(self.evidence),
                "families": list(self.families), "nft_path": self.nft_path, "fake": self.fake}

    def lines(self) -> list[str]:
        return [self.variant, *self.evidence]


def _other(backend: str) -> str:
    return "iptables" if backend == "nftables" else "nftables"


@dataclass
class Probes:
    """Everything detection asks the system; tests replace single entries (e.g. a failing probe)."""

    nft_path: str | None = None  # force "binding" or "cli"
    probe: dict[str, Callable[[int], None]] = field(default_factory=dict)
    census: dict[str, Callable[[], Census]] = field(default_factory=dict)
    iptables_version: Callable[[], str | None] | None = None
    _libnft: Any = None
    _libnft_why: str = ""
    _iptables: Any = None

    def libnft(self) -> Any:
        if self._libnft is None:
            from firewall.nftables import open_libnft

            self._libnft, self._libnft_why = open_libnft(self.nft_path)
        return self._libnft

    def iptables(self) -> Any:
        """One driver (two worker processes) for every iptables probe and census of this detection."""
        if self._iptables is None:
            from firewall.iptables import IptablesDriver

            self._iptables = IptablesDriver()
        return self._iptables

    def close(self) -> None:
        if self._iptables is not None:
            self._iptables.close()
            self._iptables = None

    def run_probe(self, backend: str, fam: int) -> None:
        """Raises FirewallError when `backend` cannot do NAT for `fam` here."""
        try:
            if backend in self.probe:
                self.probe[backend](fam)
            elif backend == "nftables":
                from firewall.nftables import NftablesDriver

                NftablesDriver(self.libnft(), (fam,)).probe(fam)
            else:
                self.iptables().probe(fam)
        except FirewallError:
            raise
        except Exception as exc:  # noqa: BLE001 - a missing library or binary is a failed probe
            raise FirewallError(f"{type(exc).__name__}: {exc}") from exc

    def run_census(self, backend: str) -> Census:
        if backend in self.census:
            return self.census[backend]()
        try:
            return _nft_census(self.libnft()) if backend == "nftables" else self._ipt_census()
        except Exception as exc:  # noqa: BLE001 - an unreadable backend is evidence, not a crash
            return Census(0, error=str(exc))

    def _ipt_census(self) -> Census:
        from firewall.xtables import tables

        if not (tables(4) or tables(6)):
            return Census(0)  # no legacy table was ever opened here: nothing to count, no process to start
        rows = self.iptables().census()
        hints = tuple(f"ipv{fam} {table}/{chain}" for fam, table, chain, _ in rows if chain in KUBE_HINTS)
        return Census(sum(n for *_, n in rows), hints)

    def version(self) -> str | None:
        return self.iptables_version() if self.iptables_version else iptables_version()


def _nft_census(libnft: Any) -> Census:
    objs = libnft.run([{"list": {"ruleset": {}}}], terse=True)
    rules = sum(1 for o in objs if "rule" in o and not o["rule"].get("table", "").startswith("containerboot"))
    hints = tuple(f"{c['family']} {c['table']}/{c['name']}" for o in objs
                  if (c := o.get("chain")) and c.get("name") in KUBE_HINTS)
    return Census(rules, hints)


def iptables_version() -> str | None:
    """What `iptables -V` on PATH prints, or None when there is no iptables."""
    exe = shutil.which("iptables")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    return (out.stdout or out.stderr).strip()


def variant_of(version: str) -> str:
    """nf_tables or legacy, as `iptables -V` reports it; a pre-1.8 binary has no suffix and is legacy."""
    found = re.search(r"\((nf_tables|legacy)\)", version)
    return found.group(1) if found else "legacy"


def _from_rules(probes: Probes) -> tuple[str | None, list[str]]:
    counts = {b: probes.run_census(b) for b in BACKENDS}
    notes = [f"{VARIANT[b]} rules in this namespace: "
             + (f"unreadable ({c.error})" if c.error else f"{c.rules}"
                + (f", kube-proxy hint chains {', '.join(c.hints)}" if c.hints else ""))
             for b, c in counts.items()]
    hinted = [b for b, c in counts.items() if c.hints]
    if len(hinted) == 1:
        return hinted[0], [*notes, f"kube-proxy marks the host's iptables as {VARIANT[hinted[0]]}"]
    used = [b for b, c in counts.items() if c.rules]
    if len(used) == 1:
        return used[0], [*notes, f"only {VARIANT[used[0]]} holds rules here"]
    return None, notes


def detect(env: Mapping[str, str], probes: Probes | None = None, fake: bool = False,
           fake_ipv6: bool = True) -> Detection:
    mode = env.get("TS_DEBUG_FIREWALL_MODE", "").strip().lower()
    if fake:
        backend = mode if mode in BACKENDS else "iptables"
        return Detection(backend, ("TS_TEST_FAKE_NETFILTER=true: in-memory fake driver, nothing probed",),
                         (4, 6) if fake_ipv6 else (4,), fake=True)
    if probes is not None:
        return _detect(mode, probes)
    own = Probes(nft_path=env.get("CONTAINERBOOT_NFT") or None)
    try:
        return _detect(mode, own)
    finally:
        own.close()


def _detect(mode: str, probes: Probes) -> Detection:

    evidence: list[str] = []
    forced = mode in BACKENDS
    if forced:
        choice = mode
        evidence.append(f"TS_DEBUG_FIREWALL_MODE={mode}")
    else:
        found, evidence = _from_rules(probes)
        version = probes.version() if found is None else ""
        if found is not None:
            choice = found
        elif version is None:
            choice = "nftables"
            evidence.append("no iptables on PATH")
        else:
            choice = "nftables" if variant_of(version) == "nf_tables" else "iptables"
            evidence.append(f"iptables -V: {version}")

    try:
        probes.run_probe(choice, 4)
        evidence.append(f"{VARIANT[choice]} NAT probe passed")
    except FirewallBusy as busy:
        # Someone holds the xtables lock: they are using this backend now, which is evidence enough.
        evidence.append(f"{VARIANT[choice]} NAT probe not run ({busy})")
    except FirewallError as first:
        if forced:
            raise DetectionError(
                f"TS_DEBUG_FIREWALL_MODE={mode} but {VARIANT[choice]} NAT does not work in this kernel: "
                f"{first}; unset it to detect the backend, or set it to {_other(choice)}") from first
        other = _other(choice)
        try:
            probes.run_probe(other, 4)
        except FirewallError as second:
            hint = ""
            if any(w in f"{first} {second}" for w in ("Operation not permitted", "Permission denied")):
                hint = ("; this needs the NET_ADMIN capability (docker run --cap-add NET_ADMIN; Compose cap_add: "
                        "[NET_ADMIN]; Kubernetes securityContext.capabilities.add: [NET_ADMIN]), or TS_USERSPACE=true")
            raise DetectionError(f"no usable netfilter backend: {VARIANT[choice]} NAT probe failed: {first}; "
                                 f"{VARIANT[other]} NAT probe failed: {second}{hint}") from second
        evidence.append(f"{VARIANT[choice]} NAT probe failed ({first}); {VARIANT[other]} NAT probe passed")
        choice = other

    families = [4]
    try:
        probes.run_probe(choice, 6)
        families.append(6)
    except FirewallBusy as busy:
        families.append(6)
        evidence.append(f"IPv6 NAT probe not run ({busy}); IPv6 taken as usable")
    except FirewallError as exc:
        evidence.append(f"IPv6 NAT unavailable in {VARIANT[choice]} ({exc}); IPv6 rules are skipped")

    nft_path = None
    if choice == "nftables":
        lib = probes.libnft()
        nft_path = lib.path
        evidence.append(probes._libnft_why or f"libnftables path: {nft_path}")
    return Detection(choice, tuple(evidence), tuple(families), nft_path)


def make_driver(detection: Detection, probes: Probes | None = None) -> Any:
    """The driver for a detection (imports only the chosen backend's library)."""
    if detection.fake:
        from firewall.fake import FakeDriver

        return FakeDriver(detection.backend, detection.families)
    if detection.backend == "nftables":
        from firewall.nftables import NftablesDriver, open_libnft

        lib = probes.libnft() if probes else open_libnft(detection.nft_path)[0]
        return NftablesDriver(lib, detection.families)
    from firewall.iptables import IptablesDriver

    return IptablesDriver(detection.families)
