"""The stale-socket removal before tailscaled starts (a restarted container keeps the old socket file)."""

from __future__ import annotations

import socket
from pathlib import Path

from containerboot.tailscale.tailscaled import remove_stale_socket


def test_stale_tailscaled_socket_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    stale, live, plain = tmp_path / "stale.sock", tmp_path / "live.sock", tmp_path / "file"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(stale))
    old.close()  # the file stays, nobody listens: what a restarted container finds
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(live))
    server.listen()
    plain.write_text("")
    try:
        assert remove_stale_socket(str(stale)) and not stale.exists()
        assert not remove_stale_socket(str(live)) and live.exists()
        assert not remove_stale_socket(str(plain)) and plain.exists()
        assert not remove_stale_socket(str(tmp_path / "missing"))
    finally:
        server.close()
