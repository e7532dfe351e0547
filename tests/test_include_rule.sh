#!/usr/bin/env bash
# Contract D: a box includes another box only through its public header,
# src/<box>/<box>.h.  Files of a box may include their own box's headers.
set -euo pipefail
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
