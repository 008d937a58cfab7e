#!/usr/bin/env bash
# Wheels of the project's Python dependencies (requirements.txt, the exact versions) for the image's
# platform, cached: prints the directory, $CACHE/wheels/<arch>-<key>, key = a hash of the dependency list,
# the architecture and the Python of Debian 12 the image runs (3.11).
#   scripts/image-wheels.sh [PLATFORM]     linux/amd64, linux/arm64, linux/arm/v7 or linux/386
#                                          (default: this machine's)
# This machine's architecture: `pip wheel` here (the venv's Python is Debian's 3.11, as in the image).
# Another one: the pure-Python wheels from here, and each wheel with compiled code (none today: click is pure
# Python) built again from its sdist in a container of that platform (under qemu for arm,
# scripts/qemu-binfmt.sh), from the base image scripts/base-image.sh makes, with Debian's pip and gcc: about
# 2 minutes, once.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${CONTAINERBOOT_CACHE:-/var/cache/containerboot}
host_arch=$(dpkg --print-architecture)
platform=${1:-linux/$host_arch}
# shellcheck source=scripts/platforms.sh
. scripts/platforms.sh
# arch: build_docker.sh's token for the platform, naming the cache directory; deb: Debian's architecture,
# to tell this machine's own (whose wheels pip builds here) from another.
if ! row=$(platform_row "$platform"); then
  echo "image-wheels: unsupported platform $platform ($(platform_names))" >&2
  exit 1
fi
read -r platform arch deb _ <<<"$row"
deps=$(grep -E '^[A-Za-z0-9_.-]+==' requirements.txt)  # exact, with what they pull in (scripts/lock-deps.sh)
key=$(printf '%s\n' "$deps" "$arch" cp311-bookworm | sha1sum | cut -c1-10)
out=$CACHE/wheels/$arch-$key
if [ -f "$out/.complete" ]; then
  echo "$out"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mapfile -t reqs <<<"$deps"
.venv/bin/pip wheel -q --no-deps --wheel-dir "$tmp/wheels" "${reqs[@]}" >/dev/null
if [ "$deb" != "$host_arch" ]; then
  mkdir -p "$tmp/sdist" "$tmp/out"
  for whl in "$tmp"/wheels/*.whl; do
    case $whl in *-none-any.whl) continue ;; esac
    name=$(basename "$whl" | cut -d- -f1)
    version=$(basename "$whl" | cut -d- -f2)
    .venv/bin/pip download -q --no-deps --no-binary :all: --dest "$tmp/sdist" "$name==$version" >/dev/null
    rm "$whl"
  done
  if compgen -G "$tmp/sdist/*" >/dev/null; then
    scripts/qemu-binfmt.sh "$arch"
    base=$(scripts/base-image.sh "$platform")
    # apt-get reaches Debian's mirror through Docker's bridge, as the image build's own apt-get does.
    docker run --rm --platform "$platform" -v "$tmp:/w" "$base" sh -ec '
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip gcc libc6-dev >/dev/null
      pip wheel -q --no-deps --no-build-isolation --no-index --wheel-dir /w/out /w/sdist/*'
    mv "$tmp"/out/*.whl "$tmp/wheels/"
  fi
fi
mkdir -p "$(dirname "$out")"
rm -rf "$out"
mv "$tmp/wheels" "$out"
touch "$out/.complete"
echo "$out"
