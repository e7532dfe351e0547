#!/usr/bin/env bash
# Configures and builds hakmem into build/ (or $1); options after the
# directory apply to an existing build directory too.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
shift || true
if [[ -f $dir/build.ninja ]]; then
    [[ $# -eq 0 ]] || meson configure "$dir" "$@" >/dev/null
else
    meson setup "$dir" "$@" >/dev/null
fi
ninja -C "$dir"
