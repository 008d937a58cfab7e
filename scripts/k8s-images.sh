#!/usr/bin/env bash
# The images the Kubernetes lab (tests/lab/cluster.py) imports into its containerd, written as `docker save`
# archives into $CACHE/k8s-images (CACHE: /var/cache/containerboot, CONTAINERBOOT_CACHE overrides):
#   pause.tar            containerboot-lab/pause:<KUBERNETES_VERSION>: k8s.io/kubernetes' own build/pause/linux/pause.c
#                        (from the Go module cache, at the pinned version) compiled statically, in a FROM scratch
#                        image: no registry is reachable, so the sandbox image is made here.
#   ours.tar             containerboot-lab:ours, this project's image (build_docker.sh over scripts/base-image.sh's
#                        offline base).
#   upstream-legacy.tar  containerboot-lab:upstream-legacy: the same image with upstream's containerboot (the pinned
#                        Go build from scripts/build-go.sh) as the entrypoint and `iptables` switched to the legacy
#                        variant: the image the original failure was seen with.
#   upstream-nft.tar     containerboot-lab:upstream-nft: the same with `iptables` left at the nf_tables variant (where
#                        upstream works), for the timing comparison.
# Every image but ours is rebuilt only when missing; ours is rebuilt every time (it is the code under test).
# SKIP_OURS=true keeps an existing ours.tar. Prints the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
. ./versions.env
CACHE=${CONTAINERBOOT_CACHE:-/var/cache/containerboot}
out=$CACHE/k8s-images
mkdir -p "$out"
scripts/docker-engine.sh >&2

# Runs a command with the classic builder, showing its output only when it fails (the builder's deprecation
# notice otherwise fills the terminal).
quiet() {
  local out
  out=$(DOCKER_BUILDKIT=0 "$@" 2>&1) || { echo "$out" >&2; return 1; }
}

pause_src=$CACHE/go/mod/k8s.io/kubernetes@$KUBERNETES_VERSION/build/pause/linux/pause.c
if [ ! -s "$out/pause.tar" ]; then
  [ -f "$pause_src" ] || scripts/build-go.sh >/dev/null  # the Kubernetes build puts that module in the cache
  ctx=$(mktemp -d)
  # -DVERSION: pause.c stringifies it for -v, as Kubernetes' own Makefile passes it.
  gcc -Os -static -Wall -Werror -DVERSION="$KUBERNETES_VERSION" -o "$ctx/pause" "$pause_src"
  strip "$ctx/pause"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$ctx/Dockerfile"
  quiet docker build -q -t "containerboot-lab/pause:$KUBERNETES_VERSION" "$ctx"
  docker save -o "$out/pause.tar.tmp" "containerboot-lab/pause:$KUBERNETES_VERSION"
  mv "$out/pause.tar.tmp" "$out/pause.tar"
  rm -rf "$ctx"
fi

if [ "${SKIP_OURS:-false}" != true ] || [ ! -s "$out/ours.tar" ]; then
  base=$(scripts/base-image.sh)
  BASE=$base REPOS=containerboot-lab TAGS=ours ./build_docker.sh >/dev/null 2>"$out/ours-build.log" || {
    cat "$out/ours-build.log" >&2; exit 1; }
  docker save -o "$out/ours.tar.tmp" containerboot-lab:ours
  mv "$out/ours.tar.tmp" "$out/ours.tar"
fi

# Upstream's containerboot in place of ours; everything else (tailscaled, iptables, nft, the base) the same.
upstream=$CACHE/bin/tailscale-$TAILSCALE_VERSION/containerboot
[ -x "$upstream" ] || scripts/build-go.sh >/dev/null
for variant in legacy nft; do
  [ -s "$out/upstream-$variant.tar" ] && [ "$out/upstream-$variant.tar" -nt "$out/ours.tar" ] && continue
  ctx=$(mktemp -d)
  cp "$upstream" "$ctx/containerboot"
  {
    echo 'FROM containerboot-lab:ours'
    echo 'COPY containerboot /usr/local/bin/containerboot'
    if [ "$variant" = legacy ]; then
      # What update-alternatives --set iptables /usr/sbin/iptables-legacy does (the image has no dpkg).
      echo 'RUN for t in iptables ip6tables; do for s in "" -save -restore; do' \
           'ln -sf /usr/sbin/$t-legacy$s /etc/alternatives/$t$s; done; done'
    fi
  } > "$ctx/Dockerfile"
  quiet docker build -q -t "containerboot-lab:upstream-$variant" "$ctx"
  docker save -o "$out/upstream-$variant.tar.tmp" "containerboot-lab:upstream-$variant"
  mv "$out/upstream-$variant.tar.tmp" "$out/upstream-$variant.tar"
  rm -rf "$ctx"
done
echo "$out"
