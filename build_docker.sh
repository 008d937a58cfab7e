#!/usr/bin/env bash
# Builds the containerboot image (docker/Dockerfile), with upstream's parameters where they apply:
#   REPOS     image repositories, comma-separated                 (default: containerboot)
#   TAGS      tags, comma-separated                               (default: $TAILSCALE_VERSION,latest)
#   PUSH      true to push every repo:tag                         (default: false)
#   TARGET    what to build; only "client" exists                 (default: client)
#   PLATFORM  platforms, comma-separated: linux/amd64, linux/arm64, linux/arm/v7, linux/386
#                                                                 (default: this machine's)
#   BASE      the base image; "{arch}" in it becomes each platform's token (amd64, arm64, armv7, 386), for
#             local single-platform bases such as scripts/base-image.sh's containerboot-base:bookworm-{arch}
#                                                                 (default: debian:bookworm-slim)
#   TAILSCALE_VERSION  tailscale.com version of tailscaled/tailscale (default: versions.env)
# Per platform it builds tailscaled (Go, cross-compiled) and installs the Python packages (wheels cached by
# scripts/image-wheels.sh) into .build/ of a copy of docker/ on this host, then builds the image with the
# classic builder, which runs an arm platform's RUN steps under qemu (scripts/qemu-binfmt.sh) and 386's
# natively (this x86_64 kernel runs 32-bit x86 programs).
# One platform: the image is tagged repo:tag. Several: each platform's image is tagged repo:tag-<token>
# (an image store of engine 20.10 holds one platform per tag), and with PUSH=true those are pushed and a
# manifest list repo:tag naming them all is created and pushed (`docker manifest`, --insecure so that a
# registry on 127.0.0.1 over plain HTTP works).
# Prints each local image reference on stdout; on stderr, per image, the size of each layer,
# "image size: N MB (B bytes), <platform>" and "build time: N s, <platform>".
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=/dev/null
. ./versions.env
TARGET=${TARGET:-client}
if [ "$TARGET" != "client" ]; then
  echo "unknown target: $TARGET"
  exit 1
fi
REPOS=${REPOS:-containerboot}
TAGS=${TAGS:-$TAILSCALE_VERSION,latest}
PUSH=${PUSH:-false}
BASE=${BASE:-debian:bookworm-slim}
host_arch=$(dpkg --print-architecture)
export TAILSCALE_VERSION

# shellcheck source=scripts/platforms.sh
. scripts/platforms.sh  # PLATFORMS, platform_row: the platforms' names in Docker, Debian, Go and pip

if [ -z "${PLATFORM:-}" ]; then
  PLATFORM=$(platform_of_deb "$host_arch")
  [ -n "$PLATFORM" ] || { echo "no image platform for this machine's architecture $host_arch" >&2; exit 1; }
fi
IFS=, read -r -a repos <<<"$REPOS"
IFS=, read -r -a tags <<<"$TAGS"
IFS=, read -r -a given <<<"$PLATFORM"
platforms=()
for p in "${given[@]}"; do
  if ! r=$(platform_row "$p"); then
    echo "unsupported platform: $p ($(platform_names))" >&2
    exit 1
  fi
  platforms+=("${r%% *}")
done
refs=()
for repo in "${repos[@]}"; do
  for tag in "${tags[@]}"; do
    refs+=("$repo:$tag")
  done
done

scripts/install-deps.sh >/dev/null
for p in "${platforms[@]}"; do
  # binfmt_misc handlers for the platforms this kernel does not run itself (qemu-binfmt.sh skips the others).
  read -r _ _ deb _ <<<"$(platform_row "$p")"
  [ "$deb" = "$host_arch" ] || scripts/qemu-binfmt.sh "$deb"
done

# A private work directory per run: the build context (docker/ copied, with .build/ inside) and a copy of the
# project's source for its wheel, so that two builds in one tree at once (test modules, people) never empty
# each other's context or share setuptools' build/ directory, where a module since renamed or deleted would
# linger and ship in the image.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/context" "$work/src"
tar -C docker --exclude=./.build -cf - . | tar -C "$work/context" -xf -
tar --exclude=__pycache__ -cf - pyproject.toml containerboot firewall | tar -C "$work/src" -xf -
ctx=$work/context/.build
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }

