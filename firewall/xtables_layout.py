"""The kernel's xtables structs as this platform lays them out: struct ipt_entry and ip6t_entry (`Layout`,
one per family in `LAYOUT`), a match's or target's header (`ext`), and the socket options' ipt_replace,
ipt_get_entries and xt_counters_info.

Apart from the table format (xtables.py) because this is the one part that depends on the platform,
and the only one that needs ctypes: everything else works on bytes through these sizes and offsets.
"""

from __future__ import annotations

import ctypes
import socket
import struct

HDR = 32  # struct xt_entry_match / xt_entry_target header: u16 size, char name[29], u8 revision
I32 = struct.Struct("=i")
COUNTER = 16  # struct xt_counters: u64 packets, u64 bytes

# The kernel reads these with the calling program's ABI (a 32-bit program on a 64-bit kernel through its
# compat layer), so sizes and offsets are taken from ctypes, which lays out C structs as this platform's C
# compiler does: where a u64 is aligned (8 on x86_64, arm64 and 32-bit ARM EABI, 4 on i386) moves the
# counters of ip6t_entry and the entries after the ipt_replace header, and the pointer in ipt_replace is 4 or
# 8 bytes. Byte order is native throughout ("=" formats).

C = ctypes


class _XtAlign(C.Structure):  # struct _xt_align: XT_ALIGN rounds to the strictest alignment of these
    _fields_ = [("u8", C.c_uint8), ("u16", C.c_uint16), ("u32", C.c_uint32), ("u64", C.c_uint64)]


class _XtCounters(C.Structure):
    _fields_ = [("pcnt", C.c_uint64), ("bcnt", C.c_uint64)]


class _IptIp(C.Structure):  # struct ipt_ip
    _fields_ = [("src", C.c_uint32), ("dst", C.c_uint32), ("smsk", C.c_uint32), ("dmsk", C.c_uint32),
                ("iniface", C.c_char * 16), ("outiface", C.c_char * 16), ("iniface_mask", C.c_ubyte * 16),
                ("outiface_mask", C.c_ubyte * 16), ("proto", C.c_uint16), ("flags", C.c_uint8),
                ("invflags", C.c_uint8)]


class _Ip6tIp6(C.Structure):  # struct ip6t_ip6 (struct in6_addr is aligned as its u32 member)
    _fields_ = [("src", C.c_uint32 * 4), ("dst", C.c_uint32 * 4), ("smsk", C.c_uint32 * 4),
                ("dmsk", C.c_uint32 * 4), ("iniface", C.c_char * 16), ("outiface", C.c_char * 16),
                ("iniface_mask", C.c_ubyte * 16), ("outiface_mask", C.c_ubyte * 16), ("proto", C.c_uint16),
                ("tos", C.c_uint8), ("flags", C.c_uint8), ("invflags", C.c_uint8)]


def _entry(ip: type[C.Structure]) -> type[C.Structure]:
    """struct ipt_entry / ip6t_entry: the IP part, then the header fields and the counters."""
    return type(f"_Entry{ip.__name__}", (C.Structure,), {"_fields_": [
        ("ip", ip), ("nfcache", C.c_uint32), ("target_offset", C.c_uint16), ("next_offset", C.c_uint16),
        ("comefrom", C.c_uint32), ("counters", _XtCounters)]})


_ENTRY = {4: _entry(_IptIp), 6: _entry(_Ip6tIp6)}


class _Replace(C.Structure):  # struct ipt_replace, up to its entries (aligned as an entry: the tail padding)
    _fields_ = [("name", C.c_char * 32), ("valid_hooks", C.c_uint32), ("num_entries", C.c_uint32),
                ("size", C.c_uint32), ("hook_entry", C.c_uint32 * 5), ("underflow", C.c_uint32 * 5),
                ("num_counters", C.c_uint32), ("counters", C.c_void_p), ("entries", _ENTRY[4] * 0)]


