#!/usr/bin/env python3
"""Writes a `docker save`-format archive of a one-layer image made from a root filesystem tarball.

Usage: docker-archive.py ROOTFS.tar REF ARCH [KEY=VALUE...] | docker load

`docker import --platform linux/arm64` on engine 20.10 records the engine's own architecture in the
image, so a foreign base image is written here instead, with the architecture (and arm64's variant v8)
in its config; KEY=VALUE pairs become labels. The layer is the tarball as it is (docker load takes an
uncompressed tar), streamed, never copied.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import time
from pathlib import Path

VARIANTS = {"arm64": "v8", "arm": "v7"}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    tar.addfile(info, io.BytesIO(data))


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    rootfs, ref, arch = Path(argv[0]), argv[1], argv[2]
    labels = dict(a.split("=", 1) for a in argv[3:])
    diff_id = sha256_file(rootfs)
    mtime = rootfs.stat().st_mtime
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))
    config: dict[str, object] = {
        "architecture": arch,
        "os": "linux",
        "created": created,
        "config": {"Env": [f"PATH={PATH}"], "Cmd": ["bash"], "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": created, "created_by": f"scripts/base-image.sh ({rootfs.name})"}],
    }
    if arch in VARIANTS:
        config["variant"] = VARIANTS[arch]
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = f"{diff_id}/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": [layer_name]}]
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        add_bytes(tar, config_name, config_bytes, mtime)
        info = tar.gettarinfo(str(rootfs), arcname=layer_name)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        with rootfs.open("rb") as f:
            tar.addfile(info, f)
        add_bytes(tar, "manifest.json", json.dumps(manifest).encode(), mtime)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
