"""TS_SERVE_CONFIG: watch the file, substitute ${TS_CERT_DOMAIN}, hand changes to tailscaled."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from containerboot import log
from containerboot.tailscale.localapi import TailscaledAPI

NO_HTTPS_WARNING = (
    "serve proxy: this node is configured as a proxy that exposes an HTTPS endpoint to tailnet, (perhaps a "
    "Kubernetes operator Ingress proxy) but it is not able to issue TLS certs, so this will likely not work. To "
    "make it work, ensure that HTTPS is enabled for your tailnet, see https://tailscale.com/kb/1153/enabling-https "
    "for more details.")


def render(text: str, cert_domain: str) -> dict[str, Any]:
    """The serve config with the cert domain substituted (raises ValueError when it is not JSON)."""
    doc = json.loads(text.replace("${TS_CERT_DOMAIN}", cert_domain))
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def wants_https(cfg: dict[str, Any]) -> bool:
    return any(isinstance(h, dict) and h.get("HTTPS") for h in (cfg.get("TCP") or {}).values())


def handler_count(cfg: Mapping[str, Any]) -> int:
    """TCP ports and web handlers, the node's own and its Tailscale Services' (an HA Ingress has only those)."""
    def count(part: Mapping[str, Any]) -> int:
        web = part.get("Web") or {}
        handlers = sum(len(w.get("Handlers") or {}) for w in web.values() if isinstance(w, dict))
        return len(part.get("TCP") or {}) + handlers
    services = cfg.get("Services") or {}
    return count(cfg) + sum(count(svc) for svc in services.values() if isinstance(svc, dict))


class ServeWatcher:
    """Re-reads the file when it or the cert domain changes; applies only what differs."""

    def __init__(self, path: str, api: TailscaledAPI,
                 on_change: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        self.path = path
        self.api = api
        # Told of each config handled, as poll() returns True: the Services' cert loops and advertisement
        # follow it (services.Services.on_serve_config).
        self.on_change = on_change
        self._seen: tuple[object, ...] | None = None
        self._applied: dict[str, Any] | None = None

    def poll(self, cert_domain: str) -> bool:
        """True when a new config was handled (applied, or skipped for want of HTTPS): upstream then
        records the cert domain as the Secret's https_endpoint."""
        try:
            st = os.stat(self.path)
            stamp: tuple[object, ...] = (st.st_mtime_ns, st.st_size, st.st_ino, cert_domain)
        except OSError:
            stamp = ("missing", cert_domain)
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            with open(self.path) as f:
                text = f.read()
        except OSError:
            log.info(f'serve proxy: no serve config at "{self.path}", skipping')
            return False
        if not text.strip():
            log.info("serve proxy: serve config file is empty, skipping")
            return False
        try:
            cfg = render(text, cert_domain)
        except ValueError as exc:
            # Upstream exits here; keeping the last good config keeps a typo from taking the node down.
            log.error(f'serve proxy: failed to read serve config "{self.path}": {exc}; keeping the previous one')
            return False
        if cfg == self._applied:
            return False
        if cert_domain == "no-https" and wants_https(cfg):
            log.warning(NO_HTTPS_WARNING)
            # Upstream still starts the cert loops for a config it did not apply for want of HTTPS.
            if self.on_change is not None:
                self.on_change(cfg)
            return True
        log.info("serve proxy: applying serve config")
        self.api.json("POST", "/localapi/v0/serve-config", cfg)
        self._applied = cfg
        log.info(f'serve proxy: serving "{self.path}": {handler_count(cfg)} handlers')
        if self.on_change is not None:
            self.on_change(cfg)
        return True
