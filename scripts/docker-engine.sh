#!/usr/bin/env bash
# Makes sure a Docker engine answers on /var/run/docker.sock, starting Debian's dockerd (installed by
# install-deps.sh) when none is running. Its bridge and default networks use 198.19.0.0/16 (the lab range).
set -euo pipefail
if docker info >/dev/null 2>&1; then
  exit 0
fi
log=/var/log/containerboot-dockerd.log
nohup dockerd --bip 198.19.255.1/24 --default-address-pool base=198.19.0.0/16,size=24 \
  --host unix:///var/run/docker.sock >"$log" 2>&1 &
echo $! > /var/run/containerboot-dockerd.pid
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not start; see $log" >&2
tail -20 "$log" >&2
exit 1
