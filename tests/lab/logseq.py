"""The log line sequence of each boot a test ran, recorded to compare two versions of the program.

With CONTAINERBOOT_LOG_RECORD=<dir>, every `fakes.Run` that ends appends its `boot: ` lines to
<dir>/<test id>.jsonl, one JSON object per line ({"msg": ...}), then {"exit": code}. What differs
between two runs of the same code is masked: the timestamp, the test root's path, ports, and the
figures of elapsed time. `python -m tests.lab.logseq <before> <after>` prints the tests whose
sequences differ, with a diff of each, and exits 1 if any does.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

_MASKS = (
    (re.compile(r"^boot: \d{4}/\d\d/\d\d \d\d:\d\d:\d\d "), ""),
    (re.compile(r"/tmp/cb[A-Za-z0-9_]+"), "<root>"),
    (re.compile(r"(127\.0\.0\.1|\[::1\]|localhost):\d+"), r"\1:<port>"),
    (re.compile(r"\b\d+(\.\d+)?(ms|s)\b"), "<duration>"),
)


def normalize(line: str) -> str:
    for pattern, repl in _MASKS:
        line = pattern.sub(repl, line)
    return line


def record(lines: Iterable[str], code: int) -> None:
    out = os.environ.get("CONTAINERBOOT_LOG_RECORD")
    test = os.environ.get("PYTEST_CURRENT_TEST", "")
    if not out or not test:
        return
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test.rsplit(" ", 1)[0])
    with open(Path(out) / f"{name}.jsonl", "a") as f:
        for line in lines:
            if line.startswith("boot: "):
                f.write(json.dumps({"msg": normalize(line)}) + "\n")
        f.write(json.dumps({"exit": code}) + "\n")


def compare(before: Path, after: Path) -> int:
    names = sorted({p.name for p in before.glob("*.jsonl")} | {p.name for p in after.glob("*.jsonl")})
    differ = 0
    for name in names:
        a = (before / name).read_text().splitlines() if (before / name).exists() else []
        b = (after / name).read_text().splitlines() if (after / name).exists() else []
        if a != b:
            differ += 1
            print(f"== {name}")
            sys.stdout.writelines(ln + "\n" for ln in difflib.unified_diff(a, b, "before", "after", lineterm="", n=1))
    print(f"{len(names)} tests, {sum(1 for n in names if (before / n).exists())} recorded before, "
          f"{sum(1 for n in names if (after / n).exists())} after, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(compare(Path(sys.argv[1]), Path(sys.argv[2])))
