"""The nftables driver's call layer: how a libnftables JSON document reaches the kernel, and the two
questions the driver asks nf_tables directly over netlink.

A document (`dumps`) runs through Debian's `python3-nftables` binding when that imports, else through
`nft -j -f -` (`open_libnft` chooses); `Nfnetlink` asks for the ruleset's generation id and whether a
table exists, so that the driver can skip a listing, and how many rules a chain holds (the watch over
tailscaled's own chains, firewall/tschains.py). Separate from the rendering and the reading back
(nftables_render.py, nftables_read.py) because those are pure: everything here talks to the kernel.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from typing import Any, Protocol

from firewall.model import FirewallError
from firewall.paths import which

Json = dict[str, Any]
CLI_TIMEOUT = 30.0


class Libnft(Protocol):
    """Runs one libnftables JSON document as one transaction; returns the listed objects."""

    path: str

    def run(self, cmds: list[Json], terse: bool = False) -> list[Json]: ...

    def release(self) -> None:
        """Drop whatever is kept between commands (the next command starts afresh)."""


class Raw:
    """JSON text that goes into a document as it is: 10,000 map elements joined as text cost a third of
    what building and dumping them as lists does."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(cmds: list[Json]) -> str:
    """The libnftables JSON document for `cmds`, with each Raw put in place."""
    raws: list[str] = []

    def placeholder(obj: object) -> str:
        if not isinstance(obj, Raw):
            raise TypeError(f"{type(obj).__name__} in an nftables command")
        raws.append(obj.text)
        return f"@raw{len(raws) - 1}@"

    text = json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *cmds]}, default=placeholder)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@raw{i}@"', raw, 1)
    return text


def _objects(output: Any) -> list[Json]:
    if not output:
        return []
    return [o for o in output.get("nftables", []) if "metainfo" not in o]


NETLINK_NETFILTER = 12  # <linux/netlink.h>
ANSWER_TIMEOUT = 2.0  # seconds for nf_tables to answer one request (it answers in well under a millisecond)
NFPROTO = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6 (0: NFPROTO_UNSPEC)

class BindingLibnft:
    path = "binding"

    def __init__(self) -> None:
        from nftables import Nftables  # Debian python3-nftables; absent on PyPI

        # libnftables ends the whole process (exit status 3, "Unable to initialize Netlink socket") when the
        # kernel refuses a netfilter netlink socket (qemu-user, a kernel without nfnetlink): ask first, so
        # that it is an error detection can report in one line instead.
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER).close()
        except OSError as exc:
            raise OSError(exc.errno, f"no netfilter netlink socket here ({exc.strerror})") from None
        self._new = Nftables
        self._nft: Any = None  # the context, made by the first command after a release

    def run(self, cmds: list[Json], terse: bool = False) -> list[Json]:
        if self._nft is None:
            self._nft = self._new()
            self._nft.set_json_output(True)  # JSON out, and JSON in: libnftables parses the input as JSON first
        self._nft.set_terse_output(terse)
        rc, out, err = self._nft.cmd(dumps(cmds))
        if rc != 0:
            raise FirewallError(f"nftables: {err.strip()}")
        return _objects(json.loads(out)) if out else []

    def release(self) -> None:
        """Free the context, and with it the ruleset cache it keeps from its last command until the next
        one: a write caches every table of the ruleset at about 0.5 MiB each, 3.5 MiB beside tailscaled's
        six (measured in the boot benchmark). Kept, the cache makes our next change cheaper while nothing
        else has changed the ruleset (13 ms instead of 25 ms for one change among 10,000 mappings); the
        next command after a release makes a new context (0.1 ms) and fetches again."""
        self._nft = None  # nft_ctx_free, now: nothing else refers to it


