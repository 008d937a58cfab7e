"""A process seen through /proc: its threads, open fds and RSS at one moment (`figures`), what its fds are
and its threads are called, every process of the machine and the tree under one (`processes`,
`descendants`), and `Series`, samples of one figure over time. Reads /proc and nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Figures:
    """One process at one moment."""

    threads: int
    fds: int
    rss_kib: int


def figures(pid: int) -> Figures:
    """Threads (/proc/PID/task), open fds (/proc/PID/fd) and VmRSS; OSError if the process is gone."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Figures(len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd")), rss)


def fd_targets(pid: int) -> list[str]:
    """What each open fd is (for a message that names the leak)."""
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            continue
    return out


def thread_names(pid: int) -> list[str]:
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
        except OSError:
            continue
    return sorted(names)


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str  # R, S, D, Z...
    comm: str


def processes() -> dict[int, Proc]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue  # gone between the listing and the read
        # comm is in parentheses and may hold spaces or parentheses itself: split at the last one.
        head, _, tail = stat.rpartition(")")
        fields = tail.split()
        out[int(name)] = Proc(int(name), int(fields[1]), fields[0], head.split("(", 1)[1])
    return out


def descendants(pid: int, procs: dict[int, Proc]) -> list[Proc]:
    children: dict[int, list[Proc]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


# ---- series -----------------------------------------------------------------------------------------------


@dataclass
class Series:
    """(seconds since the soak started, value) samples of one figure."""

    name: str
    unit: str = ""
    points: list[tuple[float, int]] = field(default_factory=list)

    def add(self, t: float, value: int) -> None:
        self.points.append((t, value))

    def values(self, since: float = 0.0, until: float = float("inf")) -> list[int]:
        return [v for t, v in self.points if since <= t <= until]

    def summary(self) -> str:
        vs = self.values()
        if not vs:
            return f"{self.name}: no samples"
        return (f"{self.name}{' ' + self.unit if self.unit else ''}: start {vs[0]}, min {min(vs)}, max {max(vs)}, "
                f"end {vs[-1]} ({len(vs)} samples)")
