"""The flags of the pinned `tailscale up` and `tailscale set`, and what TS_EXTRA_ARGS's flags mean for each (pure).

TS_EXTRA_ARGS goes to `tailscale up`, as upstream sends it, but `up` refuses the flags only `set` has
("flag provided but not defined: -auto-update", tailscale/tailscale#18437), and with TS_AUTH_ONCE=true `up`
runs only at a login, so a changed TS_EXTRA_ARGS never reached a logged-in node (#20728). Here each flag is
known for what it is: which command takes it, whether it is a boolean (Go's flag package then takes no
separate value), and what it does (a node setting, a login, or only how the command runs). The boot uses
that to send `up` the flags it takes, to send `tailscale set` the ones only `set` takes, and after an
auth-once login to bring the settings `set` can change to what `tailscale up` would make of the same
variables; settings load refuses a flag neither command takes, before anything starts.

FLAGS is read from the pinned source, tailscale.com v1.102.5 cmd/tailscale/cli: up.go `newUpFlagSet`
(GOOS linux, cmd "up") and set.go `newSetFlagSet` (GOOS linux), with `CleanUpArgs`'s aliases (cli.go) and
up.go's `prefsOfFlag`/`prefsToFlags` for the prefs each flag sets and its default when `up` is not given it.
tests/unit/test_cliflags.py checks it against the real binary's `up --help` and `set --help`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

PINNED = "1.102.5"  # versions.env TAILSCALE_VERSION: the CLI this table was read from

UP, SET, BOTH = "up", "set", "up set"
PREF = "pref"  # sets one of tailscaled's prefs (ipn.Prefs)
LOGIN = "login"  # acts only when `up` logs the node in: `set` cannot change it on a logged-in node
CLI = "cli"  # changes how the command runs (output, waiting, risk prompts), not the node


@dataclass(frozen=True)
class CLIFlag:
    """One flag of the pinned CLI (see FLAGS)."""

    name: str
    commands: str  # UP, SET or BOTH
    boolean: bool  # Go's flag package: `--x` alone means true, a value only as `--x=v`
    role: str  # PREF, LOGIN or CLI
    pref: str = ""  # the ipn.Prefs field (dotted) it sets, as upstream's prefsOfFlag names it
    default: object = None  # that field's JSON value when `tailscale up` is not given the flag
    reset: str = ""  # the `tailscale set` argument that gives the setting `tailscale up`'s default
    hidden: bool = False  # left out of --help (usage starts with "HIDDEN: ")
    build: str = ""  # the build feature it needs: not in a CLI built without it (our image omits qrcodes)

    @property
    def up(self) -> bool:
        return UP in self.commands.split()

    @property
    def set(self) -> bool:
        return SET in self.commands.split()


def _flags(*rows: CLIFlag) -> dict[str, CLIFlag]:
    return {f.name: f for f in rows}


F = CLIFlag
# Order: up.go's newUpFlagSet, then the flags only set.go's newSetFlagSet has. Windows' --unattended is not
# here: the CLI defines it only for GOOS windows.
FLAGS: dict[str, CLIFlag] = _flags(
    F("qr", UP, True, CLI, build="qrcodes"),
    F("qr-format", UP, False, CLI, build="qrcodes"),
    F("auth-key", UP, False, LOGIN),
    F("audience", UP, False, LOGIN),
    F("client-id", UP, False, LOGIN),
    F("client-secret", UP, False, LOGIN),
    F("id-token", UP, False, LOGIN),
    F("login-server", UP, False, LOGIN, "ControlURL"),
    F("accept-routes", BOTH, True, PREF, "RouteAll", False, "--accept-routes=false"),
    F("accept-dns", BOTH, True, PREF, "CorpDNS"),  # containerboot always gives it (TS_ACCEPT_DNS): no reset
    F("host-routes", UP, True, CLI, hidden=True),  # a no-op kept for old scripts: only "true" is accepted
    F("exit-node", BOTH, False, PREF, "ExitNodeID", reset="--exit-node="),
    F("exit-node-allow-lan-access", BOTH, True, PREF, "ExitNodeAllowLANAccess", False,
      "--exit-node-allow-lan-access=false"),
    F("shields-up", BOTH, True, PREF, "ShieldsUp", False, "--shields-up=false"),
    F("ssh", BOTH, True, PREF, "RunSSH", False, "--ssh=false"),
    F("advertise-tags", UP, False, LOGIN, "AdvertiseTags"),  # a tag change re-authenticates (up.go tagsChanged)
    F("hostname", BOTH, False, PREF, "Hostname", "", "--hostname="),
    F("advertise-routes", BOTH, False, PREF, "AdvertiseRoutes", reset="--advertise-routes="),
    F("advertise-connector", BOTH, True, PREF, "AppConnector.Advertise", False, "--advertise-connector=false"),
    F("advertise-exit-node", BOTH, True, PREF, "AdvertiseRoutes", reset="--advertise-exit-node=false"),
    F("report-posture", BOTH, True, PREF, "PostureChecking", False, "--report-posture=false"),
    F("operator", BOTH, False, PREF, "OperatorUser", "", "--operator="),
    F("snat-subnet-routes", BOTH, True, PREF, "NoSNAT", False, "--snat-subnet-routes=true"),
    F("stateful-filtering", BOTH, True, PREF, "NoStatefulFiltering", True, "--stateful-filtering=false"),
    F("netfilter-mode", BOTH, False, PREF, "NetfilterMode", 2, "--netfilter-mode=on"),  # preftype.NetfilterOn
    F("timeout", UP, False, CLI),
    F("json", UP, True, CLI),
    F("reset", UP, True, CLI),
    F("force-reauth", UP, True, LOGIN),
    F("accept-risk", BOTH, False, CLI),
    F("nickname", SET, False, PREF, "ProfileName"),
    F("update-check", SET, True, PREF, "AutoUpdate.Check"),
    F("auto-update", SET, True, PREF, "AutoUpdate.Apply"),
    F("webclient", SET, True, PREF, "RunWebClient"),
    F("remote-config", SET, True, PREF, "RemoteConfig", hidden=True),
    F("sync", SET, True, PREF, "Sync", hidden=True),
    F("relay-server-port", SET, False, PREF, "RelayServerPort"),
    F("relay-server-static-endpoints", SET, False, PREF, "RelayServerStaticEndpoints"),
)
# cli.go CleanUpArgs rewrites these before any command parses its flags.
ALIASES = {"authkey": "auth-key", "posture-checking": "report-posture"}
SECRET_FLAGS = frozenset({"auth-key", "client-secret", "id-token"})  # their value is a credential
GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
            "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
DEFAULT_CONTROL_URL = "https://controlplane.tailscale.com"  # ipn.DefaultControlURL
CONTROL_SYNONYMS = frozenset({DEFAULT_CONTROL_URL, "https://login.tailscale.com"})  # ipn.IsLoginServerSynonym
EXIT_ROUTES = ("0.0.0.0/0", "::/0")


class FlagError(ValueError):
    """A TS_EXTRA_ARGS token the CLI would refuse: `problem` names the flag (never a secret value)."""


@dataclass(frozen=True)
class Given:
    """One flag as TS_EXTRA_ARGS gives it: canonical name, its token(s) as given, its value ("true" for a
    bare boolean)."""

    name: str
    tokens: tuple[str, ...]
    value: str

    @property
    def flag(self) -> CLIFlag:
        return FLAGS[self.name]


def parse(tokens: Sequence[str]) -> tuple[Given, ...]:
    """TS_EXTRA_ARGS's fields as Go's flag package reads them after `tailscale up` (`-x` and `--x` alike; a
    non-boolean flag without `=` takes the next field as its value, whatever it looks like); FlagError for
    what the CLI would refuse: a field that is not a flag, a flag neither command defines, a boolean that
    is not one of Go's, a missing value, a flag given twice. A lone trailing `--` (end of flags) is allowed.
    A second --accept-dns is left to the CLI, as upstream leaves it (settings/validate.py)."""
    out: list[Given] = []
    seen: set[str] = set()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--" and i == len(tokens) - 1:
            break
        if tok == "--":
            raise FlagError(f"{_shown_token(tokens[i + 1])} after --, which ends the flags: the CLI refuses what "
                            "follows as non-flag arguments")
        if len(tok) < 2 or tok[0] != "-":
            raise FlagError(f"{_shown_token(tok)}, which is not a flag: the CLI refuses it as a non-flag "
                            f"argument{_bool_hint(out, tok)}")
        body = tok[2:] if tok.startswith("--") else tok[1:]
        if not body or body[0] in "-=":
            raise FlagError(f"{_shown_token(tok)}: bad flag syntax")
        raw, eq, value = body.partition("=")
        name = ALIASES.get(raw, raw)
        flag = FLAGS.get(name)
        if flag is None:
            raise FlagError(f"--{raw}, which neither 'tailscale up' nor 'tailscale set' takes{_near(raw)}")
        if flag.boolean:
            valid = value == "true" if flag.name == "host-routes" else value in GO_BOOLS
            if eq and not valid and name != "accept-dns":
                raise FlagError(f"--{raw}={_cut(value)}, which is not a boolean (Go's: true, false, 1, 0, t, f)")
            given = Given(name, (tok,), value if eq else "true")
        elif eq:
            given = Given(name, (tok,), value)
        elif i + 1 < len(tokens):
            i += 1
            given = Given(name, (tok, tokens[i]), tokens[i])
        else:
            raise FlagError(f"--{raw} without a value (write --{raw}=<value>)")
        if name in seen and name != "accept-dns":
            raise FlagError(f"--{name} twice: the CLI refuses a flag given more than once")
        seen.add(name)
        out.append(given)
        i += 1
    return tuple(out)


def _bool_hint(out: list[Given], tok: str) -> str:
    """`--accept-routes false`: Go's flag package reads a bare boolean as true and stops at `false`."""
    last = out[-1] if out else None
    if last is None or not last.flag.boolean or "=" in last.tokens[0] or tok not in GO_BOOLS:
        return ""
    return f" (write {last.tokens[0]}={tok}: a boolean flag takes its value after =)"


