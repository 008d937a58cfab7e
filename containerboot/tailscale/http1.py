"""Just enough HTTP/1.1 for tailscaled's LocalAPI: one request per connection, bodies framed by
Content-Length, chunked encoding or the end of the connection, and a streaming read for the IPN bus.

Why not http.client: it imports email (header parsing) and ssl, about 5.5 MiB of resident memory that
a proxy without the Kubernetes store never uses, paid in every pod (measured with python3 -sE).
"""

from __future__ import annotations

import socket
import time

MAX_HEADER_LINE = 64 * 1024  # http.client's own limit on a header or status line
MAX_HEADERS = 100  # http.client's limit on the number of header lines
MAX_BODY = 64 * 1024 * 1024  # a netmap of a large tailnet is a few MiB; a body this size is a fault


class HTTPError(OSError):
    """A response this client cannot read (malformed, too large, cut short)."""


class Response:
    """The status line and headers, read; the body, read with `read()` or piece by piece with `read1()`."""

    def __init__(self, sock: socket.socket, method: str) -> None:
        self._file = sock.makefile("rb")
        status_line = self._line()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HTTPError(f"malformed status line {status_line[:60]!r}")
        self.status = int(parts[1])
        self.reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
        self.headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = self._line()
            if not line.strip():
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise HTTPError(f"malformed header line {line[:60]!r}")
            self.headers[name.strip()] = value.strip()
        else:
            raise HTTPError(f"more than {MAX_HEADERS} header lines")
        lowered = {k.lower(): v for k, v in self.headers.items()}
        self._chunked = "chunked" in lowered.get("transfer-encoding", "").lower()
        # Whether the server ends the connection after this answer (a kept-alive client must reconnect).
        self.will_close = ("close" in lowered.get("connection", "").lower() or parts[0] == b"HTTP/1.0"
                           or (not self._chunked and "content-length" not in lowered))
        self._left: int | None = None  # bytes left of the body (Content-Length) or of the current chunk
        self._done = method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200
        if not self._chunked and not self._done and "content-length" in lowered:
            text = lowered["content-length"]
            if not text.isdigit() or int(text) > MAX_BODY:
                raise HTTPError(f"bad Content-Length {text[:20]!r}")
            self._left = int(text)
            self._done = self._left == 0

    def _line(self) -> bytes:
        line = self._file.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise HTTPError("header line too long")
        if not line:
            raise HTTPError("connection closed before the response was complete")
        return line

    def _next_chunk(self) -> None:
        size_line = self._line().split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise HTTPError(f"malformed chunk size {size_line[:20]!r}") from None
        if size == 0:
            while self._line().strip():  # trailers
                pass
            self._done = True
        self._left = size

    def read1(self, n: int = 65536) -> bytes:
        """Some of the body as soon as it arrives (at most n bytes); b"" at its end."""
        if self._done:
            return b""
        if self._chunked and not self._left:
            if self._left == 0:
                self._line()  # the CRLF after the previous chunk's data
            self._next_chunk()
            if self._done:
                return b""
        want = n if self._left is None else min(n, self._left)
        data = self._file.read1(want)
        if not data:
            if self._left is None:  # framed by the end of the connection
                self._done = True
                return b""
            raise HTTPError("connection closed in the middle of the body")
        if self._left is not None:
            self._left -= len(data)
            if not self._chunked and self._left == 0:
                self._done = True
        return data

    def read(self, limit: int = MAX_BODY) -> bytes:
        out = bytearray()
        while chunk := self.read1(1 << 20):
            out += chunk
            if len(out) > limit:
                raise HTTPError(f"response body larger than {limit >> 10} KiB")
        return bytes(out)

    def close(self) -> None:
        self._file.close()


def request(sock: socket.socket, method: str, path: str, host: str, headers: dict[str, str] | None = None,
            body: bytes | None = None, keep_alive: bool = False) -> Response:
    """Send one request on a connected socket and read the response's head. With `keep_alive` the
    connection may carry the next request once this response's body has been read whole (unless the
    response `will_close`)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"] + ([] if keep_alive else ["Connection: close"])
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
    return Response(sock, method)


# ---- server side: the local endpoints (health.py) ----------------------------------------------------

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"})


class Request:
    """One parsed request: method, target, headers (names lower-cased), body."""

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_request(data: bytes) -> Request:
    """A whole request (head and, if any, body) as read by the server; BadRequest says what to answer.
    Lines may end in CRLF or a bare LF."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, _, body = data.partition(b"\n\n")
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    words = lines[0].split()
    if len(words) != 3:
        raise BadRequest(400, f"Bad request syntax ({lines[0][:60]!r})")
    method, target, version = words
    major, dot, minor = version.removeprefix("HTTP/").partition(".")
    if not version.startswith("HTTP/") or not dot or not major.isdigit() or not minor.isdigit():
        raise BadRequest(400, f"Bad request version ({version[:20]!r})")
    if int(major) >= 2:
        raise BadRequest(505, f"Invalid HTTP version ({version[:20]})")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, "Too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if len(line) > MAX_HEADER_LINE:
            raise BadRequest(431, "Line too long")
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise BadRequest(400, f"Bad header line ({line[:60]!r})")
        headers[name.strip().lower()] = value.strip()
    if method not in METHODS:
        raise BadRequest(501, f"Unsupported method ({method[:20]!r})")
    return Request(method, target, headers, body)


def http_date(now: float) -> str:
    """RFC 9110's IMF-fixdate, without email.utils (which would bring most of the email package)."""
    t = time.gmtime(now)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def response(status: int, body: bytes, headers: dict[str, str] | None = None, head_only: bool = False,
             now: float | None = None) -> bytes:
    """A whole HTTP/1.0 answer (one request per connection): status line, Date, the given headers,
    Content-Length, and a plain-text Content-Type unless one is given."""
    given = headers or {}
    date = http_date(time.time() if now is None else now)
    lines = [f"HTTP/1.0 {status} {REASONS.get(status, 'Unknown')}", f"Date: {date}"]
    lines += [f"{k}: {v}" for k, v in given.items()]
    if not any(k.lower() == "content-type" for k in given):
        lines.append("Content-Type: text/plain; charset=utf-8")
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
