#!/usr/bin/env bash
# Installs what the program and its tests need on Debian 12: OS packages and the Python venv (.venv).
# Idempotent; a warm machine takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iptables nftables python3-nftables python3-venv python3-dev iproute2 curl ca-certificates
          socat procps openssl util-linux docker.io debootstrap qemu-user-static docker-registry
          containerd runc containernetworking-plugins gcc libc6-dev python3-yaml)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || true
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python3 so that its python3-nftables binding is the one the venv sees.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/nftables "$site/nftables"
# The exact versions of requirements-test.txt (scripts/lock-deps.sh writes it), then this project itself,
# built with the setuptools pinned there (no build isolation: that would fetch the newest).
stamp=.venv/.installed-$(cat pyproject.toml requirements.txt requirements-test.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  log=$(mktemp)
  if ! { .venv/bin/pip install -q -r requirements-test.txt &&
         .venv/bin/pip install -q --no-deps --no-build-isolation -e .; } >"$log" 2>&1; then
    cat "$log"; exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
.venv/bin/python -c 'import nftables, click' >/dev/null
echo "install-deps: OS packages and .venv ready"
