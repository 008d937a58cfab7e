"""Legacy xtables tables (the kernel's ip_tables and ip6_tables) as the kernel holds them.

A table is one blob of entries, read with IPT_SO_GET_INFO + IPT_SO_GET_ENTRIES and replaced whole
with IPT_SO_SET_REPLACE (then IPT_SO_SET_ADD_COUNTERS gives the surviving rules their counters
back): what libiptc does for iptables-legacy and iptables-legacy-restore. An entry is a fixed IP
header, its matches and one target. Chains exist only by convention: a user chain is an ERROR
entry carrying its name, its rules and an unconditional RETURN; a built-in chain starts at its
hook's entry offset and ends with its policy at the hook's underflow offset. A jump is a standard
target whose verdict is the byte offset of the rule it continues at.

`splice` rewrites chosen chains of a table and leaves every other entry as it was, moving the jump
offsets that point past a change. This module is the format, pure (the platform's struct layout, learnt
from ctypes, is xtables_layout.py); the socket options that read and replace a table are
iptables_kernel.py's `Kernel`. No libxtables, and so no per-family limit on which extensions one process can build.
"""

from __future__ import annotations

import struct
import sys
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import NamedTuple

# Imported "as" themselves: names callers (tests, and the image's layout checks) import from here, as before
# the struct layout moved to a module of its own.
from firewall.xtables_layout import COUNTER, POINTER, XT_ALIGN, Layout
from firewall.xtables_layout import COUNTERS_INFO as COUNTERS_INFO
from firewall.xtables_layout import GET_ENTRIES as GET_ENTRIES
from firewall.xtables_layout import HDR as HDR
from firewall.xtables_layout import I32 as I32
from firewall.xtables_layout import LAYOUT as LAYOUT
from firewall.xtables_layout import REPLACE as REPLACE
from firewall.xtables_layout import align as align
from firewall.xtables_layout import ext as ext

NAMES_FILE = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}
HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
SO_SET_REPLACE = SO_GET_INFO = 64  # IPT_BASE_CTL; IP6T_* share the numbers
SO_SET_ADD_COUNTERS = SO_GET_ENTRIES = 65
ACCEPT, RETURN = -2, -5  # standard verdicts: -NF_ACCEPT - 1, XT_RETURN
U16x2 = struct.Struct("=HH")
GETINFO = struct.Struct("=32sI5I5III")  # struct ipt_getinfo: only u32s, the same everywhere

# Here rather than in xtables_layout.py: which layouts the writer trusts is its decision, not the layout's
# (and a test stands in for another platform by setting xtables.ABI before unvouched() reads it).
# The platforms whose layout has been run against a kernel (x86_64; i386 through x86_64's compat layer) or,
# for 32-bit ARM, checked under emulation against the kernel's UAPI sizes: (byte order, pointer, XT_ALIGN).
VOUCHED = {("little", 8, 8): "64-bit", ("little", 4, 4): "i386", ("little", 4, 8): "32-bit ARM"}
ABI = (sys.byteorder, POINTER, XT_ALIGN)


def unvouched() -> str | None:
    """Why the legacy writer will not run on this platform, or None when its layout is one it is proven on."""
    if ABI in VOUCHED:
        return None
    order, pointer, xt_align = ABI
    return (f"the legacy iptables writer is not proven on this platform ({order}-endian, {pointer * 8}-bit "
            f"pointers, 64-bit values aligned to {xt_align}); use nftables")


