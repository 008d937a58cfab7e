"""Secrets (TS_AUTHKEY, TS_CLIENT_SECRET, ...): from the variable, or from the file `<SECRET>_FILE` names.

A secret file is read without blocking (a FIFO or a device cannot hang the boot) and bounded in size,
and both forms must hold one token. Apart from __init__.py because this is the one part of loading that
touches the file system and the one whose errors must never quote the value.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping

from containerboot.settings.variables import VARIABLES, ConfigError, shown

MAX_SECRET_BYTES = 65536


class SecretFileError(ValueError):
    """A secret file that is no regular file or too large (the text says which; never the content)."""


def token_problem(value: str) -> str:
    """Why `value` does not look like one secret token, or "" (pure; never quotes the value).
    Surrounding whitespace is ignored; inside, only printable ASCII without spaces."""
    token = value.strip()
    if not token:
        return "is blank (only whitespace)"
    if len(token) > MAX_SECRET_BYTES:
        return f"is longer than {MAX_SECRET_BYTES} bytes"
    if any(c.isspace() for c in token):
        lines = len(token.splitlines())
        return f"holds {lines} lines, not one token" if lines > 1 else "has whitespace inside, not one token"
    if not all("!" <= c <= "~" for c in token):
        return "has characters other than printable ASCII, not one token"
    return ""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_secret_file(path: str) -> str:
    """A secret file's text: a regular file (or a symlink to one, as Kubernetes mounts Secrets) of at
    most MAX_SECRET_BYTES. Opened without blocking, so a FIFO or a device cannot hang us; raises
    SecretFileError naming the problem (never the content), OSError when it cannot be opened or read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
            raise SecretFileError(f"is {kind}, not a regular file")
        data = b""
        while len(data) <= MAX_SECRET_BYTES:
            chunk = os.read(fd, MAX_SECRET_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) > MAX_SECRET_BYTES:
            raise SecretFileError(f"is larger than {MAX_SECRET_BYTES} bytes")
    finally:
        os.close(fd)
    return data.decode("latin-1")  # every byte maps to one character; token_problem rejects non-ASCII


def secret(env: Mapping[str, str], name: str, read_file: Callable[[str], str]) -> str:
    """The secret `name`, from the variable or the file its _FILE variable names; surrounding whitespace
    removed. Raises ConfigError naming the variable, never quoting the secret."""
    file_var = f"{name}_FILE"
    path = env.get(file_var, "")
    if not path:
        value = env.get(name, "")
        if value:
            problem = token_problem(value)
            if problem:
                raise ConfigError(name, f"{name}=<redacted> {problem}; expected {VARIABLES[name]}")
        return value.strip()
    if env.get(name):
        raise ConfigError(file_var, f"{name} and {file_var} are both set; set only one of them")
    where = f"{file_var}={shown(path)}"
    try:
        value = read_file(path)
    except SecretFileError as exc:
        raise ConfigError(file_var, f"{where} {exc}; expected the path of a regular file of at most "
                                    f"{MAX_SECRET_BYTES} bytes holding {name}") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(file_var, f"{where} cannot be read ({reason}); "
                                    f"expected the path of a readable file holding {name}") from None
    if not value.strip():
        raise ConfigError(file_var, f"{where} is an empty file; expected a file holding {name}")
    problem = token_problem(value)
    if problem:
        raise ConfigError(file_var, f"{where}: the file {problem}; expected a file holding {name} and "
                                    "nothing else (one token, surrounding whitespace ignored)")
    return value.strip()

