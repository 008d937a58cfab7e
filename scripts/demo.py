"""The main job: a real tailnet in namespaces, containerboot as a proxy in front of a web server, and a
request from another tailnet node reaching it, once with each netfilter backend. Cleans up after itself.

Run as root: `make demo`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.fakes import Run  # noqa: E402
from tests.lab.tailnet import Node, Tailnet, have_binaries, tailscale_ip  # noqa: E402


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        say("needs root (network namespaces)")
        return 2
    if not have_binaries():
        say("tailscaled, tailscale and headscale are missing: run scripts/build-go.sh")
        return 2
    net = Tailnet()
    ok = True
    try:
        net.start_control()
        say("headscale is up at https://198.18.0.2 (lab namespace hs)")
        client = net.client("client", "198.18.0.3")
        client_ip = tailscale_ip(net.status(client))
        say(f"client node joined the tailnet as {client_ip}")
        for n, backend in ((10, "iptables"), (11, "nftables")):
            ns, _ = net.site(f"proxy{n}", f"198.18.0.{n}", n)
            if backend == "iptables":
                # Rules already in legacy xtables, as Docker or kube-proxy leave them on a legacy host;
                # `iptables -V` in this image says nf_tables, so detection must follow the rules.
                net.lab.run(ns, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", "198.18.99.0/24",
                            "-j", "MASQUERADE")
            env = net.containerboot_env(f"proxy{n}", TS_USERSPACE="false", TS_DEST_IP=f"198.18.{n}.2")
            say(f"starting containerboot as a proxy for 198.18.{n}.2 (backend auto-detected)")
            start = time.monotonic()
            run = Run(env, argv=net.private_run(ns, [str(ROOT / ".venv/bin/containerboot")]))
            try:
                run.wait_log("Startup complete, waiting for shutdown signal", timeout=60)
                took = time.monotonic() - start
                summary = run.wait_contains("Configuration: ")
                say(f"containerboot ready in {took:.1f} s: {summary.split('Configuration: ', 1)[1]}")
                proxy_ip = tailscale_ip(net.status(Node("proxy", ns, "", env["TS_SOCKET"])))
                url = f"http://{proxy_ip}:8080/"
                got = net.wait_fetch(client.ns, url, f"backend 198.18.{n}.1")
                if got == f"backend 198.18.{n}.1":
                    say(f"client fetched {url} through the tailnet and got {got!r} ({backend})")
                else:
                    ok = False
                    say(f"FAILED: client fetched {url} and got {got!r}")
            finally:
                code = run.stop()
                say(f"containerboot stopped with exit status {code}")
                ok = ok and code == 0
    finally:
        net.close()
        say("lab removed")
    say("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
