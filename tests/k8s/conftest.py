"""The Kubernetes lab (tests/lab/cluster.py) for the whole session; exposing a web server through the operator's
proxies is tests/lab/expose.py.

The images (ours, upstream's containerboot in the same image with legacy or nf_tables iptables, the pause
image) come from scripts/k8s-images.sh, run once per session: ours is rebuilt from the working tree, the others
only when missing.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, need, need_root
from tests.lab.cluster import Cluster, missing


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    need_root()
    need(subprocess.run(["docker", "info"], capture_output=True).returncode == 0,
         "needs a Docker engine to build the images (scripts/docker-engine.sh)")
    t = time.monotonic()
    subprocess.run([str(ROOT / "scripts" / "build-go.sh")], check=True, capture_output=True)
    images = subprocess.run([str(ROOT / "scripts" / "k8s-images.sh")], capture_output=True, text=True)
    if images.returncode != 0:
        pytest.fail(f"scripts/k8s-images.sh failed:\n{images.stderr[-3000:]}")
    print(f"\nk8s lab: builds and images {time.monotonic() - t:.1f} s")
    lack = missing()
    need(not lack, f"the Kubernetes lab lacks: {', '.join(lack)}")
    with Cluster() as c:
        print("k8s lab start: " + ", ".join(f"{k} {v:.1f} s" for k, v in c.timings.items())
              + f"; its processes' RSS {c.rss_mib():.0f} MiB")
        yield c
