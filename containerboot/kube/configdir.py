"""TS_EXPERIMENTAL_VERSIONED_CONFIG_DIR: the auth key in the chosen config file, and a watch on the directory.

kubelet publishes a mounted Secret atomically: it writes a new timestamped directory, points a
`..data_tmp` symlink at it and renames that over `..data`. The visible files are symlinks through
`..data`, so the one event that says "new contents" is the rename arriving as `..data` (IN_MOVED_TO).
Where inotify cannot be had (no instances left, a filesystem without it) the watch falls back to a tick.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import threading
from collections.abc import Callable

from containerboot import log
from containerboot.events import ConfigChanged, Exit, Inbox
from containerboot.settings import parse_hujson
from containerboot.tailscale.localapi import LocalAPIError, TailscaledAPI

KUBELET_DATA = "..data"
POLL_SECONDS = 5.0

# <sys/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
_WATCH = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_EVENT = struct.Struct("iIII")


def authkey(path: str) -> str:
    """The AuthKey field of a tailscaled config file, "" when absent or unreadable (upstream's AuthKeyFromConfig)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            doc = parse_hujson(f.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return ""
    if not isinstance(doc, dict):
        return ""
    value = next((v for k, v in doc.items() if k.lower() == "authkey"), None)
    return value if isinstance(value, str) else ""


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError:
        return None


def _inotify(directory: str) -> int:
    """An inotify fd watching `directory`; raises OSError when inotify is not available."""
    import ctypes  # only a config dir pays for it
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if libc.inotify_add_watch(fd, os.fsencode(directory), _WATCH) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, os.strerror(err))
    return int(fd)


def event_names(buf: bytes) -> list[str]:
    """Names carried by a read of inotify events."""
    names, pos = [], 0
    while pos + _EVENT.size <= len(buf):
        _, _, _, size = _EVENT.unpack_from(buf, pos)
        raw = buf[pos + _EVENT.size:pos + _EVENT.size + size]
        names.append(os.fsdecode(raw.rstrip(b"\0")))
        pos += _EVENT.size + size
    return names


class DirWatch:
    """Calls `on_change` from a thread of its own when `..data` in `directory` is replaced (inotify),
    or every POLL_SECONDS when inotify is unavailable. The caller compares contents; a call is only a hint."""

    def __init__(self, directory: str, on_change: Callable[[], None], poll: float = POLL_SECONDS,
                 use_inotify: bool = True) -> None:
        self.directory = directory
        self.on_change = on_change
        self.poll = poll
        self._closed = threading.Event()
        self.fd = -1
        self.problem = ""
        if use_inotify:
            try:
                self.fd = _inotify(directory)
            except OSError as exc:
                self.problem = exc.strerror or str(exc)
        else:
            self.problem = "disabled"
        self.mode = "inotify" if self.fd >= 0 else "polling"
        self._thread = threading.Thread(target=self._run, name="config-dir-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            if self.fd < 0:
                if not self._closed.wait(self.poll):
                    self.on_change()
                continue
            try:
                ready, _, _ = select.select([self.fd], [], [], 1.0)  # wakes each second to see close()
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    return
                raise
            if KUBELET_DATA in event_names(buf):
                self.on_change()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Follower:
    """The tailscaled config file followed once the boot is done: when its bytes change, tailscaled is
    told to reload it (upstream's watchTailscaledConfigChanges). Also watched, before that, while a
    refused auth key waits for the operator's new one."""

    def __init__(self, path: str, api: TailscaledAPI, inbox: Inbox) -> None:
        self.path = path
        self.api = api
        self.inbox = inbox
        self.watch: DirWatch | None = None
        self.seen: bytes | None = None

    def start(self) -> None:
        if self.watch is not None:
            return
        self.seen = read_bytes(self.path)
        self.watch = DirWatch(os.path.dirname(self.path), lambda: self.inbox.put(ConfigChanged()),
                              use_inotify=not os.environ.get("TS_TEST_NO_INOTIFY"))
        if self.watch.mode != "inotify":
            log.info("tailscaled config watch: failed to create fsnotify watcher, timer-only mode: "
                     f"{self.watch.problem}")

    def on_changed(self) -> None:
        data = read_bytes(self.path)
        if data is None:
            raise Exit(1, f"error reading configfile: open {self.path}: no such file or directory")
        if data == self.seen:
            return  # the mount holds other files too: reload only when ours changed
        self.seen = data
        log.info("tailscaled config watch: ensuring that config is up to date")
        try:
            answer = self.api.json("POST", "/localapi/v0/reload-config")
        except LocalAPIError as exc:
            raise Exit(1, f"error reloading tailscaled config: {exc}") from exc
        if isinstance(answer, dict) and answer.get("Err"):
            raise Exit(1, f"error reloading tailscaled config: {answer['Err']}")
        if isinstance(answer, dict) and answer.get("Reloaded"):
            log.info("tailscaled config watch: config was reloaded")

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
