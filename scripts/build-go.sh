#!/usr/bin/env bash
# Builds the real components at the versions pinned in versions.env into a cache directory:
#   $CACHE/bin/tailscale-$TAILSCALE_VERSION/{tailscale,tailscaled,containerboot}   (containerboot: upstream's, for the benchmark)
#   $CACHE/bin/headscale-$HEADSCALE_VERSION/headscale
# Module downloads and the Go build cache live under $CACHE too, so a warm machine builds nothing.
# Prints the two directories. CACHE defaults to /var/cache/containerboot (CONTAINERBOOT_CACHE overrides).
# With --image it builds only the image's tailscaled (the CLI linked in: it acts as `tailscale` when called
# by that name; see IMAGE_TAGS) into $CACHE/bin/tailscaled-image-..., and prints that directory.
# TAILSCALE_VERSION and HEADSCALE_VERSION in the environment override versions.env.
set -euo pipefail
cd "$(dirname "$0")/.."
want_ts=${TAILSCALE_VERSION:-}
want_hs=${HEADSCALE_VERSION:-}
# shellcheck source=/dev/null
. ./versions.env
TAILSCALE_VERSION=${want_ts:-$TAILSCALE_VERSION}
HEADSCALE_VERSION=${want_hs:-$HEADSCALE_VERSION}
CACHE=${CONTAINERBOOT_CACHE:-/var/cache/containerboot}
export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOTOOLCHAIN=local GOFLAGS=-mod=mod
ts=$CACHE/bin/tailscale-$TAILSCALE_VERSION
hs=$CACHE/bin/headscale-$HEADSCALE_VERSION
mkdir -p "$ts" "$hs"

build_tailscale() {
  [ -x "$ts/tailscale" ] && [ -x "$ts/tailscaled" ] && [ -x "$ts/containerboot" ] && return
  GOBIN=$ts go install -ldflags "-s -w" "tailscale.com/cmd/tailscale@$TAILSCALE_VERSION" \
    "tailscale.com/cmd/tailscaled@$TAILSCALE_VERSION" "tailscale.com/cmd/containerboot@$TAILSCALE_VERSION"
}

build_headscale() {
  [ -x "$hs/headscale" ] && return
  # `go install github.com/juanfont/headscale/cmd/headscale@VERSION` fails here: the module proxy refuses
  # to list headscale's versions, which `go install` asks for to check deprecation. A throwaway module
  # that requires the pinned version builds the same package without that lookup.
  local tmp
  tmp=$(mktemp -d)
  cat > "$tmp/go.mod" <<MOD
module headscalebuild
go 1.26
require github.com/juanfont/headscale $HEADSCALE_VERSION
MOD
  printf '//go:build tools\npackage tools\nimport _ "github.com/juanfont/headscale/cmd/headscale"\n' > "$tmp/tools.go"
  (cd "$tmp" && go mod tidy >/dev/null 2>&1 && go build -ldflags "-s -w" -o "$hs/headscale" \
    github.com/juanfont/headscale/cmd/headscale)
  rm -rf "$tmp"
}

# The image's tailscaled: the CLI linked in (ts_include_cli) and, left out, only what a Linux container
# cannot use (desktop integrations, appliances, Wake-on-LAN, layer 2, BGP, self-update, shell completion).
IMAGE_TAGS=ts_include_cli,ts_omit_systray,ts_omit_dbus,ts_omit_networkmanager,ts_omit_synology
IMAGE_TAGS+=,ts_omit_flashappliance,ts_omit_serviceclientprefs,ts_omit_tpm,ts_omit_wakeonlan,ts_omit_tap
IMAGE_TAGS+=,ts_omit_bird,ts_omit_captiveportal,ts_omit_completion,ts_omit_qrcodes,ts_omit_clientupdate
IMAGE_TAGS+=,ts_omit_webbrowser,ts_omit_colorable,ts_omit_debugeventbus,ts_omit_syspolicy

if [ "${1:-}" = "--image" ]; then
  image=$CACHE/bin/tailscaled-image-$TAILSCALE_VERSION-$(echo "$IMAGE_TAGS" | sha1sum | cut -c1-8)
  if [ ! -x "$image/tailscaled" ]; then
    mkdir -p "$image"
    GOBIN=$image go install -tags "$IMAGE_TAGS" -ldflags "-s -w" "tailscale.com/cmd/tailscaled@$TAILSCALE_VERSION"
  fi
  echo "$image"
  exit 0
fi

build_tailscale & t=$!
build_headscale & h=$!
wait $t
wait $h
echo "$ts"
echo "$hs"
