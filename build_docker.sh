#!/usr/bin/env bash
# Builds the containerboot image (docker/Dockerfile), with upstream's parameters where they apply:
#   REPOS   image repositories, comma-separated            (default: containerboot)
#   TAGS    tags, comma-separated                          (default: $TAILSCALE_VERSION,latest)
#   PUSH    true to push every repo:tag                    (default: false)
#   TARGET  what to build; only "client" exists            (default: client)
#   BASE    the base image                                 (default: debian:bookworm-slim)
#   TAILSCALE_VERSION  tailscale.com version of tailscaled/tailscale (default: versions.env)
# It builds the Go binaries and the Python packages on this host (Debian 12's python3, the same as the
# base's), builds the image, prints each image reference and the image size, and pushes only when PUSH=true.
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
export TAILSCALE_VERSION

scripts/install-deps.sh >/dev/null
bindir=$(scripts/build-go.sh --image | head -n 1)

ctx=docker/.build
rm -rf "$ctx"
mkdir -p "$ctx/bin" "$ctx/lib" "$ctx/wheels"
# One tailscaled binary that is also the CLI when called as `tailscale` (ts_include_cli): 20 MB smaller.
cp "$bindir/tailscaled" "$ctx/bin/tailscaled"
ln -s tailscaled "$ctx/bin/tailscale"
.venv/bin/pip wheel -q --wheel-dir "$ctx/wheels" . >/dev/null
.venv/bin/pip install -q --no-deps --target "$ctx/lib" "$ctx"/wheels/*.whl >/dev/null
rm -rf "$ctx/wheels" "$ctx"/lib/bin "$ctx"/lib/*.dist-info/RECORD
find "$ctx/lib" -name __pycache__ -prune -exec rm -rf {} +

IFS=, read -r -a repos <<<"$REPOS"
IFS=, read -r -a tags <<<"$TAGS"
refs=()
for repo in "${repos[@]}"; do
  for tag in "${tags[@]}"; do
    refs+=("$repo:$tag")
  done
done
args=()
for ref in "${refs[@]}"; do args+=(-t "$ref"); done
docker build -q --build-arg "BASE=$BASE" "${args[@]}" docker >/dev/null
size=$(docker image inspect --format '{{.Size}}' "${refs[0]}")
for ref in "${refs[@]}"; do echo "$ref"; done
echo "image size: $((size / 1000 / 1000)) MB ($size bytes)" >&2
if [ "$PUSH" = "true" ]; then
  for ref in "${refs[@]}"; do docker push "$ref"; done
fi
