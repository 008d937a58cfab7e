"""Rebuilds the rulesets in tests/foreign/data/ from their sources (listed in data/SOURCES.md).

Not a test: run it by hand, as root (it loads every candidate rule into a scratch network namespace to keep
only what this kernel accepts), with the source repositories as git directories:

    .venv/bin/python -m tests.foreign.build_data --net-network DIR --iptables DIR

`--net-network` is github.com/diekmann/net-network, `--iptables` a copy of netfilter's iptables (the AOSP
mirror github.com/aosp-mirror/platform_external_iptables carries it); the kube-proxy dumps come from
data/transcribed/ (see SOURCES.md).

Each output is what `iptables-legacy-save` prints after the converted ruleset was loaded, without its
comment lines and with every counter zero: the tests put their own counters in when they load it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).with_name("data")
RESTORE = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}
SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
# Extensions whose rules make objects outside the network namespace (sysfs timers, LED triggers): left out.
GLOBAL_STATE = re.compile(r"-j (IDLETIMER|LED)\b")


@dataclass
class Table:
    name: str
    chains: dict[str, str] = field(default_factory=dict)  # chain -> policy ("-" for a user chain)
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, the rule after "-A CHAIN ")

    def text(self) -> str:
        lines = [f"*{self.name}"]
        lines += [f":{c} {p} [0:0]" for c, p in self.chains.items()]
        lines += [f"-A {c} {r}".rstrip() for c, r in self.rules]
        return "\n".join([*lines, "COMMIT", ""])


Ruleset = dict[str, Table]


def parse(text: str) -> Ruleset:
    """An iptables-save dump (counters and comments dropped)."""
    out: Ruleset = {}
    table: Table | None = None
    for raw in text.splitlines():
        line = re.sub(r"^\[\d+:\d+\]\s*", "", raw.strip())
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = out.setdefault(line[1:], Table(line[1:]))
        elif table is None:
            raise ValueError(f"outside a table: {raw!r}")
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            table.chains[name] = policy
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            table.rules.append((chain, rest[0] if rest else ""))
        else:
            raise ValueError(f"not a rule: {raw!r}")
    return out


def declare_missing(rules: Ruleset) -> None:
    """Chains that get rules but were never declared (a partial dump) become user chains."""
    for table in rules.values():
        for chain, _ in table.rules:
            if chain not in table.chains:
                table.chains[chain] = "ACCEPT" if chain in BUILTIN else "-"


def jumps(rule: str) -> set[str]:
    try:
        words = shlex.split(rule)
    except ValueError:
        return set()
    return {b for a, b in itertools.pairwise(words) if a in ("-j", "-g", "--jump", "--goto")}


def transplant(rules: Ruleset, src: str, dst: str, moves: dict[str, str], first: int) -> None:
    """Copy the first `first` rules of each built-in chain in `moves` from table `src` to the built-in chain it
    names in `dst` (appended), with every user chain they reach, so that `dst` holds rules nobody wrote for it.
    The kernel filter later drops what `dst` cannot hold (REJECT outside filter, DROP in nat, -o in PREROUTING)."""
    s = rules[src]
    d = rules.setdefault(dst, Table(dst))
    copied: list[tuple[str, str]] = []
    for base, to in moves.items():
        copied += [(to, r) for c, r in s.rules if c == base][:first]
        d.chains.setdefault(to, "ACCEPT")
    wanted, todo = set(), [j for _, r in copied for j in jumps(r)]
    while todo:
        chain = todo.pop()
        if chain in wanted or s.chains.get(chain) != "-" or chain in d.chains:
            continue
        wanted.add(chain)
        todo += [j for c, r in s.rules if c == chain for j in jumps(r)]
    for chain in sorted(wanted):
        d.chains[chain] = "-"
    d.rules += copied + [(c, r) for c, r in s.rules if c in wanted]


# ---- iptables' extension tests -----------------------------------------------------------------------------


def extension_tests(repo: Path, commit: str, fam: int) -> Ruleset:
    """The rules iptables' own tests (extensions/*.t) expect to load in the legacy variant, each in every chain
    its file lists: libxt_* for both families, libipt_* and iptables.t for IPv4, libip6t_* for IPv6."""
    names = git(repo, "ls-tree", "--name-only", commit, "extensions/").split()
    mine = re.compile(r"extensions/(libxt_|iptables\.t$|libipt_)" if fam == 4 else r"extensions/(libxt_|libip6t_)")
    out: Ruleset = {}
    for name in sorted(n for n in names if n.endswith(".t") and mine.match(n)):
        table, chains = "filter", []
        for line in git(repo, "show", f"{commit}:{name}").splitlines():
            if not line.strip() or line[0] in "#@%":
                continue
            if line[0] == ":":
                chains = line[1:].strip().split(",")
                continue
            if line[0] == "*":
                table = line[1:].strip()
                continue
            fields = line.rstrip("\n").split(";")
            if len(fields) < 3 or not want_ok(fields):
                continue
            t = out.setdefault(table, Table(table))
            for chain in chains:
                t.chains.setdefault(chain, "ACCEPT")
                t.rules.append((chain, fields[0].strip()))
    return out


def want_ok(fields: list[str]) -> bool:
    """Whether a .t line expects the rule to load with iptables-legacy: the third field, unless a fourth names
    the nft variant only (then a fifth gives the legacy answer, or it is the opposite)."""
    result = fields[2].strip()
    if len(fields) > 3 and fields[3].strip() == "NFT":
        if len(fields) > 4 and fields[4].strip():
            result = fields[4].strip()
        else:
            result = "FAIL" if result == "OK" else "OK"
    return result == "OK"


# ---- the kernel's verdict ----------------------------------------------------------------------------------


class Scratch:
    """A network namespace of our own for trying rules; removed on exit."""

    def __init__(self) -> None:
        self.name = f"cbforeign-build-{os.getpid()}"

    def __enter__(self) -> Scratch:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def run(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], input=stdin, capture_output=True,
                              text=True, timeout=120)

    def loads(self, fam: int, table: Table) -> bool:
        return self.run(RESTORE[fam], stdin=table.text()).returncode == 0

    def keep_loadable(self, fam: int, rules: Ruleset) -> list[str]:
        """Remove the rules this kernel (or iptables) refuses, by halving the batches that fail; returns them."""
        refused: list[str] = []
        for table in rules.values():
            table.rules = [(c, r) for c, r in table.rules if not GLOBAL_STATE.search(r)]

            def good(batch: list[tuple[str, str]], table: Table = table) -> list[tuple[str, str]]:
                if self.loads(fam, Table(table.name, table.chains, batch)):
                    return batch
                if len(batch) == 1:
                    refused.append(f"{table.name}: -A {batch[0][0]} {batch[0][1]}")
                    return []
                half = len(batch) // 2
                return good(batch[:half]) + good(batch[half:])

            table.rules = good(table.rules) if table.rules else []
            if not self.loads(fam, table):
                raise RuntimeError(f"{table.name}: the rules that load one by one do not load together")
        return refused

    def canonical(self, fam: int, rules: Ruleset) -> str:
        """Load the ruleset (each table replaced whole) and return what iptables-save prints of its tables,
        without comment lines; loaded and saved again until that no longer changes it (iptables 1.8.9 prints
        `-m ipcomp` for a rule that, loaded again, prints `-m ipcomp --ipcompspi 0`)."""
        text = "".join(t.text() for t in rules.values())
        for _ in range(3):
            proc = self.run(RESTORE[fam], stdin=text)
            if proc.returncode:
                raise RuntimeError(proc.stderr)
            saved = self.run(SAVE[fam]).stdout
            blocks = [b for b in re.split(r"(?m)^(?=\*)", re.sub(r"(?m)^#.*\n", "", saved)) if b.strip()]
            again = "".join(b for b in blocks if b.split("\n", 1)[0][1:] in rules)
            if again == text:
                return text
            text = again
        raise RuntimeError("iptables-save does not settle on one form of this ruleset")


# ---- the datasets ----------------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


NET_NETWORK_COMMIT = "0fb55c5258a2966eb2f818471def853b43356ebb"
IPTABLES_COMMIT = "672d4a9452846646a3017d255fae319e12d92295"


def datasets(args: argparse.Namespace) -> dict[str, tuple[int, Ruleset]]:
    """{file name: (family, converted ruleset)} before the kernel's filter."""
    nn = Path(args.net_network)

    def dump(path: str) -> Ruleset:
        return parse(git(nn, "show", f"{NET_NETWORK_COMMIT}:{path}"))

    out: dict[str, tuple[int, Ruleset]] = {}
    # Only the collection's rulesets whose licence allows commercial use (data/SOURCES.md).
    for name, path in (("openlab", "configs_openlab/stettenstr/doku/iptables-save.txt"),
                       ("tails", "configs_tails_os/feature_various-firewall-hardening_ferm.conf.iptables-save")):
        out[f"{name}.v4"] = (4, dump(path))
    for fam in (4, 6):
        ext = extension_tests(Path(args.iptables), IPTABLES_COMMIT, fam)
        transplant(ext, "filter", "mangle", {"FORWARD": "FORWARD"}, 150)
        transplant(ext, "filter", "nat", {"FORWARD": "PREROUTING", "OUTPUT": "POSTROUTING"}, 80)
        out[f"extensions.v{fam}"] = (fam, ext)
    for name in ("kube-proxy", "kube-portals"):
        out[f"{name}.v4"] = (4, parse((DATA / "transcribed" / f"{name}.txt").read_text()))
    for _, rules in out.values():
        declare_missing(rules)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net-network", required=True)
    parser.add_argument("--iptables", required=True)
    parser.add_argument("--only", nargs="*", help="build only these files")
    args = parser.parse_args()
    for name, (fam, rules) in datasets(args).items():
        if args.only and name not in args.only:
            continue
        with Scratch() as scratch:
            refused = scratch.keep_loadable(fam, rules)
            text = scratch.canonical(fam, rules)
        (DATA / name).write_text(text)
        count = sum(1 for line in text.splitlines() if line.startswith("-A "))
        print(f"{name}: {count} rules kept, {len(refused)} refused", file=sys.stderr)
        for line in refused:
            print(f"  refused {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
