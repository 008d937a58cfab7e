#!/usr/bin/env bash
# Builds the real components at the versions pinned in versions.env into a cache directory:
#   $CACHE/bin/tailscale-$TAILSCALE_VERSION/{tailscale,tailscaled,containerboot}   (containerboot: upstream's, for the benchmark)
#   $CACHE/bin/headscale-$HEADSCALE_VERSION/headscale
#   $CACHE/bin/etcd-$ETCD_VERSION/etcd                                  (for tests/lab/kubeapi.py)
#   $CACHE/bin/kubernetes-$KUBERNETES_VERSION/kube-apiserver            (for tests/lab/kubeapi.py)
#       and kubelet, kube-proxy, kube-controller-manager, kube-scheduler  (for tests/lab/cluster.py)
#   $CACHE/bin/k8s-operator-$TAILSCALE_VERSION/k8s-operator            (tailscale.com/cmd/k8s-operator, for tests/k8s)
# Module downloads and the Go build cache live under $CACHE too, so a warm machine builds nothing.
# Prints the five directories, in that order. CACHE defaults to /var/cache/containerboot (CONTAINERBOOT_CACHE overrides).
# With --image it builds only the image's tailscaled (the CLI linked in: it acts as `tailscale` when called
# by that name; see IMAGE_TAGS) into $CACHE/bin/tailscaled-image-..., and prints that directory.
# TAILSCALE_VERSION and HEADSCALE_VERSION in the environment override versions.env. etcd and Kubernetes are
# built from the modules committed under scripts/gomod/, whose go.mod and go.sum pin their versions and every
# dependency; those versions must agree with versions.env (checked below).
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
etcd=$CACHE/bin/etcd-$ETCD_VERSION
k8s=$CACHE/bin/kubernetes-$KUBERNETES_VERSION
op=$CACHE/bin/k8s-operator-$TAILSCALE_VERSION
mkdir -p "$ts" "$hs" "$etcd" "$k8s" "$op"

build_tailscale() {
  [ -x "$ts/tailscale" ] && [ -x "$ts/tailscaled" ] && [ -x "$ts/containerboot" ] && return
  GOBIN=$ts go install -ldflags "-s -w" "tailscale.com/cmd/tailscale@$TAILSCALE_VERSION" \
    "tailscale.com/cmd/tailscaled@$TAILSCALE_VERSION" "tailscale.com/cmd/containerboot@$TAILSCALE_VERSION"
}