class TableError(Exception):
    """The kernel refused, or a table cannot be rewritten safely; `errno` when the kernel said so."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def tables(fam: int) -> set[str]:
    """Legacy tables instantiated in this network namespace (reading this file creates none)."""
    try:
        with open(NAMES_FILE[fam]) as f:
            return set(f.read().split())
    except OSError:
        return set()


# ---- one table, parsed --------------------------------------------------------------------------------


class Chain:
    __slots__ = ("name", "hook", "start", "body", "end", "stop")

    def __init__(self, name: str, hook: int | None, start: int, body: int, end: int, stop: int) -> None:
        self.name = name
        self.hook = hook  # the hook of a built-in chain
        self.start = start  # its first entry: the ERROR head of a user chain, the first rule of a built-in one
        self.body = body  # its first rule (where jumps to it land)
        self.end = end  # its last entry: the RETURN of a user chain, the policy of a built-in one
        self.stop = stop  # the offset after `end`


class Table:
    """A table as read from the kernel, with counters and internal marks zeroed (`blob`): two reads of an
    unchanged table give the same `info` and `blob`. Its chains are worked out only when asked for."""

    def __init__(self, lay: Layout, name: str, info: tuple[int, ...], raw: bytes) -> None:
        self.lay, self.name, self.info = lay, name, info  # info: valid_hooks, hook_entry, underflow, num_entries
        self.valid_hooks = info[0]
        self.hook_entry, self.underflow = info[1:6], info[6:11]
        self.num_entries = info[11]
        blob = bytearray(raw)
        offs: list[int] = []
        jumps: list[tuple[int, int, int]] = []  # (entry, position of its verdict, verdict)
        errors: list[int] = []
        zero = bytes(lay.volatile)
        at, comefrom, size, o = lay.offsets_at, lay.comefrom_at, len(blob), 0
        unpack, verdict = U16x2.unpack_from, I32.unpack_from
        while o < size:
            target_offset, next_offset = unpack(blob, o + at)
            if next_offset < lay.size or target_offset < lay.size or target_offset + HDR > next_offset:
                raise TableError(f"{name}: malformed entry at offset {o}")
            t = o + target_offset
            blob[o + comefrom:o + lay.size] = zero
            if blob[t + 2] == 0:  # the standard target has an empty name
                v = verdict(blob, t + HDR)[0]
                if v >= 0:
                    jumps.append((o, t + HDR, v))
            elif blob[t + 2:t + 8] == b"ERROR\0":
                errors.append(o)
            offs.append(o)
            o += next_offset
        if len(offs) != self.num_entries or not errors or errors[-1] != offs[-1]:
            raise TableError(f"{name}: {len(offs)} entries, expected {self.num_entries} ending with ERROR")
        self.raw, self.blob, self.offs, self.jumps, self._errors = raw, bytes(blob), offs, jumps, errors

    @cached_property
    def index(self) -> dict[int, int]:
        """Entry number by offset."""
        return {o: i for i, o in enumerate(self.offs)}

    @cached_property
    def chains(self) -> list[Chain]:
        """The chains in table order."""
        hooks = {self.hook_entry[h]: h for h in range(len(HOOKS)) if self.valid_hooks & (1 << h)}
        errors, offs, index = self._errors, self.offs, self.index
        starts = sorted({*hooks, *errors[:-1]})
        chains: list[Chain] = []
        for n, start in enumerate(starts):
            stop = starts[n + 1] if n + 1 < len(starts) else errors[-1]
            i = index.get(start)
            last = index.get(stop, len(offs)) - 1
            if i is None or last < i:
                raise TableError(f"{self.name}: a chain starts inside an entry at offset {start}")
            if start in hooks:
                h = hooks[start]
                chain = Chain(HOOKS[h], h, start, start, offs[last], stop)
                if chain.end != self.underflow[h]:
                    raise TableError(f"{self.name}: the policy of {HOOKS[h]} is not its last entry")
            else:
                t = start + U16x2.unpack_from(self.blob, start + self.lay.offsets_at)[0]
                label = self.blob[t + HDR:t + HDR + 30].split(b"\0", 1)[0].decode(errors="replace")
                chain = Chain(label, None, start, offs[i + 1] if i + 1 <= last else stop, offs[last], stop)
            chains.append(chain)
        return chains

    @cached_property
    def by_name(self) -> dict[str, Chain]:
        return {c.name: c for c in self.chains}

    def entries(self, chain: Chain) -> list[bytes]:
        """The rules of a chain (without its head, RETURN or policy), counters zeroed."""
        first, last = self.index[chain.body], self.index[chain.end]
        bounds = [*self.offs[first:last], chain.end]
        return [self.blob[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    def jumps_to(self, chain: Chain, within: Chain | None = None) -> list[int]:
        """Offsets of the entries that jump (or go) to `chain`, optionally only those inside `within`."""
        return [o for o, _, v in self.jumps if v == chain.body
                and (within is None or within.start <= o < within.stop)]

    def our_jumps(self, chain: Chain, base: Chain) -> list[int]:
        """The entries of `base` that are exactly the jump `splice` installs to `chain` (unconditional, no
        match, counters aside): any other rule that jumps there is someone else's."""
        ours = self.lay.standard(chain.body)  # its offsets too: an entry with more after it is not ours
        return [o for o in self.jumps_to(chain, base) if self.blob[o:o + len(ours)] == ours]

    def jumps_described(self, offsets: Iterable[int]) -> str:
        """Where the entries at `offsets` are, for an error: "OUTPUT rule 2, PREROUTING rule 1"."""
        out = []
        for o in offsets:
            chain = next(c for c in self.chains if c.start <= o < c.stop)
            out.append(f"{chain.name} rule {self.index[o] - self.index[chain.body] + 1}")
        return ", ".join(out)