def _near(name: str) -> str:
    import difflib  # only for a misspelt flag, on the way to exit 1

    near = difflib.get_close_matches(name, sorted(FLAGS), n=1, cutoff=0.7)
    return f" (did you mean --{near[0]}?)" if near else ""


def _cut(value: str, limit: int = 24) -> str:
    return value if len(value) <= limit else value[:limit] + "…"


def _shown_token(tok: str) -> str:
    return '"<redacted>"' if tok.startswith("tskey-") else f'"{_cut(tok)}"'


def shown(tokens: Sequence[str]) -> str:
    """TS_EXTRA_ARGS as it may be printed: the value of a credential flag (either form), of a flag we do not
    know (a misspelt --authkey), and anything that looks like a Tailscale key replaced."""
    out: list[str] = []
    hide_next = False
    for tok in tokens:
        raw, eq, _ = tok.lstrip("-").partition("=")
        name = ALIASES.get(raw, raw)
        secret = tok.startswith("-") and (name in SECRET_FLAGS or name not in FLAGS)
        if hide_next or tok.startswith("tskey-"):
            out.append("<redacted>")
        elif (secret or "tskey-" in tok) and eq:
            out.append(f"{tok.split('=', 1)[0]}=<redacted>")
        else:
            out.append(tok)
        hide_next = tok.startswith("-") and name in SECRET_FLAGS and not eq and not hide_next
    return " ".join(out)


