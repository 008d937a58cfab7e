#!/usr/bin/env bash
# No registry is reachable here, so the Dockerfile's base comes from Debian's packages: debootstrap a
# minimal bookworm root, slim it the way debian:bookworm-slim is slimmed, and load it into Docker.
#   scripts/base-image.sh [PLATFORM]     PLATFORM: linux/amd64, linux/arm64, linux/arm/v7 or linux/386
#                                        (default: this machine's)
# Prints the image reference: containerboot-base:bookworm for this machine's architecture, and
# containerboot-base:bookworm-<arch> for another (that tag is set for this machine's architecture too, so
# BASE='containerboot-base:bookworm-{arch}' names the right one for every platform in build_docker.sh).
# <arch> is build_docker.sh's token for the platform: amd64, arm64, armv7, 386.
# A root of another Debian architecture is made with `debootstrap --foreign` and its second stage run in a
# chroot: under qemu for arm64 and armhf (scripts/qemu-binfmt.sh), natively for i386 (this kernel runs
# 32-bit x86); about 2 minutes for arm64 on 2 cores, against 1 natively.
# The rootfs tarball is cached under $CACHE/base, named after the architecture and a hash of the recipe
# below (suite, variant, what is left out); the image carries that hash in a label, so a changed recipe
# makes a new tarball and a new image, and a warm machine only loads the tarball (or does nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${BASE_IMAGE:-containerboot-base:bookworm}
case ${IMAGE##*/} in *:*) ;; *) IMAGE=$IMAGE:latest ;; esac  # the -<arch> suffix goes on the tag
CACHE=${CONTAINERBOOT_CACHE:-/var/cache/containerboot}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
host_arch=$(dpkg --print-architecture)
platform=${1:-linux/$host_arch}
# shellcheck source=scripts/platforms.sh
. scripts/platforms.sh
# arch: the tag's token (build_docker.sh's "{arch}"), also naming the cached tarball; deb: Debian's
# architecture (debootstrap --arch); oci: the image config's architecture.
if ! row=$(platform_row "$platform"); then
  echo "base-image: unsupported platform $platform ($(platform_names))" >&2
  exit 1
fi
read -r _ arch deb oci _ <<<"$row"
ref=$IMAGE
[ "$deb" = "$host_arch" ] || ref=$IMAGE-$arch

# What debian:*-slim leaves out: documentation, manuals and translations.
SLIM='path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*'
# Bump the 1 when the steps below change what ends up in the root.
key=$(printf '1 %s minbase %s\n%s\n' "$SUITE" "$arch" "$SLIM" | sha1sum | cut -c1-10)

have=$(docker image inspect --format '{{index .Config.Labels "containerboot.base.key"}}' "$IMAGE-$arch" 2>/dev/null || true)
if [ "$have" = "$key" ]; then
  docker image inspect "$ref" >/dev/null 2>&1 || docker tag "$IMAGE-$arch" "$ref"
  echo "$ref"
  exit 0
fi

tarball=$CACHE/base/$SUITE-minbase-$arch-$key.tar
if [ ! -f "$tarball" ]; then
  command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
  printf '%s\n' "$SLIM" > "$root/etc/dpkg/dpkg.cfg.d/slim"
  if [ "$deb" = "$host_arch" ]; then
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >/dev/null
  else
    scripts/qemu-binfmt.sh "$deb"
    debootstrap --arch="$deb" --variant=minbase --foreign "$SUITE" "$root" "$MIRROR" >/dev/null
    chroot "$root" /debootstrap/debootstrap --second-stage >/dev/null
  fi
  cat > "$root/etc/apt/sources.list" <<SRC
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SRC
  # debootstrap unpacks its first packages without dpkg, so the excludes above missed those: apply them.
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/* \
         "$root"/debootstrap
  mkdir -p "$(dirname "$tarball")"
  tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
python3 scripts/docker-archive.py "$tarball" "$IMAGE-$arch" "$oci" "containerboot.base.key=$key" \
  | docker load >/dev/null
[ "$ref" = "$IMAGE-$arch" ] || docker tag "$IMAGE-$arch" "$ref"
echo "$ref"
