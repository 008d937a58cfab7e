"""tailscaled and tailscale command lines, as upstream builds them for the same environment."""

from __future__ import annotations

from containerboot.settings import load
from containerboot.tailscale import ipn
from containerboot.tailscale.tailscaled import redact, set_argv, tailscaled_argv, up_argv


def test_tailscaled_argv_state_modes() -> None:
    assert tailscaled_argv(load({})) == ["tailscaled", "--socket=/tmp/tailscaled.sock", "--state=mem:",
                                         "--statedir=/tmp", "--tun=userspace-networking"]
    assert tailscaled_argv(load({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "TS_USERSPACE": "false"})) == [
        "tailscaled", "--socket=/tmp/tailscaled.sock", "--state=kube:tailscale", "--statedir=/tmp"]
    assert tailscaled_argv(load({"TS_STATE_DIR": "/var/lib/tailscale", "TS_SOCKET": "/run/ts.sock"})) == [
        "tailscaled", "--socket=/run/ts.sock", "--statedir=/var/lib/tailscale", "--tun=userspace-networking"]


def test_tailscaled_argv_flags_in_upstream_order() -> None:
    s = load({"TS_SOCKS5_SERVER": ":1055", "TS_OUTBOUND_HTTP_PROXY_LISTEN": ":1056",
              "TS_DEBUG_ADDR_PORT": "127.0.0.1:9001", "TS_TAILSCALED_EXTRA_ARGS": "--verbose=1  --port=41641"})
    assert tailscaled_argv(s)[5:] == ["--socks5-server=:1055", "--outbound-http-proxy-listen=:1056",
                                      "--debug=127.0.0.1:9001", "--verbose=1", "--port=41641"]
    # --debug is not added twice when the extra args already carry it
    s = load({"TS_DEBUG_ADDR_PORT": "127.0.0.1:9001", "TS_TAILSCALED_EXTRA_ARGS": "--debug=127.0.0.1:9001"})
    assert tailscaled_argv(s).count("--debug=127.0.0.1:9001") == 1


def test_up_and_set_argv() -> None:
    s = load({"TS_AUTHKEY": "tskey-auth-x", "TS_ROUTES": "", "TS_HOSTNAME": "proxy", "TS_ACCEPT_DNS": "true",
              "TS_EXTRA_ARGS": "--advertise-tags=tag:proxy --accept-routes"})
    assert up_argv(s) == ["tailscale", "--socket=/tmp/tailscaled.sock", "up", "--accept-dns=true",
                          "--authkey=tskey-auth-x", "--advertise-routes=", "--hostname=proxy",
                          "--advertise-tags=tag:proxy", "--accept-routes"]
    assert set_argv(s) == ["tailscale", "--socket=/tmp/tailscaled.sock", "set", "--accept-dns=true",
                           "--advertise-routes=", "--hostname=proxy"]
    oauth = load({"TS_CLIENT_ID": "cid", "TS_CLIENT_SECRET": "csecret", "TS_EXTRA_ARGS": "--accept-dns=false"})
    assert up_argv(oauth)[3:] == ["--accept-dns=false", "--client-id=cid", "--client-secret=csecret"]
    assert "csecret" not in redact(up_argv(oauth)) and "--client-secret=<redacted>" in redact(up_argv(oauth))


def test_notifications_fold_into_the_node() -> None:
    node = ipn.update(ipn.Node(), {"State": 6, "InitialStatus": {
        "BackendState": "Running",
        "Self": {"ID": "s1", "DNSName": "me.ts.net.", "TailscaleIPs": ["100.64.0.1", "fd7a::1"]},
        "Peer": {"nodekey:1": {"NodeID": 7, "DNSName": "db.ts.net.", "TailscaleIPs": ["100.64.0.7"]}},
        "CertDomains": ["me.ts.net"]}})
    assert ipn.state_of({"State": 6}) == "Running" and node.cert_domain == "me.ts.net"
    assert [str(a) for a in node.addrs] == ["100.64.0.1", "fd7a::1"]
    assert [str(a) for a in ipn.resolve(node, "DB.ts.net")] == ["100.64.0.7"]
    node = ipn.update(node, {"PeersChanged": [{"ID": 7, "Name": "db.ts.net.", "Addresses": ["100.64.0.8/32"]}],
                             "SelfChange": {"StableID": "s1", "Name": "me.ts.net.", "Addresses": ["100.64.0.2/32"]}})
    assert [str(a) for a in ipn.resolve(node, "db.ts.net.")] == ["100.64.0.8"]
    assert [str(a) for a in node.addrs] == ["100.64.0.2"]
    assert ipn.resolve(ipn.update(node, {"PeersRemoved": [7]}), "db.ts.net") == ()
