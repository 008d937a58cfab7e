"""The boot program against a fake tailscaled, CLI and LocalAPI (upstream's own test method):
exact commands, files, log lines, endpoint statuses and exit codes, per auth path, state and mode."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import containerboot_exe
from tests.lab.fakes import SECRET, Root, Run, child_pid, netmap, peer, state
from tests.lab.ports import free_port
from tests.lab.wait import wait_for

SOCK = "--socket=/tmp/tailscaled.sock"
TAILSCALED = f"/usr/bin/tailscaled {SOCK} --state=mem: --statedir=/tmp --tun=userspace-networking"
UP = f"/usr/bin/tailscale {SOCK} up --accept-dns=false"


@pytest.fixture
def start(root: Root) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def _start(prefix: list[str] | None = None, argv: list[str] | None = None, **env: str) -> Run:
        run = Run(root.env(**env), argv=argv, prefix=prefix)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.stop()
        assert SECRET not in run.output, "the auth key appeared in the output"


def wait_args(root: Root, expected: list[str], timeout: float = 3.0) -> None:
    got = wait_for(lambda: root.args() == expected and root.args(), timeout)
    assert got == expected, f"commands: {root.args()}"


def get(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


# ---- auth paths --------------------------------------------------------------------------------------


def test_always_auth(root: Root, start: Callable[..., Run]) -> None:
    run = start(TS_AUTHKEY=SECRET)
    wait_args(root, [TAILSCALED, f"{UP} --authkey={SECRET}"])
    run.wait_log("Running 'tailscale up'")
    root.api.notify(netmap(["100.64.0.1/32"]))
    run.wait_log("Startup complete, waiting for shutdown signal")
    assert run.proc.poll() is None
    assert root.args() == [TAILSCALED, f"{UP} --authkey={SECRET}"]  # no `tailscale set`


def test_auth_once_logs_in_only_when_needed(root: Root, start: Callable[..., Run]) -> None:
    run = start(TS_AUTHKEY=SECRET, TS_AUTH_ONCE="true")
    wait_args(root, [TAILSCALED])
    root.api.notify(state("NeedsLogin"))
    wait_args(root, [TAILSCALED, f"{UP} --authkey={SECRET}"])
    root.api.notify(netmap(["100.64.0.1/32"]))
    wait_args(root, [TAILSCALED, f"{UP} --authkey={SECRET}", f"/usr/bin/tailscale {SOCK} set --accept-dns=false"])
    run.wait_log("Startup complete, waiting for shutdown signal")


def test_auth_once_with_state_skips_login(root: Root, start: Callable[..., Run]) -> None:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(TS_AUTHKEY=SECRET, TS_AUTH_ONCE="true", TS_STATE_DIR="/var/lib", TS_HOSTNAME="h",
                TS_ROUTES="10.0.0.0/24")
    run.wait_log("Startup complete, waiting for shutdown signal")
    assert root.args() == [f"/usr/bin/tailscaled {SOCK} --statedir=/var/lib --tun=userspace-networking",
                           f"/usr/bin/tailscale {SOCK} set --accept-dns=false --advertise-routes=10.0.0.0/24 "
                           "--hostname=h"]


def test_config_file_is_one_step(root: Root, start: Callable[..., Run]) -> None:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR=f"{root.d}/etc/tailscaled/")
    run.wait_log("Startup complete, waiting for shutdown signal")
    assert root.args() == [f"{TAILSCALED} --config=/etc/tailscaled/cap-95.hujson"]
    run.wait_contains('/etc/tailscaled/cap-95.hujson" to match current capability')


def test_config_file_needing_login_exits_1(root: Root, start: Callable[..., Run]) -> None:
    root.api.notify(state("NeedsLogin"))
    run = start(TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR=f"{root.d}/etc/tailscaled")
    assert run.wait_exit() == 1
    run.wait_log("invalid state: tailscaled daemon started with a config file, but tailscale is not logged in: "
                 "ensure you pass a valid auth key in the config file")


def test_failed_login_exits_1(root: Root, start: Callable[..., Run]) -> None:
    run = start(TS_AUTHKEY=SECRET, TS_TEST_CLI_EXIT="1")
    assert run.wait_exit() == 1
    run.wait_log("failed to auth tailscale: tailscale up failed: exit status 1")
    assert not any(p for p in os.listdir(root.d / "tmp") if p == "tailscaled.sock"), "tailscaled left running"


# ---- states ------------------------------------------------------------------------------------------


def test_waiting_states_are_logged(root: Root, start: Callable[..., Run]) -> None:
    run = start()
    root.api.notify(state("NeedsMachineAuth"))
    run.wait_log("machine authorization required, please visit the admin panel")
    root.api.notify(state("Starting"))
    run.wait_log('tailscaled in state "Starting", waiting')
    root.api.notify(netmap(["100.64.0.1/32"]))
    run.wait_log("Startup complete, waiting for shutdown signal")
    root.api.notify(state("NeedsLogin"))
    assert run.wait_exit() == 1
    run.wait_log('tailscaled left running state (now in state "NeedsLogin"), exiting')


def test_boot_timeout(root: Root, start: Callable[..., Run]) -> None:
    run = start(TS_BOOT_TIMEOUT="1s")
    assert run.wait_exit() == 1
    run.wait_contains("reading tailscaled IPN bus: context deadline exceeded")


# ---- proxy modes (fake netfilter) and sysctls ---------------------------------------------------------


def test_userspace_touches_no_sysctl(root: Root, start: Callable[..., Run]) -> None:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(TS_ROUTES="10.0.0.0/24,fd00::/64")
    run.wait_log("Startup complete, waiting for shutdown signal")
    assert root.read("proc/sys/net/ipv4/ip_forward") == "0"
    assert root.read("proc/sys/net/ipv6/conf/all/forwarding") == "0"
    run.wait_contains("Configuration: mode userspace; firewall none")


def test_ingress_proxy(root: Root, start: Callable[..., Run]) -> None:
    run = start(TS_USERSPACE="false", TS_DEST_IP="10.0.0.5", TS_AUTHKEY=SECRET)
    root.api.notify(netmap(["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]))
    run.wait_log("Installing proxy rules")
    run.wait_log("firewall: 2 rules live in iptables for 100.64.0.1, fd7a:115c:a1e0::1")
    run.wait_log("Startup complete, waiting for shutdown signal")
    assert root.read("proc/sys/net/ipv4/ip_forward") == "1"
    assert root.read("proc/sys/net/ipv6/conf/all/forwarding") == "0"
    assert root.args()[0] == f"/usr/bin/tailscaled {SOCK} --state=mem: --statedir=/tmp"
    assert not any("iptables" in a or "nft" in a for a in root.args()), "fake netfilter must run nothing"
    run.wait_contains("Configuration: mode proxy; firewall iptables (legacy): TS_TEST_FAKE_NETFILTER=true")


def test_egress_by_ip_and_routes_enable_forwarding(root: Root, start: Callable[..., Run]) -> None:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(TS_USERSPACE="false", TS_TAILNET_TARGET_IP="100.64.0.7", TS_ROUTES="fd00::/64")
    run.wait_log("Installing forwarding rules for destination 100.64.0.7")
    run.wait_log("Startup complete, waiting for shutdown signal")
    assert root.read("proc/sys/net/ipv4/ip_forward") == "1"
    assert root.read("proc/sys/net/ipv6/conf/all/forwarding") == "1"


def test_egress_by_name_waits_for_the_peer(root: Root, start: Callable[..., Run]) -> None:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start(TS_USERSPACE="false", TS_TAILNET_TARGET_FQDN="db.test.ts.net")
    run.wait_log('could not find Tailscale node "db.test.ts.net."; it either does not exist, or not reachable because '
                 "of ACLs; retrying on the next netmap")
    run.wait_log("Startup complete, waiting for shutdown signal")
    root.api.notify({"PeersChanged": [peer(7, "db.test.ts.net.", "100.64.0.7")]})
    run.wait_log("Installing forwarding rules for destination 100.64.0.7")
    assert run.proc.poll() is None


def test_ipv6_disabled_fake_netfilter_skips_ipv6_rules(root: Root, start: Callable[..., Run]) -> None:
    root.api.notify(netmap(["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]))
    run = start(TS_USERSPACE="false", TS_DEST_IP="fd00::5", TS_TEST_FAKE_NETFILTER_6="false")
    run.wait_contains("IPv6 NAT is unavailable here; not installing: clamp-mss ipv6 via tailscale0, "
                      "dnat fd7a:115c:a1e0::1 -> fd00::5")
    run.wait_log("Startup complete, waiting for shutdown signal")


def test_forwarding_failure_exits_with_upstream_help(root: Root, start: Callable[..., Run]) -> None:
    path = root.d / "proc/sys/net/ipv4/ip_forward"
    path.unlink()
    path.mkdir()  # neither readable nor writable as a file
    run = start(TS_USERSPACE="false", TS_DEST_IP="10.0.0.5")
    assert run.wait_exit() == 1
    run.wait_contains("Failed to enable IP forwarding: reading")
    run.wait_log("To run tailscale as a proxy or router container, IP forwarding must be enabled.")
    run.wait_log("you can fix this by running the container with privileged=true, or the equivalent in your "
                 "container runtime that permits access to sysctls.")
    assert root.args() == [], "tailscaled must not start"


def test_bad_configuration_is_one_line_and_exit_1(root: Root, start: Callable[..., Run]) -> None:
    run = start(TS_USERSPACE="false", TS_DEST_IP="10.0.0.500", TS_AUTHKEY=SECRET)
    assert run.wait_exit() == 1
    assert run.lines == [run.wait_log('invalid configuration: TS_DEST_IP="10.0.0.500" is not an IP address; '
                                      "expected an IPv4 or IPv6 address, e.g. 10.0.0.5")]
    assert root.args() == []


# ---- endpoints ---------------------------------------------------------------------------------------


def test_health_and_metrics_endpoints(root: Root, start: Callable[..., Run]) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run = start(TS_ENABLE_HEALTH_CHECK="true", TS_ENABLE_METRICS="true", TS_LOCAL_ADDR_PORT=f"127.0.0.1:{port}",
                POD_IPS="10.1.0.9,fd10::9")
    run.wait_log(f"Running healthcheck endpoint at 127.0.0.1:{port}/healthz")
    assert get(f"{base}/healthz")[:2] == (503, "node currently has no tailscale IPs\n")
    env = root.env(TS_ENABLE_HEALTH_CHECK="true", TS_LOCAL_ADDR_PORT=f"127.0.0.1:{port}")
    hc = Run(env, argv=[containerboot_exe(), "healthcheck"])
    assert hc.wait_exit() == 1
    root.api.notify(netmap(["100.64.0.1/32"]))
    run.wait_log("Setting healthy true")
    status, body, headers = get(f"{base}/healthz")
    assert (status, body, headers["Pod-IPv4"], headers["Pod-IPv6"]) == (200, "ok", "10.1.0.9", "fd10::9")
    status, body, _ = get(f"{base}/metrics")
    # containerboot's own families first, then tailscaled's answer as it came (upstream proxies only that).
    assert status == 200 and body.endswith("\nfake metrics"), body
    ours = {f.name: f for f in text_string_to_metric_families(body.removesuffix("fake metrics"))}
    assert ours["containerboot_tailscaled_backend_state"].type == "gauge"
    assert [s.labels["state"] for s in ours["containerboot_tailscaled_backend_state"].samples if s.value == 1] \
        == ["Running"]
    assert get(f"{base}/nope")[0] == 404
    assert get(f"{base}/debug/pprof")[:2] == (404, "debug endpoint not configured\n")
    req = urllib.request.Request(f"{base}/healthz", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 405
    assert Run(env, argv=[containerboot_exe(), "healthcheck"]).wait_exit() == 0
    # Without an endpoint the healthcheck asks tailscaled itself.
    assert Run(root.env(), argv=[containerboot_exe(), "healthcheck"]).wait_exit() == 0


def test_deprecated_healthcheck_server(root: Root, start: Callable[..., Run]) -> None:
    port = free_port()
    run = start(TS_HEALTHCHECK_ADDR_PORT=f"127.0.0.1:{port}")
    run.wait_contains("[warning] TS_HEALTHCHECK_ADDR_PORT is deprecated")
    run.wait_log(f"Running healthcheck endpoint at 127.0.0.1:{port}/healthz")
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 503
    root.api.notify(netmap(["100.64.0.1/32"]))
    assert wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200)


# ---- serve config ------------------------------------------------------------------------------------


def test_serve_config_follows_file_and_cert_domain(root: Root, start: Callable[..., Run]) -> None:
    root.write("etc/serve.json", '{"TCP":{"443":{"HTTPS":true}},"Web":{"${TS_CERT_DOMAIN}:443":'
                                 '{"Handlers":{"/":{"Proxy":"http://127.0.0.1:8080"}}}}}')
    run = start(TS_SERVE_CONFIG=f"{root.d}/etc/serve.json")
    root.api.notify(netmap(["100.64.0.1/32"], cert_domains=["test-node.test.ts.net"]))
    run.wait_log("serve proxy: unsetting previous config")
    run.wait_log("serve proxy: applying serve config")
    posted = wait_for(lambda: len(root.api.posted("/localapi/v0/serve-config")) >= 2
                      and root.api.posted("/localapi/v0/serve-config"))
    assert posted[0] == {}
    assert list(posted[1]["Web"]) == ["test-node.test.ts.net:443"]
    root.write("etc/serve.json", '{"TCP":{"80":{"HTTP":true}}}')
    assert wait_for(lambda: root.api.posted("/localapi/v0/serve-config")[-1] == {"TCP": {"80": {"HTTP": True}}})


def test_serve_config_without_https_is_not_applied(root: Root, start: Callable[..., Run]) -> None:
    root.write("etc/serve.json", '{"TCP":{"443":{"HTTPS":true}}}')
    run = start(TS_SERVE_CONFIG=f"{root.d}/etc/serve.json")
    root.api.notify(netmap(["100.64.0.1/32"]))
    run.wait_contains("it is not able to issue TLS certs")
    assert root.api.posted("/localapi/v0/serve-config") == [{}]


# ---- logs --------------------------------------------------------------------------------------------


def test_log_shape_and_json(root: Root, start: Callable[..., Run]) -> None:
    run = start(TS_AUTHKEY=SECRET)
    line = run.wait_log("Starting tailscaled")
    assert line[:6] == "boot: " and line[10] == "/" and line[16] == " " and line[19] == ":"
    run.wait_contains("Configuration: mode userspace; firewall none")
    run.wait_contains("state memory (a restart registers a new device; set TS_STATE_DIR to keep it)")
    run.stop()
    jrun = start(TS_LOG_FORMAT="json", TS_TEST_RECORD_ARGS=str(root.d / "args2"))
    jline = jrun.wait_contains('"msg": "Starting tailscaled"')
    assert json.loads(jline)["level"] == "info"


# ---- exits and signals -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_exits_0(root: Root, start: Callable[..., Run], sig: signal.Signals) -> None:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start()
    run.wait_log("Startup complete, waiting for shutdown signal")
    run.proc.send_signal(sig)
    assert run.wait_exit() == 0
    run.wait_log(f"Received {sig.name}, shutting down")
    run.wait_log("Sending SIGTERM to tailscaled")


def test_tailscaled_killed_gives_nonzero_exit(root: Root, start: Callable[..., Run]) -> None:
    root.api.notify(netmap(["100.64.0.1/32"]))
    run = start()
    run.wait_log("Startup complete, waiting for shutdown signal")
    os.kill(child_pid(run.proc.pid, "tailscaled"), signal.SIGKILL)
    assert run.wait_exit() == 128 + signal.SIGKILL
    run.wait_contains("tailscaled exited unexpectedly (killed by SIGKILL); exiting so that the container is restarted")


def test_closed_http_server_is_named_as_configured(root: Root, start: Callable[..., Run]) -> None:
    # Upstream logs the address as given ("HTTP server at [::]:9002 closed" in its own test table), not the
    # socket's name for it (":::9002").
    port = free_port()
    run = start(TS_ENABLE_HEALTH_CHECK="true", TS_LOCAL_ADDR_PORT=f"[::1]:{port}")
    run.wait_log(f"Running healthcheck endpoint at [::1]:{port}/healthz")
    assert run.stop() == 0
    run.wait_log(f"HTTP server at [::1]:{port} closed")


def test_busy_health_port_is_a_clear_error(root: Root, start: Callable[..., Run]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = start(TS_ENABLE_HEALTH_CHECK="true", TS_LOCAL_ADDR_PORT=f"127.0.0.1:{port}")
        assert run.wait_exit() == 1
    run.wait_contains("failed to listen on the health/metrics address: [Errno 98] Address already in use")


def test_dest_dns_name_is_resolved_and_a_failure_is_retried(root: Root, start: Callable[..., Run]) -> None:
    from containerboot.dns import lookup

    addrs = lookup("localhost")  # what this machine's resolver says (/etc/hosts may or may not map ::1)
    root.api.notify(netmap(["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]))
    run = start(TS_USERSPACE="false", TS_EXPERIMENTAL_DEST_DNS_NAME="localhost")
    run.wait_log(f"installing ingress proxy rules for backends [{' '.join(map(str, addrs))}]")
    run.wait_log("Installing proxy rules")
    rules = 2 * len({a.version for a in addrs})  # a DNAT and an MSS clamp per family
    run.wait_log(f"firewall: {rules} rules live in iptables for 100.64.0.1, fd7a:115c:a1e0::1")
    run.stop()
    bad = start(TS_USERSPACE="false", TS_EXPERIMENTAL_DEST_DNS_NAME="no-such-name.invalid",
                TS_TEST_RECORD_ARGS=str(root.d / "args2"))
    bad.wait_contains("[unexpected] error resolving DNS name no-such-name.invalid")
    bad.wait_contains("next DNS resolution attempt in 1s")
    bad.wait_contains("next DNS resolution attempt in 2s", timeout=8)
    assert bad.proc.poll() is None, "an unresolvable name must not end the program"


def test_sigterm_during_a_blocked_login_exits_0_promptly(root: Root, start: Callable[..., Run]) -> None:
    # `tailscale up` blocks while control is unreachable; a container runtime's SIGTERM must not wait for it.
    root.write("usr/bin/tailscale", '#!/usr/bin/env bash\necho "$0 $@" >> "$TS_TEST_RECORD_ARGS"\nexec sleep 60\n')
    run = start(TS_AUTHKEY=SECRET)
    run.wait_log("Running 'tailscale up'")
    import time

    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit(10) == 0 and time.monotonic() - sent < 3
    run.wait_log("Received SIGTERM, shutting down")
