"""Which netfilter backend to program, and the evidence for it.

Precedence: the override (TS_DEBUG_FIREWALL_MODE=iptables|nftables); then rules that already exist
in this network namespace in exactly one backend (kube-proxy's hint chains first, then rule
counts); then the variant `iptables -V` on PATH reports. The choice must pass a kernel probe
(create and delete an owned NAT chain or table); if it fails the other backend is probed and used.
Nothing here loads kernel modules, and nothing runs at all in fake mode.

The decision is one pure function, `decide(Facts)`, in the manner of upstream's
pickFirewallModeFromInstalledRules: it answers with a `Detection`, raises DetectionError, or asks
for the one fact it lacks (`Ask`), which `detect` then gathers from the system. So a probe runs only
when the decision needs it (probing legacy iptables instantiates its nat table), and the unit tests
hold the decision to a table of facts without root.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from firewall.model import Driver, FirewallBusy, FirewallError
from firewall.paths import which

if TYPE_CHECKING:
    from firewall.iptables import IptablesDriver
    from firewall.nftables_kernel import Libnft

BACKENDS = ("iptables", "nftables")
VARIANT = {"nftables": "nf_tables", "iptables": "legacy"}
KUBE_HINTS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
NET_ADMIN_HINT = ("; this needs the NET_ADMIN capability (docker run --cap-add NET_ADMIN; Compose cap_add: "
                  "[NET_ADMIN]; Kubernetes securityContext.capabilities.add: [NET_ADMIN]), or TS_USERSPACE=true")


class DetectionError(RuntimeError):
    """No usable backend; the message says what was tried."""


@dataclass(frozen=True)
class Census:
    """How many rules one backend holds, and what they hint at."""

    rules: int
    hints: tuple[str, ...] = ()
    error: str | None = None  # the backend could not be read at all


@dataclass(frozen=True)
class Detection:
    """The backend chosen, the evidence for it, and the address families it serves."""

    backend: str
    evidence: tuple[str, ...]
    families: tuple[int, ...] = (4, 6)
    nft_path: str | None = None  # "binding" or "cli" when the backend is nftables
    fake: bool = False

    @property
    def variant(self) -> str:
        return VARIANT[self.backend]

    def to_json(self) -> dict[str, object]:
        return {"backend": self.backend, "variant": self.variant, "evidence": list(self.evidence),
                "families": list(self.families), "nft_path": self.nft_path, "fake": self.fake}

    def lines(self) -> list[str]:
        return [self.variant, *self.evidence]


# ---- the decision (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """How a kernel probe of one backend and family went."""

    outcome: Literal["passed", "failed", "busy"]  # busy: another program holds the lock, so it uses the backend
    message: str = ""


@dataclass(frozen=True)
class Ask:
    """The fact `decide` needs next: "census" (rules in both backends), "version" (`iptables -V`),
    "probe" (of `backend` for `family`) or "libnft" (which libnftables path the nftables driver uses)."""

    what: Literal["census", "version", "probe", "libnft"]
    backend: str = ""
    family: int = 4


UNKNOWN = "?"  # a fact not gathered yet


@dataclass(frozen=True)
class Facts:
    """Everything detection learned from the system: the input of the pure `decide`."""

    override: str = ""  # TS_DEBUG_FIREWALL_MODE, lower case
    census: Mapping[str, Census] | None = None  # by backend
    version: str | None = UNKNOWN  # what `iptables -V` printed; None: no iptables on PATH
    probes: Mapping[tuple[str, int], Probe] = field(default_factory=dict)  # by (backend, family)
    libnft: tuple[str, str] | None = None  # (path, why) for the nftables driver


def variant_of(version: str) -> str:
    """nf_tables or legacy, as `iptables -V` reports it; a pre-1.8 binary has no suffix and is legacy."""
    found = re.search(r"\((nf_tables|legacy)\)", version)
    return found.group(1) if found else "legacy"


def _other(backend: str) -> str:
    return "iptables" if backend == "nftables" else "nftables"


def from_rules(census: Mapping[str, Census]) -> tuple[str | None, list[str]]:
    """The backend the rules already in this namespace point to, if exactly one, and the evidence."""
    notes = [f"{VARIANT[b]} rules in this namespace: "
             + (f"unreadable ({c.error})" if c.error else f"{c.rules}"
                + (f", kube-proxy hint chains {', '.join(c.hints)}" if c.hints else ""))
             for b, c in census.items()]
    hinted = [b for b, c in census.items() if c.hints]
    if len(hinted) == 1:
        return hinted[0], [*notes, f"kube-proxy marks the host's iptables as {VARIANT[hinted[0]]}"]
    used = [b for b, c in census.items() if c.rules]
    if len(used) == 1:
        return used[0], [*notes, f"only {VARIANT[used[0]]} holds rules here"]
    return None, notes


def decide(facts: Facts) -> Detection | Ask:
    """The backend and its evidence from what is known so far, or the next fact to find out. Each step
    answers with its result and the evidence it adds, or with the fact it lacks, which stops the decision
    there until `detect` has gathered it."""
    preferred = _preferred(facts)
    if isinstance(preferred, Ask):
        return preferred
    probed = _probed(facts, preferred[0])
    if isinstance(probed, Ask):
        return probed
    choice = probed[0]
    families = _families(facts, choice)
    if isinstance(families, Ask):
        return families
    path = _libnft_path(facts, choice)
    if isinstance(path, Ask):
        return path
    evidence = (*preferred[1], *probed[1], *families[1], *path[1])
    return Detection(choice, evidence, families[0], path[0])


def _preferred(facts: Facts) -> tuple[str, list[str]] | Ask:
    """The backend to try first: the override, else the one the rules here point to, else `iptables -V`'s."""
    mode = facts.override
    if mode in BACKENDS:
        return mode, [f"TS_DEBUG_FIREWALL_MODE={mode}"]
    if facts.census is None:
        return Ask("census")
    found, evidence = from_rules(facts.census)
    if found is not None:
        return found, evidence
    if facts.version == UNKNOWN:
        return Ask("version")
    if facts.version is None:
        return "nftables", [*evidence, "no iptables on PATH"]
    choice = "nftables" if variant_of(facts.version) == "nf_tables" else "iptables"
    return choice, [*evidence, f"iptables -V: {facts.version}"]


