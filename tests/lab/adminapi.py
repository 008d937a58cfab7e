"""The Tailscale admin API the Kubernetes operator needs, in front of headscale: one HTTP origin that is both
the operator's control URL and its API base (it uses OPERATOR_LOGIN_SERVER for both).

    adminapi.py LISTEN_HOST LISTEN_PORT UPSTREAM_HOST:PORT HEADSCALE_BIN HEADSCALE_CONFIG USER_ID LOG

headscale upstream speaks TLS (its certificate is not checked: it is the lab's own, one hop away).

  POST   /api/v2/oauth/token        any client credentials -> a bearer token (nothing else checks it: lab only)
  POST   /api/v2/tailnet/-/keys     -> a headscale pre-auth key with the requested tags, reusable or not as asked
  DELETE /api/v2/device/{id}        -> `headscale nodes delete`; an unknown node is 404 with a JSON body (the
                                       operator's client treats that as already deleted; anything else it retries)
  anything else                     -> headscale at UPSTREAM_HOST:PORT, byte for byte (the /ts2021 upgrade
                                       included), for the rest of that connection

Each API call is logged to LOG as one line "METHOD PATH -> STATUS", for tests to read. Prints "ready" once it
listens. Standard library only; run by tests/lab/cluster.py in headscale's namespace.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import ClassVar

MAX_HEAD = 64 * 1024
DEVICE = re.compile(r"^/api/v2/device/([^/?]+)$")


class Proxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    upstream: tuple[str, int]
    headscale: list[str]
    user_id: str
    log_path: str
    log_lock: ClassVar[threading.Lock] = threading.Lock()

    def log(self, line: str) -> None:
        with self.log_lock, open(self.log_path, "a") as f:
            f.write(line + "\n")


class Handler(socketserver.BaseRequestHandler):
    server: Proxy

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(60)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk or len(head) > MAX_HEAD:
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) < 2:
            return
        method, path = parts[0], parts[1]
        if path.startswith("/api/v2/"):
            self.api(conn, head, method, path)
        else:
            self.splice(conn, head)

    # -- the admin API -------------------------------------------------------------------------------------

    def api(self, conn: socket.socket, head: bytes, method: str, path: str) -> None:
        header_blob, _, body = head.partition(b"\r\n\r\n")
        length = 0
        for h in header_blob.split(b"\r\n")[1:]:
            name, _, value = h.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        status, out = self.dispatch(method, path.split("?", 1)[0], body)
        self.server.log(f"{method} {path} -> {status}")
        data = json.dumps(out).encode()
        conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data)

    def dispatch(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        if method == "POST" and path == "/api/v2/oauth/token":
            return 200, {"access_token": secrets.token_hex(16), "token_type": "Bearer", "expires_in": 3600}
        if method == "POST" and path == "/api/v2/tailnet/-/keys":
            return self.create_key(json.loads(body or b"{}"))
        m = DEVICE.match(path)
        if method == "DELETE" and m:
            return self.delete_device(m.group(1))
        return 404, {"message": f"not implemented in the lab: {method} {path}"}

    def hs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.server.headscale, *args], capture_output=True, text=True, timeout=30)

    def create_key(self, req: dict[str, object]) -> tuple[int, object]:
        caps = req.get("capabilities") or {}
        create = ((caps.get("devices") or {}).get("create") or {}) if isinstance(caps, dict) else {}
        tags = [str(t) for t in create.get("tags") or []]
        args = ["preauthkeys", "create", "--user", self.server.user_id, "--expiration", "24h", "-o", "json"]
        if tags:
            args += ["--tags", ",".join(tags)]
        if create.get("reusable"):
            args.append("--reusable")
        proc = self.hs(*args)
        if proc.returncode != 0:
            return 500, {"message": f"headscale preauthkeys create: {proc.stderr.strip()[:300]}"}
        key = json.loads(proc.stdout)
        now = datetime.now(UTC)
        # The operator treats a zero expiry as an expired key, so a real one is given.
        return 200, {"id": str(key.get("id", "")), "key": key["key"], "created": now.isoformat(),
                     "expires": (now + timedelta(hours=24)).isoformat(), "capabilities": caps, "tags": tags}

    def delete_device(self, device_id: str) -> tuple[int, object]:
        proc = self.hs("nodes", "list", "-o", "json")
        nodes = json.loads(proc.stdout or "[]") if proc.returncode == 0 else []
        if not any(str(n.get("id")) == device_id for n in nodes):
            return 404, {"message": f"device {device_id} not found"}
        proc = self.hs("nodes", "delete", "--identifier", device_id, "--force")
        if proc.returncode != 0:
            return 500, {"message": f"headscale nodes delete: {proc.stderr.strip()[:300]}"}
        return 200, {}

    # -- everything else: headscale --------------------------------------------------------------------------

    def splice(self, conn: socket.socket, head: bytes) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        up = ctx.wrap_socket(socket.create_connection(self.server.upstream, timeout=10))
        up.settimeout(None)
        conn.settimeout(None)
        up.sendall(head)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        back = threading.Thread(target=pump, args=(up, conn), daemon=True)
        back.start()
        pump(conn, up)
        back.join()
        up.close()


def main() -> None:
    host, port, upstream, hs_bin, hs_config, user_id, log = sys.argv[1:8]
    for _ in range(50):  # the namespace's address can still be settling
        try:
            server = Proxy((host, int(port)), Handler)
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit(f"adminapi: cannot listen on {host}:{port}")
    up_host, _, up_port = upstream.rpartition(":")
    server.upstream = (up_host, int(up_port))
    server.headscale = [hs_bin, "-c", hs_config]
    server.user_id = user_id
    server.log_path = log
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