build_one() {  # platform, then the references to tag
  local platform=$1 token deb goarch goarm pyarch bindir wheels base args=() ref started=$SECONDS
  shift
  read -r _ token deb _ goarch goarm pyarch <<<"$(platform_row "$platform")"
  local goenv=("GOARCH=$goarch")
  [ "$goarm" = - ] || goenv+=("GOARM=$goarm")
  bindir=$(env "${goenv[@]}" scripts/build-go.sh --image | head -n 1)
  wheels=$(scripts/image-wheels.sh "$platform")
  rm -rf "$ctx"
  mkdir -p "$ctx/bin" "$ctx/lib" "$ctx/wheels"
  # One tailscaled binary that is also the CLI when called as `tailscale` (ts_include_cli): 20 MB smaller.
  cp "$bindir/tailscaled" "$ctx/bin/tailscaled"
  ln -s tailscaled "$ctx/bin/tailscale"
  # From a fresh copy each time: setuptools builds the wheel from build/lib without emptying it.
  rm -rf "$work/src/build"
  .venv/bin/pip wheel -q --no-deps --no-build-isolation --wheel-dir "$ctx/wheels" "$work/src" >/dev/null
  .venv/bin/pip install -q --no-deps --target "$ctx/lib" --platform "linux_$pyarch" --python-version 3.11 \
    --implementation cp --abi cp311 "$wheels"/*.whl "$ctx"/wheels/*.whl >/dev/null
  python3 scripts/image-pylib.py "$ctx/lib" containerboot firewall >&2
  rm -rf "$ctx/wheels" "$ctx"/lib/bin "$ctx"/lib/*.dist-info/RECORD
  find "$ctx/lib" -name __pycache__ -prune -exec rm -rf {} +

  base=${BASE//\{arch\}/$token}
  for ref in "$@"; do args+=(-t "$ref"); done
  local log
  if ! log=$(DOCKER_BUILDKIT=0 docker build --platform "$platform" --build-arg "BASE=$base" "${args[@]}" \
               "$work/context" 2>&1)
  then
    echo "$log" >&2
    exit 1
  fi

  local size names=(system tailscaled containerboot) i=0 bytes what
  size=$(docker image inspect --format '{{.Size}}' "$1")
  echo "layers of $1 ($platform):" >&2
  while IFS=$'\t' read -r bytes what; do
    [ "$bytes" = 0 ] && continue
    printf '  %10s  %s\n' "$(mb "$bytes")" "${names[i]:-$what}" >&2
    i=$((i + 1))
  done < <(docker history --human=false --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$1" | tac)
  echo "image size: $((size / 1000 / 1000)) MB ($size bytes), $platform" >&2
  echo "build time: $((SECONDS - started)) s, $platform" >&2
}

# The tag suffix of each platform's image when there are several (one per platform, in PLATFORM's order).
suffix() { platform_row "$1" | awk '{ print "-" $2 }'; }

local_refs=()
if [ ${#platforms[@]} -eq 1 ]; then
  build_one "${platforms[0]}" "${refs[@]}"
  local_refs=("${refs[@]}")
else
  for p in "${platforms[@]}"; do
    arch_refs=()
    s=$(suffix "$p")
    for ref in "${refs[@]}"; do arch_refs+=("$ref$s"); done
    build_one "$p" "${arch_refs[@]}"
    local_refs+=("${arch_refs[@]}")
  done
fi
for ref in "${local_refs[@]}"; do echo "$ref"; done

if [ "$PUSH" = "true" ]; then
  for ref in "${local_refs[@]}"; do docker push -q "$ref" >&2; done
  if [ ${#platforms[@]} -gt 1 ]; then
    for ref in "${refs[@]}"; do
      members=()
      for p in "${platforms[@]}"; do members+=("$ref$(suffix "$p")"); done
      docker manifest rm "$ref" >/dev/null 2>&1 || true
      docker manifest create --insecure "$ref" "${members[@]}" >/dev/null
      docker manifest push --insecure --purge "$ref" >&2
    done
  fi
fi
