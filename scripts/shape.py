#!/usr/bin/env python3
"""The code's shape, as the redesign issue measures it: the largest modules and functions of containerboot/
and firewall/, import cycles (between modules and between packages), `Any` in the signatures of the
seams (Protocols and the event types), and the attributes of the boot loop's class.

    python3 scripts/shape.py [ROOT]    (ROOT: a checkout, default this one)

Imports under `if TYPE_CHECKING:` are left out (they are not run); imports inside functions are counted.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("containerboot", "firewall")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def functions(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(qualified name, lines) of every function, nested ones included in their parent's count too."""
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                yield name, (child.end_lineno or child.lineno) - child.lineno + 1
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)
    return walk(tree, "")


def imports(tree: ast.AST, name: str, known: set[str], is_pkg: bool) -> set[str]:
    found: set[str] = set()
    here = name.split(".") if is_pkg else name.split(".")[:-1]  # the package relative imports start from

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = here[: len(here) - child.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def package(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def seam_any(tree: ast.AST) -> list[str]:
    """`Any` in the annotations of Protocol classes and dataclass event types."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        bases = {ast.unparse(b) for b in node.bases}
        if not (bases & {"Protocol"} or any("dataclass" in ast.unparse(d) for d in node.decorator_list)):
            continue
        for item in ast.walk(node):
            ann = getattr(item, "annotation", None) or getattr(item, "returns", None)
            if ann is not None and "Any" in ast.unparse(ann):
                found.append(f"{node.name}.{getattr(item, 'name', getattr(getattr(item, 'target', None), 'id', '?'))}")
    return found


def main(root: Path) -> None:
    mods = modules(root)
    trees = {m: ast.parse(p.read_text()) for m, p in mods.items()}
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in mods.items()), reverse=True)
    print("largest modules:", ", ".join(f"{m} {n}" for n, m in sizes[:5]))
    print("modules over 500 lines:", [f"{m} {n}" for n, m in sizes if n > 500] or "none")
    funcs = sorted(((n, f"{m}.{f}") for m, t in trees.items() for f, n in functions(t)), reverse=True)
    print("largest functions:", ", ".join(f"{f} {n}" for n, f in funcs[:5]))
    print("functions over 60 lines:", [f"{f} {n}" for n, f in funcs if n > 60] or "none")
    known = set(mods)
    graph = {m: imports(t, m, known, mods[m].name == "__init__.py") for m, t in trees.items()}
    print("module import cycles:", cycles(graph) or "none")
    pkgs: dict[str, set[str]] = {}
    for m, deps in graph.items():
        pkgs.setdefault(package(m), set()).update(package(d) for d in deps if package(d) != package(m))
    print("package import cycles:", cycles(pkgs) or "none")
    anys = [f"{m}: {x}" for m, t in trees.items() for x in seam_any(t)]
    print("Any in Protocol and event-type annotations:", anys or "none")
    for m, t in trees.items():
        for node in ast.walk(t):
            if isinstance(node, ast.ClassDef) and node.name == "Boot":
                attrs = {a.attr for a in ast.walk(node) if isinstance(a, ast.Attribute)
                         and isinstance(a.ctx, ast.Store) and isinstance(a.value, ast.Name) and a.value.id == "self"}
                methods = sum(isinstance(x, ast.FunctionDef) for x in node.body)
                print(f"{m}.Boot: {len(attrs)} attributes, {methods} methods, "
                      f"{(node.end_lineno or 0) - node.lineno + 1} lines")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
