"""A real tailnet in network namespaces: headscale as the control server, tailscaled nodes, and the
proxy node where containerboot runs. Built and torn down by tests and by `make demo`.

  lan (bridge br0, 198.18.0.0/24)
   |-- hs       198.18.0.2   headscale (control on :8080), no route out of the machine
   |-- client   198.18.0.3   a tailnet node running real tailscaled
   |-- proxy    198.18.0.4   containerboot + tailscaled  --- eth1 198.18.1.1 --- backend 198.18.1.2 (web)

headscale serves HTTPS with a self-signed certificate the nodes trust (SSL_CERT_FILE) and runs its
embedded DERP relay and STUN server, so nodes find each other as they would on the internet.
Every process runs in its own namespace with a private /run, like a container, so nothing is
written to the machine's /run; `close()` removes every namespace, process and file it made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab.netns import IP, Lab, sh
from tests.lab.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
CONTROL = "https://198.18.0.2"


def pinned() -> dict[str, str]:
    out = {}
    for line in (ROOT / "versions.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def binaries() -> dict[str, str]:
    """Paths of tailscale, tailscaled, upstream containerboot and headscale (built by scripts/build-go.sh)."""
    v = pinned()
    cache = Path(os.environ.get("CONTAINERBOOT_CACHE", "/var/cache/containerboot")) / "bin"
    ts, hs = cache / f"tailscale-{v['TAILSCALE_VERSION']}", cache / f"headscale-{v['HEADSCALE_VERSION']}"
    return {"tailscale": str(ts / "tailscale"), "tailscaled": str(ts / "tailscaled"),
            "containerboot-upstream": str(ts / "containerboot"), "headscale": str(hs / "headscale"),
            "bindir": str(ts)}


def have_binaries() -> bool:
    return all(os.access(p, os.X_OK) for k, p in binaries().items() if k != "bindir")


HEADSCALE_CONFIG = """
server_url: https://{ip}
listen_addr: {ip}:443
metrics_listen_addr: 127.0.0.1:9090
grpc_listen_addr: 127.0.0.1:50443
grpc_allow_insecure: false
noise:
  private_key_path: {d}/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: true
    region_id: 999
    region_code: lab
    region_name: Lab DERP (embedded in headscale)
    verify_clients: true
    stun_listen_addr: {ip}:3478
    private_key_path: {d}/derp_server_private.key
    automatically_add_embedded_derp_region: true
    ipv4: {ip}
  urls: []
  paths: []
  auto_update_enabled: false
tls_cert_path: {d}/control.crt
tls_key_path: {d}/control.key
disable_check_updates: true
node:
  expiry: 0
database:
  type: sqlite
  sqlite:
    path: {d}/db.sqlite
    write_ahead_log: true
log:
  level: info
policy:
  mode: file
  path: ""
dns:
  magic_dns: true
  base_domain: lab.test
  override_local_dns: false
  nameservers:
    global: []
unix_socket: {d}/headscale.sock
unix_socket_permission: "0770"
logtail:
  enabled: false
taildrop:
  enabled: false
"""


def write_control_files(d: Path, ip: str, paths_in: str | None = None) -> None:
    """headscale's config and a self-signed certificate for `ip` in `d`; `paths_in` is where `d` will be
    seen by headscale (a container's mount point), if not `d` itself."""
    (d / "headscale.yaml").write_text(HEADSCALE_CONFIG.format(ip=ip, d=paths_in or d))
    if not (d / "control.crt").exists():
        # Self-signed for the control address; every node trusts it through SSL_CERT_FILE.
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-days", "3", "-subj", "/CN=containerboot lab control", "-addext", f"subjectAltName=IP:{ip}",
           "-keyout", str(d / "control.key"), "-out", str(d / "control.crt"))


@dataclass
class Node:
    name: str
    ns: str
    addr: str
    socket: str
    proc: subprocess.Popen[str] | None = None


