#!/usr/bin/env bash
# No registry is reachable here, so the Dockerfile's base comes from Debian's packages: debootstrap a
# minimal bookworm root, slim it the way debian:bookworm-slim is slimmed, and `docker import` it.
# Prints the image reference. The rootfs tarball is cached, so a warm machine only imports it.
set -euo pipefail
IMAGE=${BASE_IMAGE:-containerboot-base:bookworm}
CACHE=${CONTAINERBOOT_CACHE:-/var/cache/containerboot}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE"
  exit 0
fi
tarball=$CACHE/base/bookworm-minbase.tar
if [ ! -f "$tarball" ]; then
  command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
  # What debian:*-slim leaves out: documentation, manuals and translations.
  cat > "$root/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null
  cat > "$root/etc/apt/sources.list" <<SRC
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SRC
  # debootstrap unpacks its first packages without dpkg, so the excludes above missed those: apply them.
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*
  mkdir -p "$(dirname "$tarball")"
  tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
docker import -c 'CMD ["bash"]' "$tarball" "$IMAGE" >/dev/null
echo "$IMAGE"
