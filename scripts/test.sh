#!/usr/bin/env bash
# The test command: installs dependencies, builds, and runs every test:
# unit, contract, integration and benchmark smoke tests, then the unit tests
# again under ASan+UBSan and the concurrent ones under TSan.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh build
meson test -C build --print-errorlogs

echo "== sanitizers: ASan + UBSan (unit tests)"
bash scripts/build.sh build-asan -Dbuildtype=debug -Db_sanitize=address,undefined -Db_lundef=false
ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  HAKMEM_TEST_QUICK=1 meson test -C build-asan --suite unit --print-errorlogs

echo "== sanitizers: TSan (queue, refill, threads)"
bash scripts/build.sh build-tsan -Dbuildtype=debug -Db_sanitize=thread -Db_lundef=false
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 HAKMEM_TEST_QUICK=1 \
  meson test -C build-tsan --print-errorlogs queue refill threads
echo "all tests passed"
