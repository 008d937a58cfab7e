"""Tiny HTTP server for lab namespaces: answers every GET with "<name> <client address>".

Usage: echo_server.py NAME HOST PORT. Prints "ready" once it listens.
"""

import socket
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        client = self.client_address[0].removeprefix("::ffff:")  # IPv4 on a dual-stack socket
        body = f"{self.server.name} {client}\n".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which stalls without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def main() -> None:
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    Server.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = Server((host, port), Handler)
    server.name = name  # type: ignore[attr-defined]
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
