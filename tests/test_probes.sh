#!/usr/bin/env bash
# USDT probes of libhakmem.so (docs/tracing.md) and the acetrace tracer.
#   test_probes.sh notes --lib LIB --tracing yes|no [--acetrace BIN] [--workload BIN]
#   test_probes.sh bpf   --lib LIB --tracing yes|no [--acetrace BIN] [--workload BIN]
# notes: readelf -n lists every probe of provider hakmem with its argument
#   count, and no probe sits in the malloc/free entry points.
# bpf: acetrace sees a workload's refills, and its totals match the
#   library's own counters (HAKMEM_STATS=1).
# Exit 0 passed, 1 failed, 77 skipped (tracing disabled, acetrace not built,
# BPF not available here), with the reason on the last line.
set -uo pipefail
mode=${1:-}
shift || true
lib= tracing=no acetrace= workload=
while [[ $# -gt 0 ]]; do
    case $1 in
    --lib) lib=$2; shift 2 ;;
    --tracing) tracing=$2; shift 2 ;;
    --acetrace) acetrace=$2; shift 2 ;;
    --workload) workload=$2; shift 2 ;;
    *) echo "usage: $0 notes|bpf --lib LIB --tracing yes|no [--acetrace BIN] [--workload BIN]"; exit 1 ;;
    esac
done
[[ $mode == notes || $mode == bpf ]] || { echo "usage: $0 notes|bpf ..."; exit 1; }
[[ -f $lib ]] || { echo "FAIL: no library at '$lib'"; exit 1; }
lib=$(realpath "$lib")

passed=0
failed=0
ok() { echo "ok: $1"; passed=$((passed + 1)); }
not_ok() { echo "FAIL: $1"; failed=$((failed + 1)); }
skip() {
    echo "$passed passed, $failed failed"
    echo "SKIP: $1"
    exit 77
}
finish() {
    echo "$passed passed, $failed failed"
    [[ $failed -eq 0 ]]
    exit $?
}

# name -> argument count, as documented in docs/tracing.md.
declare -A want=([refill]=4 [flush]=2 [remote_collect]=2 [event_dropped]=1
                 [ace_decision]=4 [purge]=1)

# "name argc location" for each stapsdt note of provider hakmem.
probe_list() {
    readelf -n "$lib" 2>/dev/null | awk '
        /^ *Provider:/ { prov = $2 }
        /^ *Name:/ { name = $2 }
        /^ *Location:/ { loc = $2; sub(/,$/, "", loc) }
        /^ *Arguments:/ {
            if (prov == "hakmem") { print name, NF - 1, loc }
            prov = ""
        }'
}

if ! command -v readelf >/dev/null; then
    skip "readelf not installed (binutils)"
fi

if [[ $tracing != yes ]]; then
    if [[ $mode == notes ]]; then
        n=$(probe_list | wc -l)
        if [[ $n -eq 0 ]]; then
            ok "built without tracing: no hakmem probe notes"
        else
            not_ok "built without tracing, but $n hakmem probe notes are present"
            finish
        fi
    fi
    skip "built with tracing disabled (sys/sdt.h not found, or -Dtracing=disabled)"
fi

# ---- notes --------------------------------------------------------------