class _GetEntries(C.Structure):  # struct ipt_get_entries
    _fields_ = [("name", C.c_char * 32), ("size", C.c_uint32), ("entrytable", _ENTRY[4] * 0)]


class _CountersInfo(C.Structure):  # struct xt_counters_info
    _fields_ = [("name", C.c_char * 32), ("num_counters", C.c_uint32), ("counters", _XtCounters * 0)]


XT_ALIGN = C.alignment(_XtAlign)
POINTER = C.sizeof(C.c_void_p)
REPLACE = struct.Struct(f"=32sIII5I5II{'Q' if POINTER == 8 else 'I'}{C.sizeof(_Replace) - 88 - POINTER}x")
GET_ENTRIES = struct.Struct(f"=32sI{C.sizeof(_GetEntries) - 36}x")
COUNTERS_INFO = struct.Struct(f"=32sI{C.sizeof(_CountersInfo) - 36}x")


def align(n: int) -> int:
    return (n + XT_ALIGN - 1) & ~(XT_ALIGN - 1)  # XT_ALIGN


class Layout:
    """Sizes and offsets of struct ipt_entry (IPv4) or struct ip6t_entry (IPv6) on this platform."""

    def __init__(self, fam: int) -> None:
        v6 = fam == 6
        entry = _ENTRY[fam]
        self.fam = fam
        self.af = socket.AF_INET6 if v6 else socket.AF_INET
        self.level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
        self.so_get_revision_target = 69 if v6 else 67
        self.addr_len = 16 if v6 else 4
        # the IP part: src, dst, smsk, dmsk, iniface, outiface, iniface_mask, outiface_mask, proto, (tos,) flags, inv
        self.ip = struct.Struct("=16s16s16s16s16s16s16s16sHBBB3x" if v6 else "=4s4s4s4s16s16s16s16sHBB")
        self.size = C.sizeof(entry)  # entry header: ip, nfcache, target_offset, next_offset, comefrom, counters
        self.offsets_at = entry.target_offset.offset  # u16 target_offset, u16 next_offset
        self.comefrom_at = entry.comefrom.offset
        self.counters_at = entry.counters.offset
        assert self.ip.size == C.sizeof(_Ip6tIp6 if v6 else _IptIp) == entry.nfcache.offset
        assert self.counters_at + COUNTER == self.size
        # After the IP part: nfcache, the offsets, comefrom, the padding before the counters (ip6t_entry
        # where a u64 is 8-aligned), the counters.
        pad = self.counters_at - self.comefrom_at - 4
        self.tail = struct.Struct(f"=IHHI{pad}xQQ")
        # What the kernel may change in an entry it holds (comefrom, the counters, the padding between):
        # zeroed wherever entries are compared.
        self.volatile = self.size - self.comefrom_at
        self.zero_ip = bytes(self.ip.size)

    def entry(self, ip: bytes, matches: bytes, target: bytes) -> bytes:
        target_offset = self.size + len(matches)
        return ip + self.tail.pack(0, target_offset, target_offset + len(target), 0, 0, 0) + matches + target

    def standard(self, verdict: int) -> bytes:
        """An unconditional entry with a standard target: a policy, a RETURN, or a jump (verdict = offset)."""
        return self.entry(self.zero_ip, b"", ext("", I32.pack(verdict)))

    def error(self, name: str) -> bytes:
        """A user chain's head (or, named ERROR, the table's end)."""
        return self.entry(self.zero_ip, b"", ext("ERROR", name.encode().ljust(30, b"\0")[:30]))


LAYOUT = {4: Layout(4), 6: Layout(6)}


def ext(name: str, data: bytes, revision: int = 0) -> bytes:
    """A match or target: the header and its data, padded to the alignment."""
    size = align(HDR + len(data))
    return struct.pack("=H29sB", size, name.encode(), revision) + data.ljust(size - HDR, b"\0")