def _probed(facts: Facts, choice: str) -> tuple[str, list[str]] | Ask:
    """`choice` when its IPv4 NAT probe passes (or another program holds its lock), else the other backend
    when its probe does not fail; neither, or an override that fails its probe, is a DetectionError."""
    first = facts.probes.get((choice, 4))
    if first is None:
        return Ask("probe", choice, 4)
    if first.outcome == "passed":
        return choice, [f"{VARIANT[choice]} NAT probe passed"]
    if first.outcome == "busy":
        # Someone holds the xtables lock: they are using this backend now, which is evidence enough.
        return choice, [f"{VARIANT[choice]} NAT probe not run ({first.message})"]
    if facts.override in BACKENDS:
        raise DetectionError(
            f"TS_DEBUG_FIREWALL_MODE={facts.override} but {VARIANT[choice]} NAT does not work in this kernel: "
            f"{first.message}; unset it to detect the backend, or set it to {_other(choice)}")
    other = _other(choice)
    second = facts.probes.get((other, 4))
    if second is None:
        return Ask("probe", other, 4)
    if second.outcome == "failed":
        both = f"{first.message} {second.message}"
        hint = NET_ADMIN_HINT if "Operation not permitted" in both or "Permission denied" in both else ""
        raise DetectionError(f"no usable netfilter backend: {VARIANT[choice]} NAT probe failed: "
                             f"{first.message}; {VARIANT[other]} NAT probe failed: {second.message}{hint}")
    return other, [f"{VARIANT[choice]} NAT probe failed ({first.message}); {VARIANT[other]} NAT probe "
                   + ("passed" if second.outcome == "passed" else f"not run ({second.message})")]


def _families(facts: Facts, choice: str) -> tuple[tuple[int, ...], list[str]] | Ask:
    """Both address families, unless the backend's IPv6 NAT probe failed."""
    six = facts.probes.get((choice, 6))
    if six is None:
        return Ask("probe", choice, 6)
    if six.outcome == "busy":
        return (4, 6), [f"IPv6 NAT probe not run ({six.message}); IPv6 taken as usable"]
    if six.outcome == "failed":
        return (4,), [f"IPv6 NAT unavailable in {VARIANT[choice]} ({six.message}); IPv6 rules are skipped"]
    return (4, 6), []


def _libnft_path(facts: Facts, choice: str) -> tuple[str | None, list[str]] | Ask:
    """The libnftables path ("binding" or "cli") when the backend is nftables."""
    if choice != "nftables":
        return None, []
    if facts.libnft is None:
        return Ask("libnft")
    nft_path, why = facts.libnft
    return nft_path, [why or f"libnftables path: {nft_path}"]


