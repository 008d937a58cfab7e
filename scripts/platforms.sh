# shellcheck shell=bash
# Sourced (not run) by build_docker.sh, scripts/base-image.sh and scripts/image-wheels.sh: the one table of
# the image's platform names, a row per platform upstream builds.
#   platform: Docker's (OCI's) os/architecture[/variant], as given in PLATFORM and printed
#   token:    the platform in one word: "{arch}" in BASE, the -<token> tag suffix, base and wheel cache names
#   deb:      Debian's architecture (dpkg --print-architecture, debootstrap --arch): which row this machine is
#   oci:      the image config's architecture (scripts/docker-archive.py adds arm's variant itself)
#   goarch, goarm: Go's GOARCH and GOARM (- for none) for scripts/build-go.sh --image
#   pyarch:   the machine in pip's platform tag, linux_<pyarch> (uname -m of that platform)
PLATFORMS='
linux/amd64   amd64  amd64  amd64  amd64  -  x86_64
linux/arm64   arm64  arm64  arm64  arm64  -  aarch64
linux/arm/v7  armv7  armhf  arm    arm    7  armv7l
linux/386     386    i386   386    386    -  i686
'

# platform_row PLATFORM: its row, with the other spellings Docker takes for the same platforms; nothing
# (and status 1) for a platform not in the table.
platform_row() {
  local p=$1
  case $p in
    linux/arm64/v8) p=linux/arm64 ;;
    linux/arm) p=linux/arm/v7 ;;
    linux/i386) p=linux/386 ;;
  esac
  awk -v v="$p" '$1 == v { print; found = 1; exit } END { exit !found }' <<<"$PLATFORMS"
}

# platform_of_deb DEB: the platform whose Debian architecture is DEB (this machine's, for a default).
platform_of_deb() { awk -v v="$1" '$3 == v { print $1; exit }' <<<"$PLATFORMS"; }

# The platforms, comma-separated, for error messages.
platform_names() { awk 'NF { printf "%s%s", s, $1; s = ", " }' <<<"$PLATFORMS"; }
