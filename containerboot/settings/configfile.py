"""TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR at load time: which cap-<N>.hujson tailscaled gets, and whether
its fields are ones the pinned tailscaled accepts.

Both depend on the pinned tailscale (its capability version, its ipn.ConfigVAlpha fields), so they are
kept together and apart from __init__.py; the loader picks the file, the checks (validate.py) read it in
upstream's order. Watching the directory for a new version at run time is kube/configdir.py's.
"""

from __future__ import annotations

import json
import os
import posixpath
import re

from containerboot.settings.values import parse_hujson
from containerboot.settings.variables import VARIABLES, ConfigError

# tailcfg.CurrentCapabilityVersion of the pinned tailscale (versions.env); picks cap-<N>.hujson.
CAPABILITY_VERSION = 142

# Fields of ipn.ConfigVAlpha in the pinned tailscale; tailscaled rejects others.
CONFIG_FIELDS = {f.lower() for f in (
    "Version Locked ServerURL AuthKey Enabled OperatorUser Hostname AcceptDNS AcceptRoutes ExitNode "
    "AllowLANWhileUsingExitNode AdvertiseRoutes AdvertiseExitNode DisableSNAT AdvertiseServices AppConnector "
    "NetfilterMode NoStatefulFiltering PostureChecking RunSSHServer RunWebClient ShieldsUp RemoteConfig "
    "AutoUpdate ServeConfigTemp StaticEndpoints RelayServerPort RelayServerStaticEndpoints").split()}

CONFIG_DIR = "TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR"


def _config_error(cfg_dir: str, message: str) -> ConfigError:
    """Upstream's message, then the variable, its value and the valid form."""
    return ConfigError(CONFIG_DIR, f"{message} ({CONFIG_DIR}={json.dumps(cfg_dir)}; expected "
                                   f"{VARIABLES[CONFIG_DIR]})")


def pick_config_file(cfg_dir: str) -> tuple[str, str]:
    """The cap-<N>.hujson to use (largest N not above our capability version), and the log line.
    The directory is used as given, like upstream: the test root applies only to fixed system paths."""
    real = cfg_dir
    try:
        names = os.listdir(real)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise _config_error(cfg_dir, f"error reading tailscaled config directory {json.dumps(cfg_dir)}: "
                                     f"{reason}") from None
    best = -1
    for name in names:
        if os.path.isdir(os.path.join(real, name)):
            continue
        m = re.fullmatch(r"cap-(\d+)\.hujson", name)
        cap = int(m.group(1)) if m else (0 if name == "tailscaled" else -1)
        if best < cap <= CAPABILITY_VERSION:
            best = cap
    if best < 0:
        raise _config_error(cfg_dir, f"no tailscaled config file found in {json.dumps(cfg_dir)} for current "
                                     f"capability version {CAPABILITY_VERSION}")
    path = posixpath.normpath(posixpath.join(cfg_dir, f"cap-{best}.hujson"))
    return path, f"Using tailscaled config file {json.dumps(path)} to match current capability version {best}"


def check_config_file(cfg_dir: str, path: str) -> None:
    """Raises ConfigError, with upstream's message, when the chosen file cannot be read or has a field or
    Version tailscaled would reject."""
    real = path
    contents = "error validating tailscaled configfile contents"
    try:
        doc = parse_hujson(_read_text(real))
    except OSError as exc:
        raise _config_error(cfg_dir, f"error validating whether tailscaled config directory "
                                     f"{json.dumps(posixpath.dirname(path))} contains tailscaled config for current "
                                     f"capability version {json.dumps(posixpath.basename(path))}: {exc.strerror}. "
                                     "If this is a Tailscale Kubernetes operator proxy, please ensure that the "
                                     "version of the operator is not older than the version of the proxy") from None
    except (ValueError, RecursionError) as exc:
        raise _config_error(cfg_dir, f"{contents}: {exc}") from None
    if not isinstance(doc, dict):
        raise _config_error(cfg_dir, f"{contents}: not a JSON object")
    unknown = sorted(k for k in doc if k.lower() not in CONFIG_FIELDS)
    if unknown:
        raise _config_error(cfg_dir, f"{contents}: unknown field {unknown[0]!r}")
    version = next((v for k, v in doc.items() if k.lower() == "version"), None)
    if version != "alpha0":
        raise _config_error(cfg_dir, f'{contents}: unsupported Version {json.dumps(version)}, want "alpha0"')


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
