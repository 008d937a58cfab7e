"""`which`, as the shell finds a program on PATH.

Not shutil.which: shutil imports fnmatch, bz2 and lzma at import time, about 0.6 MiB resident that the
boot path needs for nothing else."""

from __future__ import annotations

import os


def which(name: str) -> str | None:
    """The first executable file called `name` on PATH (a name with a slash is checked as given)."""
    if "/" in name:
        return name if os.access(name, os.X_OK) and not os.path.isdir(name) else None
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None
