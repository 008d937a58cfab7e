#!/usr/bin/env bash
# Builds the containerboot image (docker/Dockerfile), with upstream's parameters where they apply:
#   REPOS     image repositories, comma-separated                 (default: containerboot)
#   TAGS      tags, comma-separated                               (default: $TAILSCALE_VERSION,latest)
#   PUSH      true to push every repo:tag                         (default: false)
#   TARGET    what to build; only "client" exists                 (default: client)
#   PLATFORM  platforms, comma-separated: linux/amd64, linux/arm64 (default: this machine's)
#   BASE      the base image; "{arch}" in it becomes each platform's architecture, for local single-platform
#             bases such as scripts/base-image.sh's containerboot-base:bookworm-{arch}
#                                                                 (default: debian:bookworm-slim)
#   TAILSCALE_VERSION  tailscale.com version of tailscaled/tailscale (default: versions.env)
# Per platform it builds tailscaled (Go, cross-compiled) and installs the Python packages (wheels cached by
# scripts/image-wheels.sh) into docker/.build on this host, then builds the image with the classic builder,
# which runs another platform's RUN steps under qemu (scripts/qemu-binfmt.sh).
# One platform: the image is tagged repo:tag. Several: each platform's image is tagged repo:tag-<arch>
# (an image store of engine 20.10 holds one platform per tag), and with PUSH=true those are pushed and a
# manifest list repo:tag naming them all is created and pushed (`docker manifest`, --insecure so that a
# registry on 127.0.0.1 over plain HTTP works).
# Prints each local image reference on stdout; on stderr, per image, the size of each layer and
# "image size: N MB (B bytes), <platform>".
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
PLATFORM=${PLATFORM:-linux/$host_arch}
export TAILSCALE_VERSION

IFS=, read -r -a repos <<<"$REPOS"
IFS=, read -r -a tags <<<"$TAGS"
IFS=, read -r -a platforms <<<"$PLATFORM"
arches=()
for p in "${platforms[@]}"; do
  case $p in
    linux/amd64 | linux/arm64 | linux/arm64/v8) arches+=("$(echo "$p" | cut -d/ -f2)") ;;
    *) echo "unsupported platform: $p (linux/amd64, linux/arm64)" >&2; exit 1 ;;
  esac
done
refs=()
for repo in "${repos[@]}"; do
  for tag in "${tags[@]}"; do
    refs+=("$repo:$tag")
  done
done

scripts/install-deps.sh >/dev/null
for arch in "${arches[@]}"; do
  [ "$arch" = "$host_arch" ] || scripts/qemu-binfmt.sh "$arch"
done

ctx=docker/.build
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }

build_one() {  # arch, then the references to tag
  local arch=$1 bindir wheels base args=() ref
  shift
  bindir=$(GOARCH=$arch scripts/build-go.sh --image | head -n 1)
  wheels=$(scripts/image-wheels.sh "linux/$arch")
  rm -rf "$ctx"
  mkdir -p "$ctx/bin" "$ctx/lib" "$ctx/wheels"
  # One tailscaled binary that is also the CLI when called as `tailscale` (ts_include_cli): 20 MB smaller.
  cp "$bindir/tailscaled" "$ctx/bin/tailscaled"
  ln -s tailscaled "$ctx/bin/tailscale"
  # setuptools builds the wheel from ./build/lib without emptying it: a module since renamed or deleted
  # would ship in the image.
  rm -rf build
  .venv/bin/pip wheel -q --no-deps --wheel-dir "$ctx/wheels" . >/dev/null
  local pyarch
  pyarch=$([ "$arch" = arm64 ] && echo aarch64 || echo x86_64)
  .venv/bin/pip install -q --no-deps --target "$ctx/lib" --platform "linux_$pyarch" --python-version 3.11 \
    --implementation cp --abi cp311 "$wheels"/*.whl "$ctx"/wheels/*.whl >/dev/null
  python3 scripts/image-pylib.py "$ctx/lib" containerboot firewall >&2
  rm -rf "$ctx/wheels" "$ctx"/lib/bin "$ctx"/lib/*.dist-info/RECORD
  find "$ctx/lib" -name __pycache__ -prune -exec rm -rf {} +

  base=${BASE//\{arch\}/$arch}
  for ref in "$@"; do args+=(-t "$ref"); done
  local log
  if ! log=$(DOCKER_BUILDKIT=0 docker build --platform "linux/$arch" --build-arg "BASE=$base" "${args[@]}" docker 2>&1)
  then
    echo "$log" >&2
    exit 1
  fi

  local size names=(system tailscaled containerboot) i=0 bytes what
  size=$(docker image inspect --format '{{.Size}}' "$1")
  echo "layers of $1 (linux/$arch):" >&2
  while IFS=$'\t' read -r bytes what; do
    [ "$bytes" = 0 ] && continue
    printf '  %10s  %s\n' "$(mb "$bytes")" "${names[i]:-$what}" >&2
    i=$((i + 1))
  done < <(docker history --human=false --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$1" | tac)
  echo "image size: $((size / 1000 / 1000)) MB ($size bytes), linux/$arch" >&2
}

local_refs=()
if [ ${#arches[@]} -eq 1 ]; then
  build_one "${arches[0]}" "${refs[@]}"
  local_refs=("${refs[@]}")
else
  for arch in "${arches[@]}"; do
    arch_refs=()
    for ref in "${refs[@]}"; do arch_refs+=("$ref-$arch"); done
    build_one "$arch" "${arch_refs[@]}"
    local_refs+=("${arch_refs[@]}")
  done
fi
for ref in "${local_refs[@]}"; do echo "$ref"; done

if [ "$PUSH" = "true" ]; then
  for ref in "${local_refs[@]}"; do docker push -q "$ref" >&2; done
  if [ ${#arches[@]} -gt 1 ]; then
    for ref in "${refs[@]}"; do
      members=()
      for arch in "${arches[@]}"; do members+=("$ref-$arch"); done
      docker manifest rm "$ref" >/dev/null 2>&1 || true
      docker manifest create --insecure "$ref" "${members[@]}" >/dev/null
      docker manifest push --insecure --purge "$ref" >&2
    done
  fi
fi