class CliLibnft:
    path = "cli"

    def __init__(self, nft: str | None = None) -> None:
        found = nft or which("nft")
        if not found:
            raise FileNotFoundError("nft not found on PATH")
        self._nft = found

    def run(self, cmds: list[Json], terse: bool = False) -> list[Json]:
        argv = [self._nft, "-j", *(["-t"] if terse else []), "-f", "-"]
        try:
            proc = subprocess.run(argv, input=dumps(cmds), capture_output=True, text=True, timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise FirewallError(f"nftables (nft -j): no answer within {CLI_TIMEOUT:g}s") from None
        if proc.returncode != 0:
            raise FirewallError(f"nftables (nft -j): {proc.stderr.strip()}")
        return _objects(json.loads(proc.stdout)) if proc.stdout.strip() else []

    def release(self) -> None:
        pass  # each command is its own process


def open_libnft(prefer: str | None = None) -> tuple[Libnft, str]:
    """The binding where it imports, else the CLI. Returns the path and why it was chosen."""
    if prefer != "cli":
        try:
            return BindingLibnft(), "libnftables through the python3-nftables binding"
        except (ImportError, OSError) as exc:
            if prefer == "binding":
                raise
            why = f"python3-nftables binding unavailable ({exc}); using the nft -j CLI"
    else:
        why = "nft -j CLI requested"
    return CliLibnft(), why


class Nfnetlink:
    """Three questions to nf_tables over netlink, each well under a millisecond: the generation id of this
    network namespace, which changes with every committed transaction, ours or anyone's
    (NFT_MSG_GETGEN), whether a table exists (NFT_MSG_GETTABLE), and how many rules one chain holds (a
    dump of NFT_MSG_GETRULE that the kernel filters by table and chain). One socket stays open: closing
    a netlink socket here costs about 10 ms. None: could not ask."""

    SUBSYS = 10 << 8  # NFNL_SUBSYS_NFTABLES
    NEWTABLE, GETTABLE, NEWRULE, GETRULE, NEWGEN, GETGEN = 0, 1, 6, 7, 15, 16
    NLMSG_ERROR, NLMSG_DONE, NLM_F_REQUEST, NLM_F_DUMP = 2, 3, 1, 0x300

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def _send(self, kind: int, fam: int, attrs: bytes, flags: int) -> socket.socket:
        """One request of `kind` for address family `fam` (0: any), numbered `self._seq`; the socket the
        answer comes on."""
        self._seq += 1
        msg = struct.pack("=LHHLLBBH", 20 + len(attrs), self.SUBSYS | kind, flags, self._seq, 0,
                          NFPROTO.get(fam, 0), 0, 0) + attrs
        if self._sock is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._sock.settimeout(ANSWER_TIMEOUT)  # a missing answer is "could not ask", never a hang
        self._sock.send(msg)
        return self._sock

    def _ask(self, kind: int, fam: int, attrs: bytes = b"") -> tuple[int, bytes] | None:
        """The reply's message type and payload (after the nfgenmsg header)."""
        try:
            sock = self._send(kind, fam, attrs, self.NLM_F_REQUEST)
            while True:
                data = sock.recv(65536)
                length, reply, _, seq = struct.unpack_from("=LHHL", data)
                if seq == self._seq:
                    return reply, data[16:length]
        except (OSError, struct.error):
            return None

    def generation(self) -> int | None:
        answer = self._ask(self.GETGEN, 0)
        if answer is None or answer[0] != self.SUBSYS | self.NEWGEN:
            return None
        body, pos = answer[1], 4  # after nfgenmsg
        while pos + 4 <= len(body):
            alen, atype = struct.unpack_from("=HH", body, pos)
            if atype & 0x7FFF == 1 and alen >= 8:  # NFTA_GEN_ID, big endian
                return int(struct.unpack_from("!L", body, pos + 4)[0])
            pos += (alen + 3) & ~3
        return None

    def has_table(self, fam: int, name: str) -> bool | None:
        answer = self._ask(self.GETTABLE, fam, _attr(1, name))  # NFTA_TABLE_NAME
        if answer is None:
            return None
        if answer[0] == self.SUBSYS | self.NEWTABLE:
            return True
        if answer[0] == self.NLMSG_ERROR and struct.unpack_from("=i", answer[1])[0] == -2:  # ENOENT
            return False
        return None

    def rule_count(self, fam: int, table: str, chain: str) -> int | None:
        """The rules in `chain` of `table`; 0 where either does not exist (the kernel's filtered dump
        finds nothing then)."""
        count = 0
        try:
            sock = self._send(self.GETRULE, fam, _attr(1, table) + _attr(2, chain),  # NFTA_RULE_TABLE, _CHAIN
                              self.NLM_F_REQUEST | self.NLM_F_DUMP)
            while True:
                data, pos = sock.recv(1 << 16), 0
                while pos + 16 <= len(data):
                    length, kind, _, seq = struct.unpack_from("=LHHL", data, pos)
                    if length < 16:
                        return None
                    if seq == self._seq:
                        if kind == self.NLMSG_DONE:
                            return count
                        if kind == self.NLMSG_ERROR:
                            return None
                        count += kind == self.SUBSYS | self.NEWRULE
                    pos += (length + 3) & ~3
        except (OSError, struct.error):
            return None


def _attr(kind: int, text: str) -> bytes:
    """A netlink string attribute, NUL-terminated and padded to 4 bytes."""
    raw = text.encode() + b"\0"
    return (struct.pack("=HH", 4 + len(raw), kind) + raw).ljust((4 + len(raw) + 3) & ~3, b"\0")
