"""What the boot and the subcommands share, and the boot process's own set-up: the settings read once
(or one line and exit 1), glibc's malloc tuned and inspect deferred before the boot imports anything.
(cli.py dispatches; commands.py imports this, not cli.py.)"""

from __future__ import annotations

import os
import sys
import types
from typing import TYPE_CHECKING, NoReturn

from containerboot import log

if TYPE_CHECKING:
    from containerboot.settings import Settings


def _fail(message: str, code: int = 1) -> NoReturn:
    log.error(message)
    sys.exit(code)


def settings_or_exit() -> Settings:
    from containerboot.settings import FILE_VARIABLES, SECRETS, ConfigError, load

    try:
        settings = load(os.environ)
    except ConfigError as exc:
        log.setup(os.environ.get("TS_LOG_FORMAT", "text").lower())
        _fail(f"invalid configuration: {exc}")
    log.setup(settings.log_format)
    # The secrets now live in Settings: out of the environment every child inherits (iptables -V, nft,
    # sysctl...), not only tailscaled's and the CLI's.
    for name in (*SECRETS, *FILE_VARIABLES):
        os.environ.pop(name, None)
    return settings


M_ARENA_MAX = -8  # glibc's malloc.h
M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Two glibc settings, made before any thread starts. (ctypes is on the boot path anyway:
    tailscaled.py's prctl.)

    One arena: glibc gives a thread that allocates while another holds the main arena an arena of its
    own, and memory freed there mostly stays there. Our threads are few and rarely allocate at the same
    time, so one arena costs no speed; bench_boot measured 2 MiB less peak RSS (23.2 -> 21.2 MiB).

    A fixed mmap threshold (glibc's default value, 128 KiB): left dynamic, the first large block freed
    raises the threshold to its size, after which blocks that size come from the heap and freeing them
    returns nothing to the kernel while anything above them lives. libnftables allocates about 30 blocks of
    132 KiB per command where tailscaled's tables exist; fixed, they are unmapped when its context is freed."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class _Deferred(types.ModuleType):
    """Stands in for a module in sys.modules until a name of it is used; then it imports the real one and
    takes on its names. (importlib's LazyLoader does not serve here: in 3.11 a second `import` of a lazy
    module reads its __spec__, and that loads it.)"""

    def __getattr__(self, name: str) -> object:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = __import__(self.__name__)
        self.__dict__.update(real.__dict__)
        return getattr(real, name)


def defer_inspect() -> None:
    """dataclasses imports inspect (and with it ast, dis, tokenize, linecache: 1.1 MiB anonymous on
    Debian's python3 with every boot module imported) only to write a docstring for a class that has none
    (inspect.signature). Ours all have one, so on the boot path inspect is imported on first use instead:
    whatever does use it still gets the real module."""
    sys.modules.setdefault("inspect", _Deferred("inspect"))


def boot() -> NoReturn:
    tune_malloc()
    defer_inspect()
    from containerboot.boot import main

    sys.exit(main.main(settings_or_exit()))
