#!/usr/bin/env bash
# Contract D: a box includes another box only through its public header,
# src/<box>/<box>.h.  Files of a box may include their own box's headers.
set -euo pipefail
# --self-test: the rule must reject a tree that breaks it.
if [[ ${1:-} == --self-test ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/src/a" "$tmp/src/b"
    echo '#include "../b/b.h"' >"$tmp/src/a/a.c"
    echo '#include "../b/b_internal.h"' >"$tmp/src/a/bad.c"
    touch "$tmp/src/b/b.h" "$tmp/src/b/b_internal.h"
    if out=$("$0" "$tmp" 2>&1); then
        echo "$out"
        echo "self-test: a cross-box include of internals was not caught"
        echo "0 passed, 1 failed"
        exit 1
    fi
    grep -q 'a/bad.c includes ../b/b_internal.h' <<<"$out" || { echo "$out"; exit 1; }
    echo "self-test: caught: $(grep FAIL <<<"$out")"
    echo "1 passed, 0 failed"
    exit 0
fi
root=${1:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$root/src"
bad=0
checked=0
for file in */*.c */*.h; do
    box=${file%%/*}
    while IFS= read -r inc; do
        target=${inc#../}
        checked=$((checked + 1))
        other=${target%%/*}
        if [[ $inc == ../* ]]; then
            [[ $target == include/hakmem.h || $target == ../include/hakmem.h ]] && continue
            if [[ $target != "$other/$other.h" ]]; then
                echo "FAIL: $file includes $inc (not the public header of box $other)"
                bad=1
            fi
        fi
    done < <(sed -n 's/^#include "\(.*\)"/\1/p' "$file")
done
boxes=$(ls -d */ | tr -d / | tr '\n' ' ')
echo "boxes: $boxes; includes checked: $checked"
if [[ $bad -ne 0 ]]; then
    echo "1 passed, 1 failed"
    exit 1
fi
echo "1 passed, 0 failed"