class Spliced:
    """A table rewritten by `splice`, ready for `Kernel.replace`."""

    __slots__ = ("blob", "entries", "hook_entry", "underflow", "counters", "offs")

    def __init__(self, blob: bytes, entries: int, hook_entry: list[int], underflow: list[int],
                 counters: list[tuple[int, int, int]], offs: list[int]) -> None:
        self.blob, self.entries, self.hook_entry, self.underflow = blob, entries, hook_entry, underflow
        self.counters = counters  # runs of (new entry number, old entry number, count) that keep their counters
        self.offs = offs  # where each entry starts

    def counters_from(self, old: bytes) -> bytes:
        """The counters to add back after the replace, from those the kernel returned for the old table."""
        out = bytearray(self.entries * COUNTER)
        for new, src, n in self.counters:
            out[new * COUNTER:(new + n) * COUNTER] = old[src * COUNTER:(src + n) * COUNTER]
        return bytes(out)


def mask(lay: Layout, raw: bytes, offs: Iterable[int]) -> bytes:
    """`raw` with the counters and internal marks of the entries at `offs` zeroed: what Table.blob holds
    when the entries start there (a table read again costs this loop, not a parse)."""
    blob = bytearray(raw)
    zero, at, end = bytes(lay.volatile), lay.comefrom_at, lay.size
    for o in offs:
        blob[o + at:o + end] = zero
    return bytes(blob)


Owned = Mapping[str, tuple[str | None, list[bytes] | None]]


def splice(table: Table, owned: Owned) -> Spliced:
    """Rewrite the chains in `owned` ({chain: (built-in chain that jumps to it, or None for no jump; its new
    rules, or None to remove it)}) and keep every other entry as it is. A chain that stays is reached by
    exactly one jump of ours from its built-in chain: the first one found stays where it is; when there is
    none, one goes at the top. A new chain goes among the user chains in name order, as iptables puts it."""
    drop, add_jump = _jump_changes(table, owned)
    pieces, first_piece = _pieces(table, owned, drop, add_jump)
    laid = _lay_out(table, owned, pieces)
    return _relink(table, owned, pieces, first_piece, laid)


def _jump_changes(table: Table, owned: Owned) -> tuple[set[int], dict[str, list[str]]]:
    """The old jump entries that go, and for each built-in chain the owned chains it gets a new jump to."""
    drop: set[int] = set()
    add_jump: dict[str, list[str]] = {}
    for name, (base, rules) in owned.items():
        if base is not None and (table.by_name.get(base) is None or table.by_name[base].hook is None):
            raise TableError(f"{table.name}: no built-in chain {base} for {name}")
        old = table.by_name.get(name)
        if old is not None and old.hook is not None:
            raise TableError(f"{table.name}: {name} is a built-in chain")
        # Our jump is recognised by its exact bytes; a rule of anyone else's that jumps to our chain, in the
        # base chain or anywhere, is theirs and stays as it is (it follows the chain when the chain moves).
        found = table.our_jumps(old, table.by_name[base]) if old and base else []
        if old is not None and rules is None:
            others = [o for o in table.jumps_to(old) if o not in found]
            if others:
                raise TableError(f"{table.name}: chain {name} is kept: rules we did not install jump to it "
                                 f"({table.jumps_described(others)}); delete them, then flush again")
        drop.update(found if rules is None else found[1:])
        if base is not None and rules is not None and not found:
            add_jump.setdefault(base, []).append(name)
    return drop, add_jump


class _Piece(NamedTuple):
    """A run of the new table: "copy" keeps the old entries [start, stop); "entry" is a new chain head or
    RETURN; "rules" the rules of owned chain `chain`; "jump" a new jump to `chain` (its verdict is set once
    the chains' new places are known)."""

    kind: str
    data: bytes = b""
    entries: int = 1
    chain: str = ""
    start: int = 0
    stop: int = 0


def _pieces(table: Table, owned: Owned, drop: set[int],
            add_jump: dict[str, list[str]]) -> tuple[list[_Piece], dict[str, int]]:
    """The new table in table order, and the first piece of each built-in chain."""
    lay = table.lay
    pieces: list[_Piece] = []
    first_piece: dict[str, int] = {}

    def emit_owned(name: str) -> None:
        rules = owned[name][1]
        assert rules is not None
        pieces.append(_Piece("entry", lay.error(name)))
        pieces.append(_Piece("rules", b"".join(rules), len(rules), name))
        pieces.append(_Piece("entry", lay.standard(RETURN)))

    pending = sorted(n for n, (_, r) in owned.items() if r is not None and n not in table.by_name)
    for chain in table.chains:
        if chain.hook is None:
            while pending and pending[0] < chain.name:
                emit_owned(pending.pop(0))
            if chain.name in owned:
                if owned[chain.name][1] is not None:
                    emit_owned(chain.name)
                continue
        else:
            first_piece[chain.name] = len(pieces)
            for target in add_jump.get(chain.name, ()):
                pieces.append(_Piece("jump", lay.standard(0), chain=target))
        pos = chain.start
        for o in sorted(o for o in drop if chain.start <= o < chain.stop):
            if pos < o:
                pieces.append(_Piece("copy", start=pos, stop=o))
            pos = o + U16x2.unpack_from(table.blob, o + lay.offsets_at)[1]
        pieces.append(_Piece("copy", start=pos, stop=chain.stop))  # never empty: the policy or RETURN stays
    while pending:
        emit_owned(pending.pop(0))
    pieces.append(_Piece("copy", start=table.offs[-1], stop=len(table.blob)))  # the table's closing ERROR
    return pieces, first_piece