class Tailnet:
    def __init__(self, lab: Lab | None = None) -> None:
        self.lab = lab or Lab("n")
        self.bins = binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="cbnet", dir="/tmp"))
        self.lan = self.lab.ns("lan")
        self.lab.run(self.lan, "ip", "link", "add", "br0", "type", "bridge")
        self.lab.run(self.lan, "ip", "link", "set", "br0", "up")
        # The bridge is every node's default gateway, so tailscaled sees a default interface; the lan
        # namespace itself has no route beyond 198.18.0.0/24, so nothing leaves the lab.
        self.lab.addr(self.lan, "br0", "198.18.0.1/24")
        self._port = 0
        self.hs = self.attach("hs", "198.18.0.2")
        self.headscale: subprocess.Popen[str] | None = None
        self.user_id = ""
        self.nodes: list[Node] = []

    # ---- topology -----------------------------------------------------------------------------------

    def attach(self, name: str, addr: str) -> str:
        """A namespace plugged into the LAN bridge at `addr`."""
        ns = self.lab.ns(name)
        self._port += 1
        port = f"p{self._port}"
        self.lab.link(ns, "eth0", self.lan, port)
        self.lab.run(self.lan, "ip", "link", "set", port, "master", "br0")
        self.lab.addr(ns, "eth0", f"{addr}/24")
        self.lab.route(ns, "default", "198.18.0.1")
        return ns

    def private_run(self, ns: str, argv: list[str], setup: str = "") -> list[str]:
        """argv in `ns` with a private tmpfs on /run (ip netns exec already gives a private mount table);
        `setup` (shell) runs after that mount, before argv."""
        return [IP, "netns", "exec", ns, "sh", "-c", f'mount -t tmpfs tmpfs /run && {setup or ":"} && exec "$0" "$@"',
                *argv]

    # ---- control ------------------------------------------------------------------------------------

    def start_control(self) -> None:
        write_control_files(self.dir, "198.18.0.2")
        cfg = self.dir / "headscale.yaml"
        log = open(self.dir / "headscale.log", "w")  # noqa: SIM115 - closed with the process
        self.headscale = self.lab.spawn(self.hs, [self.bins["headscale"], "serve", "-c", str(cfg)],
                                        stdout=log, stderr=subprocess.STDOUT)
        ok = wait_for(lambda: self.lab.run(self.hs, "curl", "-sf", "--cacert", self.ca, "-o", "/dev/null",
                                           f"{CONTROL}/health", check=False).returncode == 0, timeout=30, interval=0.1)
        if not ok:
            raise RuntimeError("headscale did not start:\n" + (self.dir / "headscale.log").read_text()[-3000:])
        if not self.user_id:
            self.hs_cli("users", "create", "lab")
            users = json.loads(self.hs_cli("users", "list", "-o", "json"))
            self.user_id = str(next(u["id"] for u in users if u["name"] == "lab"))

    def stop_control(self) -> None:
        if self.headscale is not None:
            self.lab.stop(self.headscale)
            self.headscale = None

    def hs_cli(self, *args: str) -> str:
        return self.lab.run(self.hs, self.bins["headscale"], "-c", str(self.dir / "headscale.yaml"), *args).stdout

    def authkey(self, reusable: bool = True) -> str:
        out = self.hs_cli("preauthkeys", "create", "--user", self.user_id, "--expiration", "1h",
                          *(["--reusable"] if reusable else []), "-o", "json")
        return str(json.loads(out)["key"])

    def nodes_json(self) -> list[dict[str, Any]]:
        return list(json.loads(self.hs_cli("nodes", "list", "-o", "json") or "[]"))

    def approve_routes(self, hostname: str, routes: str) -> None:
        node = next(n for n in self.nodes_json() if n.get("given_name") == hostname or n.get("name") == hostname)
        self.hs_cli("nodes", "approve-routes", "--identifier", str(node["id"]), "--routes", routes)

    # ---- nodes --------------------------------------------------------------------------------------

    @property
    def ca(self) -> str:
        return str(self.dir / "control.crt")

    def tailscaled_env(self) -> dict[str, str]:
        # Trust the lab's control certificate; no log uploads, nothing else that would leave the lab.
        return {"PATH": f"{self.bins['bindir']}:{os.environ['PATH']}", "TS_NO_LOGS_NO_SUPPORT": "true",
                "HOME": str(self.dir), "SSL_CERT_FILE": self.ca}

    def client(self, name: str, addr: str, *up_args: str, userspace: bool = False) -> Node:
        """A plain tailnet node: real tailscaled, logged in with `tailscale up`."""
        ns = self.attach(name, addr)
        node = Node(name, ns, addr, str(self.dir / f"{name}.sock"))
        state = self.dir / f"{name}-state"
        state.mkdir()
        log = open(self.dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        argv = [self.bins["tailscaled"], f"--socket={node.socket}", f"--statedir={state}",
                *(["--tun=userspace-networking"] if userspace else [f"--tun=ts-{name[:8]}"])]
        node.proc = self.lab.spawn(ns, self.private_run(ns, argv), env=self.tailscaled_env(), stdout=log,
                                   stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(node.socket), timeout=15, interval=0.1)
        self.cli(node, "up", f"--login-server={CONTROL}", f"--authkey={self.authkey()}", f"--hostname={name}",
                 "--accept-dns=false", *up_args, timeout=60)
        self.nodes.append(node)
        return node

    def site(self, name: str, addr: str, subnet: int) -> tuple[str, str]:
        """A node on the LAN plus a `<name>-be` namespace behind it on 198.18.<subnet>.0/24 (the node is .1,
        the backend .2 with a web server answering "backend <client address>")."""
        ns = self.attach(name, addr)
        backend = self.lab.ns(f"{name}-be")
        self.lab.link(ns, "eth1", backend, "eth0")
        self.lab.addr(ns, "eth1", f"198.18.{subnet}.1/24")
        self.lab.addr(backend, "eth0", f"198.18.{subnet}.2/24")
        self.lab.route(backend, "default", f"198.18.{subnet}.1")
        self.lab.serve(backend, "backend", f"198.18.{subnet}.2")
        return ns, backend

    def containerboot_env(self, name: str, **extra: str) -> dict[str, str]:
        """What a user would set for containerboot in this lab (an auth key is added unless given)."""
        env = {**self.tailscaled_env(), "PATH": f"{self.bins['bindir']}:{ROOT}/.venv/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "TS_EXTRA_ARGS": f"--login-server={CONTROL}", "TS_HOSTNAME": name,
               "TS_SOCKET": str(self.dir / f"{name}.sock")}
        env.update(extra)
        if "TS_AUTHKEY" not in env:
            env["TS_AUTHKEY"] = self.authkey()
        return {k: v for k, v in env.items() if v is not None}

    def cli(self, node: Node, *args: str, timeout: float = 30, check: bool = True) -> str:
        proc = self.lab.run(node.ns, self.bins["tailscale"], f"--socket={node.socket}", *args, check=check,
                            timeout=timeout, env=self.tailscaled_env())
        return proc.stdout

    def status(self, node: Node) -> dict[str, Any]:
        return dict(json.loads(self.cli(node, "status", "--json")))

    def fetch(self, ns: str, url: str, timeout: float = 3.0) -> str | None:
        proc = self.lab.run(ns, "curl", "-sS", "-g", "--max-time", str(timeout), url, check=False,
                            timeout=timeout + 5)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def wait_fetch(self, ns: str, url: str, expect: str, timeout: float = 30.0) -> str | None:
        got: list[str | None] = [None]

        def attempt() -> bool:
            got[0] = self.fetch(ns, url, timeout=2.0)
            return got[0] == expect

        wait_for(attempt, timeout=timeout, interval=0.3)
        return got[0]

    def close(self) -> None:
        self.lab.close()
        for node in self.nodes:
            node.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def tailscale_ip(status: dict[str, Any], fam: int = 4) -> str:
    return next(a for a in status["Self"]["TailscaleIPs"] if (":" in a) == (fam == 6))