if [[ $mode == notes ]]; then
    list=$(probe_list)
    echo "$list" | awk '{ print "  note:", $0 }'
    for name in "${!want[@]}"; do
        sites=$(awk -v n="$name" '$1 == n' <<<"$list" | wc -l)
        bad=$(awk -v n="$name" -v a="${want[$name]}" '$1 == n && $2 != a' <<<"$list" | wc -l)
        if [[ $sites -ge 1 && $bad -eq 0 ]]; then
            ok "hakmem:$name: $sites site(s), ${want[$name]} argument(s)"
        else
            not_ok "hakmem:$name: $sites site(s), $bad with an argument count other than ${want[$name]}"
        fi
    done
    extra=$(awk '{ print $1 }' <<<"$list" | sort -u | while read -r n; do
        [[ -n ${want[$n]:-} ]] || echo "$n"; done)
    if [[ -z $extra ]]; then
        ok "no undocumented probes"
    else
        not_ok "undocumented probes: $extra"
    fi
    # No probe inside the fast-path entry points (src/hot/api.c).
    if command -v nm >/dev/null; then
        inside=
        fast=0
        while read -r addr size _ sym; do
            [[ $sym =~ ^(malloc|free|calloc|realloc|hakmem_malloc|hakmem_free|free_sized)$ ]] ||
                continue
            fast=$((fast + 1))
            lo=$((16#$addr)) hi=$((16#$addr + 16#$size))
            while read -r name _ loc; do
                l=$((16#${loc#0x}))
                ((l >= lo && l < hi)) && inside+=" $sym($name)"
            done <<<"$list"
        done < <(nm -D --defined-only -S "$lib" | awk 'NF == 4')
        if [[ $fast -lt 4 ]]; then
            not_ok "found only $fast of the fast-path symbols in $lib"
        elif [[ -z $inside ]]; then
            ok "no probe inside malloc/free/calloc/realloc ($fast functions checked)"
        else
            not_ok "probes inside fast-path functions:$inside"
        fi
    fi
    finish
fi

# ---- bpf ----------------------------------------------------------------

[[ -n $acetrace && -x $acetrace ]] ||
    skip "acetrace not built (needs libbpf-dev, bpftool and clang)"
[[ -n $workload && -x $workload ]] || skip "no workload program (tools/acectl not built)"

# A sanitizer build of the library cannot be preloaded into a plain program.
if ! pre=$(LD_PRELOAD="$lib" "$workload" --seconds 0.05 --threads 1 2>&1 >/dev/null); then
    skip "the workload does not run with LD_PRELOAD=$lib (a sanitizer build?): $(head -c 200 <<<"$pre")"
fi
check=$("$acetrace" --check 2>&1)
rc=$?
if [[ $rc -eq 3 ]]; then
    skip "$check"
elif [[ $rc -ne 0 ]]; then
    not_ok "acetrace --check exited $rc: $check"
    finish
fi
ok "acetrace --check: $check"

work=$(mktemp -d)
wpid=
cleanup() {
    [[ -n $wpid ]] && kill "$wpid" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# 1. A command traced from its first instruction: every refill is seen, so
#    the tracer's totals equal the library's counters printed at exit.
"$acetrace" --summary --lib "$lib" -- env LD_PRELOAD="$lib" HAKMEM_STATS=1 HAKMEM_ACE=1 \
    HAKMEM_ACE_INTERVAL_MS=2 "$workload" --seconds 1 --threads 2 --size 64 \
    >"$work/out" 2>"$work/err"
rc=$?
if [[ $rc -ne 0 ]]; then
    not_ok "acetrace -- workload exited $rc: $(tail -3 "$work/err")"
    finish
fi
# total lines: "total T class=C refills=R blocks_refilled=B ... blocks_flushed=F ..."
awk '$1 == "total" && $3 ~ /^class=/ {
        for (i = 3; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        if (v["refills"] > 0) print v["class"], v["refills"], v["blocks_refilled"], v["blocks_flushed"]
     }' "$work/out" | sort -n >"$work/traced"
# stats lines: "hakmem stats: class size refill refills blocks_refilled flushes blocks_flushed ..."
awk '$1 == "hakmem" && $2 == "stats:" && $3 ~ /^[0-9]+$/ && $6 > 0 { print $3, $6, $7, $9 }' \
    "$work/err" | sort -n >"$work/stats"
if [[ ! -s $work/stats ]]; then
    not_ok "no HAKMEM_STATS lines from the workload"
elif [[ ! -s $work/traced ]]; then
    not_ok "acetrace printed no per-class totals: $(head -5 "$work/out")"
elif diff "$work/stats" "$work/traced" >"$work/diff"; then
    ok "acetrace totals match HAKMEM_STATS (class refills blocks_refilled blocks_flushed):$(
        awk '{ printf " [%s]", $0 }' "$work/stats")"
else
    not_ok "acetrace totals differ from HAKMEM_STATS (< stats, > acetrace):"
    cat "$work/diff"
fi
if awk '$1 == "total" && /decisions=[1-9]/' "$work/out" | grep -q .; then
    ok "ace_decision seen with HAKMEM_ACE=1"
else
    not_ok "no ace_decision with HAKMEM_ACE=1"
fi
if awk '$1 == "summary"' "$work/out" | grep -q 'refills=[1-9]'; then
    ok "--summary prints per-second lines"
else
    not_ok "--summary printed no per-second line with refills"
fi

# 2. -p PID on a running process, events as JSON lines.
LD_PRELOAD="$lib" HAKMEM_ACE=1 "$workload" --seconds 4 --threads 2 --size 64 \
    >"$work/wout" 2>&1 &
wpid=$!
for _ in $(seq 50); do
    grep -q '^pid ' "$work/wout" && break
    sleep 0.05
done
"$acetrace" -p "$wpid" --json --duration 1 >"$work/events" 2>"$work/perr"
rc=$?
refills=$(grep -c '"event":"refill"' "$work/events")
if [[ $rc -eq 0 && $refills -gt 0 ]]; then
    ok "acetrace -p $wpid --json: $refills refill events in 1 s"
else
    not_ok "acetrace -p: exit $rc, $refills refill events: $(tail -3 "$work/perr")"
fi
if command -v python3 >/dev/null; then
    if python3 -c '
import json, sys
n = 0
for line in open(sys.argv[1]):
    o = json.loads(line)
    if o.get("event") == "refill":
        assert {"t", "tid", "class", "wanted", "got", "heap"} <= set(o), o
        assert 1 <= o["got"] <= 8 * o["wanted"], o   # a whole free list: up to 8 batches
    n += 1
assert n > 0
' "$work/events" 2>"$work/json"; then
        ok "--json lines parse, refill events carry class, wanted, got, heap"
    else
        not_ok "--json output: $(tail -2 "$work/json")"
    fi
fi
kill "$wpid" 2>/dev/null
wait "$wpid" 2>/dev/null
wpid=

# 3. Exit codes: a missing process, a process without hakmem.
"$acetrace" -p 999999999 >/dev/null 2>&1
rc=$?
[[ $rc -eq 2 ]] && ok "no such process: exit $rc" || not_ok "no such process: exit $rc"
sleep 5 &
spid=$!
"$acetrace" -p "$spid" >/dev/null 2>"$work/nerr"
rc=$?
kill "$spid" 2>/dev/null
[[ $rc -eq 4 ]] && ok "process without hakmem: exit 4 ($(cat "$work/nerr"))" ||
    not_ok "process without hakmem: exit $rc"
finish
