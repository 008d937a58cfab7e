"""The kernel side of the iptables driver: one family's legacy xtables tables, read and committed with
the kernel's own socket options (`Kernel`; the table format and the splice are firewall/xtables.py, the
structs' layout firewall/xtables_layout.py), in the driver's own process.

Why in-process (it was one long-lived worker interpreter per family, spoken to over a pipe):
- memory: each worker was a second interpreter, about 12 MB (20 MB holding 10,000 rules); bench_boot
  measured the container's peak at 62.5 MiB against upstream's 39.8 with the two of them;
- no fork at all, so nothing can deadlock on a lock another thread held at fork time (the reason the
  per-call `iptables` children had to go);
- the calls are bounded without a process to kill: IPT_SO_GET_* and IPT_SO_SET_* return as soon as
  the kernel has copied the table (a mutex held only for other processes' copies), and the one real
  wait, another program's xtables lock, is polled with a deadline by the driver (FirewallBusy).
What went with the workers: both families read in parallel (the v6 table is read after the v4 one;
10,000 rules are one family's) and the kill/restart of a stuck worker, which nothing here can need.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from firewall import xtables
from firewall.errors import FirewallBusy, FirewallError
from firewall.xtables import (
    GETINFO,
    SO_GET_ENTRIES,
    SO_GET_INFO,
    SO_SET_ADD_COUNTERS,
    SO_SET_REPLACE,
    unvouched,
)
from firewall.xtables_layout import COUNTER, COUNTERS_INFO, GET_ENTRIES, LAYOUT, REPLACE, Layout

# {table: {owned chain: (the built-in chain that jumps to it, or None; its rules, or None to remove it)}}
Tables = Mapping[str, xtables.Owned]


@dataclass(frozen=True)
class ReadBack:
    """What `Server.read` found: `same` when nothing changed since the version asked about (then `chains` is
    empty), else each owned chain reached from its base chain: (how many of our jumps reach it, its entries)."""

    version: int
    same: bool
    chains: dict[str, tuple[int, list[bytes]]]


# ---- the kernel --------------------------------------------------------------------------------------


libc = ctypes.CDLL(None, use_errno=True)
libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


class Kernel:
    """The ip_tables or ip6_tables socket options of this network namespace, through one raw socket."""

    def __init__(self, fam: int) -> None:
        self.lay = LAYOUT[fam]
        self._sock: socket.socket | None = None
        self._buffers: dict[str, ctypes.Array[ctypes.c_char]] = {}

    def close(self) -> None:
        """Close the raw socket and drop the read buffers (a table of 10,000 rules is about 3 MB)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffers.clear()

    def _fd(self) -> int:
        if self._sock is None:
            why = unvouched()
            if why:
                raise xtables.TableError(why)
            try:
                self._sock = socket.socket(self.lay.af, socket.SOCK_RAW, socket.IPPROTO_RAW)
            except OSError as exc:
                err = exc.errno or 0
                raise xtables.TableError(f"cannot open a raw socket: {os.strerror(err)}", err) from None
        return self._sock.fileno()

    def _get(self, opt: int, buf: ctypes.Array[ctypes.c_char], what: str) -> None:
        size = ctypes.c_uint(len(buf))
        if libc.getsockopt(self._fd(), self.lay.level, opt, buf, ctypes.byref(size)) != 0:
            err = ctypes.get_errno()
            raise xtables.TableError(f"{what}: {os.strerror(err)}", err)

    def info(self, table: str) -> tuple[int, ...]:
        """valid_hooks, hook_entry[5], underflow[5], num_entries, size. This instantiates the table in
        this network namespace when it was not yet (and fails when its module is missing)."""
        buf = ctypes.create_string_buffer(GETINFO.pack(table.encode(), 0, *[0] * 10, 0, 0), GETINFO.size)
        self._get(SO_GET_INFO, buf, f"table {table}")
        return GETINFO.unpack(buf.raw)[1:]

    def read(self, table: str) -> xtables.Table:
        return xtables.Table(self.lay, table, *self.read_raw(table))

    def read_raw(self, table: str) -> tuple[tuple[int, ...], bytes]:
        """(valid_hooks, hook_entry[5], underflow[5], num_entries) and the entries as the kernel gives them."""
        refused = 0
        for _ in range(5):  # the table may change size between the two calls
            info = self.info(table)
            size = info[-1]
            buf = self._buffers.get(table)
            if buf is None or len(buf) != GET_ENTRIES.size + size:
                # Kept for the next read of the same size: a fresh 4 MB buffer costs its page faults each time.
                buf = self._buffers[table] = ctypes.create_string_buffer(GET_ENTRIES.size + size)
            GET_ENTRIES.pack_into(buf, 0, table.encode(), size)
            try:
                self._get(SO_GET_ENTRIES, buf, f"table {table}")
            except xtables.TableError as exc:
                if exc.errno == 11 or exc.errno == 22:  # EAGAIN, EINVAL: replaced meanwhile
                    refused += exc.errno == 22
                    continue
                raise
            return info[:-1], ctypes.string_at(ctypes.addressof(buf) + GET_ENTRIES.size, size)
        if refused == 5:  # the size it gave us, refused each time: not a table that moves
            raise xtables.TableError(f"table {table}: the kernel refused every read (EINVAL): it expects another "
                                     "layout (a 32-bit program on a 64-bit kernel without "
                                     "CONFIG_NETFILTER_XTABLES_COMPAT?)", 22)
        raise xtables.TableError(f"table {table}: changing too fast to be read")

    def replace(self, table: xtables.Table, blob: bytes, entries: int, hook_entry: Iterable[int],
                underflow: Iterable[int]) -> bytes:
        """Install `blob` in place of `table`; returns the old table's counters (EAGAIN when it changed)."""
        old = ctypes.create_string_buffer(max(1, table.num_entries * COUNTER))
        head = REPLACE.pack(table.name.encode(), table.valid_hooks, entries, len(blob), *hook_entry, *underflow,
                            table.num_entries, ctypes.addressof(old))
        data = ctypes.create_string_buffer(head + blob, len(head) + len(blob))
        if libc.setsockopt(self._fd(), self.lay.level, SO_SET_REPLACE, data, len(data)) != 0:
            err = ctypes.get_errno()
            raise xtables.TableError(f"table {table.name}: {os.strerror(err)}", err)
        return old.raw[:table.num_entries * COUNTER]

    def target_revision(self, name: str, revisions: Iterable[int]) -> int | None:
        """The first of `revisions` of target `name` this kernel has (None: none, or the module is missing)."""
        for revision in revisions:
            buf = ctypes.create_string_buffer(struct.pack("=29sB", name.encode(), revision), 30)
            size = ctypes.c_uint(len(buf))
            opt = self.lay.so_get_revision_target
            if libc.getsockopt(self._fd(), self.lay.level, opt, buf, ctypes.byref(size)) >= 0:
                return revision
        return None

    def add_counters(self, table: str, counters: bytes) -> None:
        data = ctypes.create_string_buffer(COUNTERS_INFO.pack(table.encode(), len(counters) // COUNTER) + counters)
        libc.setsockopt(self._fd(), self.lay.level, SO_SET_ADD_COUNTERS, data, len(data) - 1)


class Seen:
    """A table as last reported to the driver: its info, its entries with counters zeroed (`blob`), where
    the entries start, and the bytes last read (counters included), so that a table read again that did
    not change costs a comparison (or, when only counters moved, zeroing them at the known offsets)."""

    __slots__ = ("info", "blob", "offs", "raw")

    def __init__(self, info: tuple[int, ...], blob: bytes, offs: list[int], raw: bytes = b"") -> None:
        self.info, self.blob, self.offs, self.raw = info, blob, offs, raw

    def same(self, lay: Layout, info: tuple[int, ...], raw: bytes) -> bool:
        if info != self.info or len(raw) != len(self.blob):
            return False
        if raw == self.raw:
            return True
        if xtables.mask(lay, raw, self.offs) != self.blob:
            return False
        self.raw = raw
        return True


class Server:
    """One family's tables. `version` names the tables' content as last reported to the driver."""

    def __init__(self, fam: int) -> None:
        self.kernel = Kernel(fam)
        self.fam = fam
        self.version = 0
        self.seen: dict[str, Seen | None] = {}

    def _unchanged(self, name: str, now: tuple[tuple[int, ...], bytes] | None) -> bool:
        before = self.seen.get(name)
        if now is None or before is None:
            return now is None and before is None
        return before.same(self.kernel.lay, *now)

    def write(self, tables: Tables) -> int:
        """Rewrite the owned chains of each table (None: remove them); returns the version after it.
        The caller holds the xtables lock."""
        seen: dict[str, Seen | None] = {}
        present = xtables.tables(self.fam)
        refused: xtables.TableError | None = None
        for name, owned in tables.items():
            removal = all(rules is None for _, rules in owned.values())
            if name not in present and removal:
                seen[name] = None  # nothing to remove, and opening the table would create it
                continue
            try:
                seen[name] = self._commit(name, owned)
            except xtables.TableError as exc:
                # A removal goes on with the other tables (what can go, goes); a table it must leave as it
                # is (someone else's rule jumps to our chain there) is said once, at the end.
                if not removal or exc.errno:
                    raise
                refused = refused or exc
        self.version += 1
        self.seen = seen
        if refused is not None:
            raise refused
        return self.version

    def _commit(self, name: str, owned: xtables.Owned) -> Seen:
        """Splice `owned` into the table and replace it; returns what reading it back will give (the
        kernel keeps what we write; counters and its marks, zero in what we write, are masked)."""
        for _ in range(5):
            table = self.kernel.read(name)
            new = xtables.splice(table, owned)
            info = (table.valid_hooks, *new.hook_entry, *new.underflow, new.entries)
            if new.blob == table.blob and info == table.info:
                return Seen(table.info, table.blob, table.offs)
            try:
                old = self.kernel.replace(table, new.blob, new.entries, new.hook_entry, new.underflow)
            except xtables.TableError as exc:
                if exc.errno == 11:  # EAGAIN: someone replaced it since we read it
                    continue
                raise
            counters = new.counters_from(old)
            if counters.count(0) != len(counters):
                self.kernel.add_counters(name, counters)  # best effort, as a replace after ours resets them
            return Seen(info, new.blob, new.offs)
        raise FirewallError(f"table {name} keeps changing under us")

    def read(self, chains: Mapping[str, Mapping[str, str]], since: int) -> ReadBack:
        """The rules of the owned chains ({table: {chain: its built-in chain}}) that are reached by a jump
        from their built-in chain, and how many such jumps there are; only `same` when nothing changed
        since the version `since` was reported."""
        present = xtables.tables(self.fam)
        raw = {t: self.kernel.read_raw(t) if t in present else None for t in chains}
        if since == self.version and all(self._unchanged(t, now) for t, now in raw.items()):
            return ReadBack(since, True, {})
        read = {t: xtables.Table(self.kernel.lay, t, *now) if now else None for t, now in raw.items()}
        self.version += 1
        self.seen = {t: Seen(v.info, v.blob, v.offs, v.raw) if v else None for t, v in read.items()}
        found: dict[str, tuple[int, list[bytes]]] = {}
        for name, owned in chains.items():
            table = read[name]
            if table is None:
                continue
            for chain_name, base in owned.items():
                chain = table.by_name.get(chain_name)
                if chain is None or base not in table.by_name:
                    continue
                jumps = len(table.our_jumps(chain, table.by_name[base]))
                if jumps:
                    found[chain_name] = (jumps, table.entries(chain))
        return ReadBack(self.version, False, found)

    def probe(self, chain: str) -> None:
        """Create and delete a chain in `nat` (fails without ip_tables NAT, or without the rights). The
        caller holds the xtables lock."""
        self._commit("nat", {chain: (None, [])})
        self._commit("nat", {chain: (None, None)})

    def census(self, skip: list[str]) -> list[tuple[str, str, int]]:
        """(table, chain, rules) in the tables that exist, except the chains in `skip` and jumps to them."""
        out: list[tuple[str, str, int]] = []
        for name in sorted(xtables.tables(self.fam)):
            table = self.kernel.read(name)
            skipped = {table.by_name[c].body for c in skip if c in table.by_name}
            ours = {o for o, _, v in table.jumps if v in skipped}
            for chain in table.chains:
                if chain.name not in skip:
                    first, last = table.index[chain.body], table.index[chain.end]
                    out.append((name, chain.name, sum(1 for o in table.offs[first:last] if o not in ours)))
        return out

    def revision(self, target: str, revisions: list[int]) -> int | None:
        return self.kernel.target_revision(target, revisions)


@contextlib.contextmanager
def kernel_errors() -> Iterator[None]:
    """The kernel's refusals, and tables we cannot parse, as FirewallError (FirewallBusy where retrying helps)."""
    try:
        yield
    except FirewallBusy as exc:
        raise FirewallBusy(f"iptables (legacy): {exc}") from None
    except FirewallError as exc:
        raise FirewallError(f"iptables (legacy): {exc}") from None
    except xtables.TableError as exc:
        raise FirewallError(f"iptables (legacy): {exc}") from None
    except (OSError, ValueError, KeyError, IndexError) as exc:  # a table we cannot parse is a firewall error
        raise FirewallError(f"iptables (legacy): {type(exc).__name__}: {exc}") from None