def flat(given: Iterable[Given]) -> list[str]:
    return [t for g in given for t in g.tokens]


def up_tokens(tokens: Sequence[str]) -> list[str]:
    """The fields `tailscale up` gets: every flag it takes, as given and in order (unchanged where all are
    up's, which is every TS_EXTRA_ARGS upstream could boot with)."""
    given = parse(tokens)
    return flat(g for g in given if g.flag.up) + (["--"] if tokens and tokens[-1] == "--" else [])


def set_only(tokens: Sequence[str]) -> tuple[Given, ...]:
    """The flags only `tailscale set` takes: they reach tailscaled through a `tailscale set` after login."""
    return tuple(g for g in parse(tokens) if not g.flag.up)


# ---- tailscaled's prefs against what `tailscale up` would set -------------------------------------------

MISSING = object()
OMITTED_WHEN_EMPTY = {"OperatorUser": "", "AutoExitNode": ""}  # `json:",omitempty"` with "" as their zero


def pref_value(prefs: Mapping[str, object], path: str) -> object:
    """A field of the LocalAPI's prefs JSON by dotted path; MISSING when absent (unknown: we change nothing)."""
    node: object = prefs
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return OMITTED_WHEN_EMPTY.get(path, MISSING)
        node = node[part]
    return node


def _routes(prefs: Mapping[str, object]) -> list[str] | None:
    routes = pref_value(prefs, "AdvertiseRoutes")
    if routes is MISSING:
        return None
    return [str(r) for r in routes] if isinstance(routes, list) else []


