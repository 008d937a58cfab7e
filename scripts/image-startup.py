#!/usr/bin/env python3
"""Start-up time of an image's boot path: container start to containerboot's "Starting tailscaled" line.

Usage: image-startup.py IMAGE [RUNS] [--platform P] [--mode userspace|kernel]

For each mode (userspace, the default; kernel, which also detects and probes the netfilter backend) the
image is started RUNS times (default 9) with no network at all (--network none: tailscaled never reaches
anything), JSON logs (millisecond times) and no log upload. The time is that of the "Starting tailscaled"
line minus the container's StartedAt; the median and the range are printed, one line per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime

MODES = {
    "userspace": [],
    "kernel": ["--cap-add", "NET_ADMIN", "--device", "/dev/net/tun", "-e", "TS_USERSPACE=false"],
}


def parse_time(text: str) -> float:
    # Docker's StartedAt has nanoseconds and a Z; the log has milliseconds and +0000.
    text = text.replace("Z", "+00:00")
    if "." in text:
        head, rest = text.split(".", 1)
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    return datetime.fromisoformat(text).timestamp()


def one(image: str, extra: list[str], platform: str | None) -> float:
    argv = ["docker", "run", "-d", "--network", "none", "-e", "TS_LOG_FORMAT=json",
            "-e", "TS_NO_LOGS_NO_SUPPORT=true", *extra]
    if platform:
        argv += ["--platform", platform]
    cid = subprocess.run([*argv, image], capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            proc = subprocess.run(["docker", "logs", cid], capture_output=True, text=True)
            logs = proc.stdout + proc.stderr
            for line in logs.splitlines():
                if line.startswith("{") and json.loads(line).get("msg") == "Starting tailscaled":
                    started = subprocess.run(["docker", "inspect", "--format", "{{.State.StartedAt}}", cid],
                                             capture_output=True, text=True, check=True).stdout.strip()
                    return parse_time(json.loads(line)["time"]) - parse_time(started)
            time.sleep(0.05)
        raise RuntimeError(f"no 'Starting tailscaled' from {image}:\n{logs}")
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("runs", nargs="?", type=int, default=9)
    ap.add_argument("--platform")
    ap.add_argument("--mode", choices=MODES, action="append", help="default: both")
    args = ap.parse_args()
    for mode, extra in MODES.items():
        if args.mode and mode not in args.mode:
            continue
        times = [one(args.image, extra, args.platform) * 1000 for _ in range(args.runs)]
        print(f"{args.image} {mode}: median {statistics.median(times):.0f} ms "
              f"(min {min(times):.0f}, max {max(times):.0f}, {args.runs} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