# The Tailscale Kubernetes operator at the same version as tailscaled: its module (tailscale.com) is the one
# build_tailscale already fetched; its extra dependencies (controller-runtime, client-go) come from the proxy.
build_operator() {
  [ -x "$op/k8s-operator" ] && return
  GOBIN=$op go install -ldflags "-s -w" "tailscale.com/cmd/k8s-operator@$TAILSCALE_VERSION"
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

# Builds main packages of the committed module in scripts/gomod/$1 into directory $2 (args 3...: ldflags, then
# packages). -mod=readonly: the committed go.mod and go.sum are used as they are, never updated, so the build
# is the same on every machine. CGO_ENABLED=0 as in etcd's and Kubernetes' own release builds of these
# commands (static binaries). The binaries are linked into a temporary directory and moved into place, so an
# interrupted build leaves no half-written binary for the next run to skip.
build_module() {
  local mod=scripts/gomod/$1 out=$2 ldflags=$3 tmp
  shift 3
  tmp=$(mktemp -d "$out/.build.XXXXXX")
  (cd "$mod" && CGO_ENABLED=0 go build -mod=readonly -ldflags "$ldflags" -o "$tmp/" "$@")
  mv "$tmp"/* "$out/"
  rmdir "$tmp"
}

# Fails when the committed module $1 requires $2 at another version than versions.env pins ($3).
check_pin() {
  grep -qE "^require $2 $3\$" "scripts/gomod/$1/go.mod" && return
  echo "scripts/gomod/$1/go.mod does not require $2 $3 (versions.env): update it as its header says" >&2
  return 1
}

build_etcd() {
  [ -x "$etcd/etcd" ] && return
  check_pin etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
  build_module etcd "$etcd" "-s -w" go.etcd.io/etcd/server/v3
  mv "$etcd/server" "$etcd/etcd"  # go build names it after the path's last element before the /v3 suffix
}

# The Kubernetes commands to build: kube-apiserver for tests/lab/kubeapi.py, all five for tests/lab/cluster.py.
# The module's tools.go imports each of them, so go.sum covers them.
K8S_COMMANDS=(kube-apiserver kubelet kube-proxy kube-controller-manager kube-scheduler)

# Builds the named commands that are missing, in one `go build`.
build_kubernetes() {
  local c pkgs=()
  for c in "$@"; do
    [ -x "$k8s/$c" ] || pkgs+=("k8s.io/kubernetes/cmd/$c")
  done
  [ ${#pkgs[@]} -eq 0 ] && return
  check_pin kubernetes k8s.io/kubernetes "$KUBERNETES_VERSION"
  # The version stamped in as Kubernetes' own build does (hack/lib/version.sh); without it the server reports
  # v0.0.0 to its clients.
  local v=k8s.io/component-base/version minor=${KUBERNETES_VERSION#v1.}
  minor=${minor%%.*}
  build_module kubernetes "$k8s" "-s -w -X $v.gitVersion=$KUBERNETES_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor" \
    "${pkgs[@]}"
}

# The image's tailscaled: the CLI linked in (ts_include_cli) and, left out, only what a Linux container
# cannot use (desktop integrations, appliances, Wake-on-LAN, layer 2, BGP, self-update, shell completion).
IMAGE_TAGS=ts_include_cli,ts_omit_systray,ts_omit_dbus,ts_omit_networkmanager,ts_omit_synology
IMAGE_TAGS+=,ts_omit_flashappliance,ts_omit_serviceclientprefs,ts_omit_tpm,ts_omit_wakeonlan,ts_omit_tap
IMAGE_TAGS+=,ts_omit_bird,ts_omit_captiveportal,ts_omit_completion,ts_omit_qrcodes,ts_omit_clientupdate
IMAGE_TAGS+=,ts_omit_webbrowser,ts_omit_colorable,ts_omit_debugeventbus,ts_omit_syspolicy

if [ "${1:-}" = "--image" ]; then
  # GOARCH picks the image's architecture (default: this machine's; another one gets its own directory, with
  # a -GOARCH suffix). A cross build has cgo off, so it is static, as upstream's release binaries are.
  # GOARCH=arm also takes GOARM, 7 unless given: the image's platform is linux/arm/v7, and ARMv7 with hardware
  # floating point is Debian armhf's baseline too. It goes into the suffix (-armv7): binaries differ by GOARM.
  goarch=${GOARCH:-$(go env GOHOSTARCH)}
  image=$CACHE/bin/tailscaled-image-$TAILSCALE_VERSION-$(echo "$IMAGE_TAGS" | sha1sum | cut -c1-8)
  if [ "$goarch" = arm ]; then
    export GOARM=${GOARM:-7}
    image+=-armv$GOARM
  elif [ "$goarch" != "$(go env GOHOSTARCH)" ]; then
    image+=-$goarch
  fi
  if [ ! -x "$image/tailscaled" ]; then
    mkdir -p "$image"
    if [ "$goarch" = "$(go env GOHOSTARCH)" ]; then
      GOBIN=$image go install -tags "$IMAGE_TAGS" -ldflags "-s -w" "tailscale.com/cmd/tailscaled@$TAILSCALE_VERSION"
    else
      # go install refuses GOBIN for a cross build; it puts the binary in $GOPATH/bin/linux_$GOARCH instead.
      gopath=$(mktemp -d)
      GOARCH=$goarch GOPATH=$gopath go install -tags "$IMAGE_TAGS" -ldflags "-s -w" \
        "tailscale.com/cmd/tailscaled@$TAILSCALE_VERSION"
      mv "$gopath/bin/linux_$goarch/tailscaled" "$image/tailscaled"
      rm -rf "$gopath"
    fi
  fi
  echo "$image"
  exit 0
fi

build_tailscale & t=$!
build_headscale & h=$!
build_etcd & e=$!
build_operator & o=$!
wait $t
wait $h
wait $e
wait $o
# The Kubernetes commands after the others, kube-apiserver alone first: it is the largest build (about 6
# minutes on 2 cores, 2.4 GB at its peak), and running it next to the others would add their memory to that
# peak for no gain in time on a small machine. The other four share most of its packages: with its build
# cache warm they take about 4 minutes together (10.6 with an empty cache).
build_kubernetes kube-apiserver
build_kubernetes "${K8S_COMMANDS[@]}"
echo "$ts"
echo "$hs"
echo "$etcd"
echo "$k8s"
echo "$op"