def at_default(flag: CLIFlag, prefs: Mapping[str, object]) -> bool | None:
    """Whether the node has `tailscale up`'s default for this setting (up.go prefsToFlags); None: unknown."""
    if flag.name == "exit-node":
        values = [pref_value(prefs, f) for f in ("ExitNodeID", "ExitNodeIP", "AutoExitNode")]
        return None if MISSING in values else all(v in ("", None) for v in values)
    if flag.name in ("advertise-routes", "advertise-exit-node"):
        routes = _routes(prefs)
        if routes is None:
            return None
        if flag.name == "advertise-routes":
            return not [r for r in routes if r not in EXIT_ROUTES]
        return not all(r in routes for r in EXIT_ROUTES)  # tsaddr.ContainsExitRoutes: both /0 routes
    value = pref_value(prefs, flag.pref)
    return None if value is MISSING else value == flag.default


def resets(prefs: Mapping[str, object], named: Iterable[str]) -> list[str]:
    """`tailscale set` arguments that give each setting no variable names `tailscale up`'s default, where the
    node has another value: what `tailscale up` without the flag would set (it would refuse to, asking for
    --reset; `set` has no such check). `named`: the flags the variables give."""
    given = set(named)
    return [f.reset for f in FLAGS.values()
            if f.reset and f.name not in given and at_default(f, prefs) is False]


def _tags(value: str) -> list[str]:
    return [t if ":" in t else f"tag:{t}" for t in value.split(",")] if value else []  # up.go prefsFromUpArgs


def needs_login(given: Iterable[Given], prefs: Mapping[str, object] | None) -> list[str]:
    """The flags `tailscale set` cannot apply to a logged-in node, each as it would need a new login to act:
    --force-reauth, and --login-server and --advertise-tags when they differ from the node's (unknown prefs:
    only --force-reauth). Credentials are left out: they are used at the next login, as TS_AUTHKEY is."""
    by_name = {g.name: g for g in given}
    out = [f"--{g.name}" for g in by_name.values() if g.name == "force-reauth" and GO_BOOLS.get(g.value)]
    if prefs is None:
        return out
    url = pref_value(prefs, "ControlURL")
    want = by_name["login-server"].value if "login-server" in by_name else DEFAULT_CONTROL_URL
    if isinstance(url, str) and url.rstrip("/") != want.rstrip("/") and not {url, want} <= CONTROL_SYNONYMS:
        out.append(f"--login-server={want} (the node's is {url})")
    tags = pref_value(prefs, "AdvertiseTags")
    if tags is not MISSING:
        have = [str(t) for t in tags] if isinstance(tags, list) else []
        want_tags = _tags(by_name["advertise-tags"].value) if "advertise-tags" in by_name else []
        if have != want_tags:
            out.append(f"--advertise-tags={','.join(want_tags)} (the node's: {','.join(have) or 'none'})")
    return out
