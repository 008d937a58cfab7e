#!/usr/bin/env bash
# Lets this amd64 machine run arm64 and 32-bit arm binaries (those images' RUN steps, their tests) through
# Debian's qemu-user-static (installed by install-deps.sh): mounts binfmt_misc if needed and registers the
# aarch64 or arm handler with the F flag, so the kernel opens the interpreter once, here, and it works inside
# chroots and containers that do not carry it. Idempotent. Usage: scripts/qemu-binfmt.sh [ARCH...] (default:
# arm64). ARCH is a Debian, Docker or build_docker.sh name (arm64, armhf/arm/armv7, amd64, i386/386); an x86
# one on an x86_64 kernel needs nothing: the kernel runs 32-bit x86 itself (IA32 emulation).
set -euo pipefail
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/register" ]; then
  mount -t binfmt_misc binfmt_misc "$binfmt"
fi
for arch in "${@:-arm64}"; do
  case $arch in
    arm64 | aarch64) name=qemu-aarch64 ;;
    armhf | arm | armv7 | armv7l) name=qemu-arm ;;
    amd64 | x86_64) [ "$(uname -m)" = x86_64 ] && continue; name=qemu-x86_64 ;;
    i386 | 386 | i686) [ "$(uname -m)" = x86_64 ] && continue; name=qemu-i386 ;;
    *) echo "qemu-binfmt: unsupported architecture $arch" >&2; exit 1 ;;
  esac
  conf=/usr/lib/binfmt.d/$name.conf
  if [ -e "$binfmt/$name" ]; then
    # An entry without F (binfmt-support's default is P only) cannot start the interpreter in a container.
    if grep -q '^enabled' "$binfmt/$name" && grep -q '^flags:.*F' "$binfmt/$name"; then
      continue
    fi
    echo -1 > "$binfmt/$name"
  fi
  [ -f "$conf" ] || { echo "qemu-binfmt: $conf missing; install qemu-user-static" >&2; exit 1; }
  # The line is :name:type:offset:magic:mask:interpreter:flags; binfmt.d's flags are OPF already.
  line=$(grep -v '^#' "$conf" | head -n 1)
  case ${line##*:} in *F*) ;; *) line="${line}F" ;; esac
  printf '%s' "$line" > "$binfmt/register"
done
