"""The LocalAPI's HTTP/1.1 client against raw server bytes over a real socket pair."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from containerboot.tailscale import http1
from firewall.paths import which


def exchange(answer: bytes, method: str = "GET", body: bytes | None = None,
             close_after: bool = True) -> tuple[http1.Response, bytes]:
    """Send a request over a socket pair whose far end answers `answer`; returns the response and the
    bytes the far end received."""
    ours, theirs = socket.socketpair()
    received = bytearray()

    def serve() -> None:
        while b"\r\n\r\n" not in received:
            received.extend(theirs.recv(65536))
        if body:
            while len(received) < received.index(b"\r\n\r\n") + 4 + len(body):
                received.extend(theirs.recv(65536))
        theirs.sendall(answer)
        if close_after:
            theirs.close()

    t = threading.Thread(target=serve)
    t.start()
    ours.settimeout(5)
    resp = http1.request(ours, method, "/localapi/v0/status", "local-tailscaled.sock",
                         {"Tailscale-Cap": "1"}, body)
    t.join(5)
    return resp, bytes(received)


def test_content_length_body_and_request_bytes() -> None:
    resp, sent = exchange(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
                          method="POST", body=b"{}")
    assert (resp.status, resp.reason, resp.headers["Content-Type"]) == (200, "OK", "application/json")
    assert resp.read() == b'{"a":1}'
    assert sent.startswith(b"POST /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n")
    assert b"\r\nTailscale-Cap: 1\r\n" in sent and b"\r\nContent-Length: 2\r\n" in sent and sent.endswith(b"\r\n\r\n{}")


def test_chunked_body_with_extension_and_trailer() -> None:
    resp, _ = exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nX-Trailer: y\r\n\r\n")
    assert resp.read() == b'{"a":1}'
    assert resp.read1() == b""


def test_chunked_stream_returns_each_chunk_as_it_arrives() -> None:
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
    resp = http1.Response(ours, "GET")
    assert resp.read1() == b"first"  # the server has not sent more yet: this must not wait for it
    theirs.sendall(b"6\r\nsecond\r\n0\r\n\r\n")
    assert resp.read1() == b"second"
    assert resp.read1() == b""
    theirs.close()


def test_body_framed_by_close_and_head_without_body() -> None:
    resp, _ = exchange(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    assert resp.read() == b"all of it"
    resp, _ = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", method="HEAD")
    assert resp.read() == b""


@pytest.mark.parametrize("answer, message", [
    (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed in the middle of the body"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "more than 100 header lines"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "header line too long"),
    (b"", "connection closed before the response was complete"),
])
def test_malformed_responses_raise_one_clear_error(answer: bytes, message: str) -> None:
    with pytest.raises(http1.HTTPError, match=message):
        resp, _ = exchange(answer)
        resp.read()


def test_server_parses_a_request_with_bare_newlines_and_a_body() -> None:
    req = http1.parse_request(b"POST /debug/x?y=1 HTTP/1.1\nHost: a\nContent-Length: 2\n\nhi")
    assert (req.method, req.target, req.path, req.headers, req.body) == (
        "POST", "/debug/x?y=1", "/debug/x", {"host": "a", "content-length": "2"}, b"hi")


@pytest.mark.parametrize("data, status", [
    (b"GET /healthz\r\n\r\n", 400),
    (b"GET /healthz HTTX/1.1\r\n\r\n", 400),
    (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
    (b"BREW /healthz HTTP/1.1\r\n\r\n", 501),
    (b"GET /healthz HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
])
def test_server_rejects_bad_requests_with_a_status(data: bytes, status: int) -> None:
    with pytest.raises(http1.BadRequest) as err:
        http1.parse_request(data)
    assert err.value.status == status


def test_server_response_bytes() -> None:
    out = http1.response(200, b"ok", {"Pod-IPv4": "10.0.0.1"}, now=0)
    assert out == (b"HTTP/1.0 200 OK\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\nPod-IPv4: 10.0.0.1\r\n"
                   b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert http1.response(503, b"x", head_only=True, now=0).endswith(b"Content-Length: 1\r\nConnection: close\r\n\r\n")


def test_which_finds_executables_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path
    (base / "a").mkdir()
    (base / "b").mkdir()
    (base / "a" / "tool").write_text("")  # not executable: skipped
    (base / "b" / "tool").write_text("#!/bin/sh\n")
    os.chmod(base / "b" / "tool", 0o755)
    (base / "a" / "dir").mkdir()
    monkeypatch.setenv("PATH", f"{base / 'a'}:{base / 'b'}")
    assert which("tool") == str(base / "b" / "tool") == shutil.which("tool")
    assert which("dir") is None and which("missing") is None
    assert which(str(base / "b" / "tool")) == str(base / "b" / "tool")

