#!/usr/bin/env bash
# Installs what hakmem needs to build, test and benchmark, from Debian
# packages, when missing.  Safe to run again.
set -euo pipefail
packages=(
  gcc meson ninja-build pkg-config
  libcmocka-dev liburcu-dev          # tests; the event queue
  git sqlite3 perl python3 redis-server redis-tools   # integration programs
  valgrind                           # instruction counts
  systemtap-sdt-dev libbpf-dev bpftool clang   # USDT probes, tools/acetrace
  libjemalloc2 libmimalloc2.0 libtcmalloc-minimal4 gnuplot-nox   # benchmarks
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=()
    [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian starts redis-server as a service on install: the tests start their
# own on other ports, so it is left alone.
