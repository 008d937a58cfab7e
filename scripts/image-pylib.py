#!/usr/bin/env python3
"""Removes from an installed package directory every distribution the project can never import.

Usage: image-pylib.py LIBDIR ROOT [ROOT...]      (ROOTs: the project's top-level packages)

Every import statement of every module of a reached package counts, those inside functions too, so a lazy
import keeps its distribution; a distribution is kept whole when any of its top-level names is reached
(python-iptables' libxtwrapper is loaded by ctypes, not imported, and stays with iptc). Prints one line per
distribution removed, with its size.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path


def top_levels(dist_info: Path) -> set[str]:
    names = set()
    for line in (dist_info / "RECORD").read_text().splitlines():
        first = line.split(",", 1)[0].split("/", 1)[0]
        if first.endswith(".dist-info") or first in ("..", "bin", ""):
            continue
        names.add(first.split(".", 1)[0])
    return names


def imports_of(path: Path) -> set[str]:
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    found = set()
    for f in files:
        if f.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(f.read_bytes(), str(f))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def main(argv: list[str]) -> int:
    lib, roots = Path(argv[0]), argv[1:]
    dists = {d: top_levels(d) for d in lib.glob("*.dist-info")}
    owner = {name: d for d, names in dists.items() for name in names}
    entries = {p.name.split(".", 1)[0]: p for p in lib.iterdir() if not p.name.endswith(".dist-info")}
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in entries:
            continue
        seen.add(name)
        # a distribution's every top-level name is reached with it
        todo.extend(dists.get(owner.get(name), set()) if name in owner else ())
        todo.extend(imports_of(entries[name]) - seen)
    for d, names in sorted(dists.items()):
        if names & seen or not names:
            continue
        size = 0
        for name in names:
            for p in lib.glob(f"{name}*"):
                if p.name.split(".", 1)[0] != name or p.name.endswith(".dist-info"):
                    continue
                size += sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        shutil.rmtree(d)
        print(f"image-pylib: left out {d.name.removesuffix('.dist-info')} ({size / 1e6:.1f} MB): nothing imports it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
