#!/usr/bin/env bash
# The test command: installs dependencies, builds, and runs every test:
# unit, contract, integration, soak and benchmark smoke tests, then the unit
# tests again under ASan+UBSan and under TSan.  Ends
# with one line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0

# run_meson DIR ARGS...: one meson test run; its summary is kept for the total.
run_meson() {
    local dir=$1
    shift
    "$@" meson test -C "$dir" --print-errorlogs "${MESON_ARGS[@]}" 2>&1 | tee -a "$log"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
}

bash scripts/build.sh build || exit 1
MESON_ARGS=()
run_meson build env

echo "== sanitizers: ASan + UBSan (unit tests)"
bash scripts/build.sh build-asan -Dbuildtype=debug -Db_sanitize=address,undefined -Db_lundef=false || exit 1
MESON_ARGS=(--suite unit)
run_meson build-asan env ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 HAKMEM_TEST_QUICK=1

echo "== sanitizers: TSan (unit tests)"
bash scripts/build.sh build-tsan -Dbuildtype=debug -Db_sanitize=thread -Db_lundef=false || exit 1
MESON_ARGS=(--suite unit)
# die_after_fork=0: the fork tests start threads (the ACE thread) in the
# child of a multi-threaded parent, which TSan otherwise refuses.
run_meson build-tsan env \
    "TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:die_after_fork=0:suppressions=$PWD/tests/tsan.supp" \
    HAKMEM_TEST_QUICK=1

ok=$(awk '/^Ok:/ {s += $2} END {print s + 0}' "$log")
failed=$(awk '/^(Fail|Timeout|Unexpected Pass):/ {s += $2} END {print s + 0}' "$log")
skipped=$(awk '/^Skipped:/ {s += $2} END {print s + 0}' "$log")
[[ $status -eq 0 && $failed -eq 0 ]] || { [[ $failed -eq 0 ]] && failed=1; status=1; }
echo "$ok passed, $failed failed, $skipped skipped"
exit $status