class _Laid(NamedTuple):
    """The pieces laid out: the bytes, where each piece and entry starts, where old entries went, where each
    owned chain's rules start, and the runs of entries that keep their counters."""

    blob: bytearray
    entries: int
    piece_at: list[int]
    offs: list[int]
    moved: list[tuple[int, int, int]]  # (old start, old stop, new start), ascending
    bodies: dict[str, int]
    runs: list[tuple[int, int, int]]  # (new entry number, old entry number, count)


def _lay_out(table: Table, owned: Owned, pieces: list[_Piece]) -> _Laid:
    moved: list[tuple[int, int, int]] = []
    piece_at: list[int] = []
    bodies: dict[str, int] = {}
    runs: list[tuple[int, int, int]] = []
    parts: list[bytes] = []
    offs: list[int] = []
    offset = count = 0
    for piece in pieces:
        piece_at.append(offset)
        if piece.kind == "copy":
            a, b = piece.start, piece.stop
            first = table.index[a]
            n = table.index.get(b, len(table.offs)) - first
            moved.append((a, b, offset))
            runs.append((count, first, n))
            parts.append(table.blob[a:b])
            shift = offset - a
            offs += [o + shift for o in table.offs[first:first + n]]
            offset, count = offset + b - a, count + n
            continue
        if piece.kind != "rules":
            offs.append(offset)
        else:
            rules = owned[piece.chain][1] or []
            at = offset
            for rule in rules:
                offs.append(at)
                at += len(rule)
            bodies[piece.chain] = offset
            old = table.by_name.get(piece.chain)
            if old is not None:  # a rewritten chain: the rules that stay keep their counters
                index: dict[bytes, list[int]] = {}
                for k, rule in enumerate(table.entries(old), start=table.index[old.body]):
                    index.setdefault(rule, []).append(k)
                for k, rule in enumerate(rules):
                    if index.get(rule):
                        runs.append((count + k, index[rule].pop(0), 1))
        parts.append(piece.data)
        offset, count = offset + len(piece.data), count + piece.entries
    return _Laid(bytearray(b"".join(parts)), count, piece_at, offs, moved, bodies, runs)


def _relink(table: Table, owned: Owned, pieces: list[_Piece], first_piece: dict[str, int], laid: _Laid) -> Spliced:
    """Point every kept jump, every new jump and every hook at where its target is now."""
    lay, moved, blob = table.lay, laid.moved, laid.blob
    starts = [m[0] for m in moved]

    def relocate(v: int) -> int:
        """Where the old entry at offset `v` (or the owned chain whose rules started there) is now."""
        for name, (_, rules) in owned.items():
            old = table.by_name.get(name)
            if old is not None and v == old.body:
                if rules is None:
                    raise TableError(f"{table.name}: a rule still jumps to {name}")
                return laid.bodies[name]
        k = bisect_right(starts, v) - 1
        if k >= 0 and v < moved[k][1]:
            return v - moved[k][0] + moved[k][2]
        raise TableError(f"{table.name}: a rule jumps to offset {v}, where nothing stays")

    for o, pos, v in table.jumps:  # jumps in the entries that were kept
        k = bisect_right(starts, o) - 1
        if k >= 0 and o < moved[k][1]:
            # A rule without a target is stored as a jump to the entry after it (libiptc's fallthrough):
            # it keeps pointing right after itself, whatever comes there now.
            fallthrough = v == o + U16x2.unpack_from(table.blob, o + lay.offsets_at)[1]
            new = v - moved[k][0] + moved[k][2] if fallthrough else relocate(v)
            if new != v:
                I32.pack_into(blob, pos - moved[k][0] + moved[k][2], new)
    for k, piece in enumerate(pieces):
        if piece.kind == "jump":
            I32.pack_into(blob, laid.piece_at[k] + lay.size + HDR, laid.bodies[piece.chain])
    hook_entry, underflow = list(table.hook_entry), list(table.underflow)
    for chain in table.chains:
        if chain.hook is not None:
            hook_entry[chain.hook] = laid.piece_at[first_piece[chain.name]]
            underflow[chain.hook] = relocate(chain.end)
    return Spliced(bytes(blob), laid.entries, hook_entry, underflow, laid.runs, laid.offs)