# ---- gathering the facts ----------------------------------------------------------------------------


@dataclass
class Probes:
    """Everything detection asks the system; tests replace single entries (e.g. a failing probe)."""

    nft_path: str | None = None  # force "binding" or "cli"
    probe: dict[str, Callable[[int], None]] = field(default_factory=dict)
    census: dict[str, Callable[[], Census]] = field(default_factory=dict)
    iptables_version: Callable[[], str | None] | None = None
    _libnft: Libnft | None = None
    _libnft_why: str = ""
    _iptables: IptablesDriver | None = None

    def libnft(self) -> Libnft:
        if self._libnft is None:
            from firewall.nftables_kernel import open_libnft

            self._libnft, self._libnft_why = open_libnft(self.nft_path)
        return self._libnft

    def iptables(self) -> IptablesDriver:
        """One driver for every iptables probe and census of this detection."""
        if self._iptables is None:
            from firewall.iptables import IptablesDriver

            self._iptables = IptablesDriver()
        return self._iptables

    def close(self) -> None:
        if self._iptables is not None:
            self._iptables.close()
            self._iptables = None

    def run_probe(self, backend: str, fam: int) -> Probe:
        try:
            if backend in self.probe:
                self.probe[backend](fam)
            elif backend == "nftables":
                from firewall.nftables import NftablesDriver

                NftablesDriver(self.libnft(), (fam,)).probe(fam)
            else:
                self.iptables().probe(fam)
        except FirewallBusy as exc:
            return Probe("busy", str(exc))
        except FirewallError as exc:
            return Probe("failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - a missing library or binary is a failed probe
            return Probe("failed", f"{type(exc).__name__}: {exc}")
        return Probe("passed")

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

    def answer(self, facts: Facts, ask: Ask) -> Facts:
        match ask.what:
            case "census":
                return replace(facts, census={b: self.run_census(b) for b in BACKENDS})
            case "version":
                return replace(facts, version=self.version())
            case "probe":
                return replace(facts, probes={**facts.probes, (ask.backend, ask.family):
                                              self.run_probe(ask.backend, ask.family)})
            case "libnft":
                lib = self.libnft()
                return replace(facts, libnft=(lib.path, self._libnft_why))


def _nft_census(libnft: Libnft) -> Census:
    objs = libnft.run([{"list": {"ruleset": {}}}], terse=True)
    rules = sum(1 for o in objs if "rule" in o and not o["rule"].get("table", "").startswith("containerboot"))
    hints = tuple(f"{c['family']} {c['table']}/{c['name']}" for o in objs
                  if (c := o.get("chain")) and c.get("name") in KUBE_HINTS)
    return Census(rules, hints)


def iptables_version() -> str | None:
    """What `iptables -V` on PATH prints, or None when there is no iptables."""
    exe = which("iptables")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    return (out.stdout or out.stderr).strip()


def detect(mode: str = "", nft_path: str | None = None, probes: Probes | None = None, fake: bool = False,
           fake_ipv6: bool = True) -> Detection:
    """The backend for `mode` (Settings.firewall_mode: TS_DEBUG_FIREWALL_MODE as validated, "" or "auto" to
    detect); `nft_path` forces the libnftables path ("binding" or "cli")."""
    if fake:
        backend = mode if mode in BACKENDS else "iptables"
        return Detection(backend, ("TS_TEST_FAKE_NETFILTER=true: in-memory fake driver, nothing probed",),
                         (4, 6) if fake_ipv6 else (4,), fake=True)
    own = probes is None
    gather = probes or Probes(nft_path=nft_path)
    facts = Facts(override=mode)
    try:
        while not isinstance(step := decide(facts), Detection):
            facts = gather.answer(facts, step)
        return step
    finally:
        if own:
            gather.close()


def make_driver(detection: Detection, probes: Probes | None = None) -> Driver:
    """The driver for a detection (imports only the chosen backend's library)."""
    if detection.fake:
        from firewall.fake import FakeDriver

        return FakeDriver(detection.backend, detection.families)
    if detection.backend == "nftables":
        from firewall.nftables import NftablesDriver
        from firewall.nftables_kernel import open_libnft

        lib = probes.libnft() if probes else open_libnft(detection.nft_path)[0]
        return NftablesDriver(lib, detection.families)
    from firewall.iptables import IptablesDriver

    return IptablesDriver(detection.families)
