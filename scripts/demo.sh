#!/usr/bin/env bash
# The main job: sets up and builds hakmem, runs a server under it with
# learning on, drives load at it, then shows with acectl what ACE learned.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh build >/dev/null
lib=$PWD/build/libhakmem.so
acectl=$PWD/build/tools/acectl/acectl
log=$(mktemp)
server=
cleanup() {
    [[ -n $server ]] && kill "$server" 2>/dev/null
    rm -f "$log"
}
trap cleanup EXIT

echo "== hakmem demo: redis-server under LD_PRELOAD=$lib with HAKMEM_ACE=1"
port=16399
LD_PRELOAD=$lib HAKMEM_ACE=1 HAKMEM_STATS=1 \
    redis-server --port $port --bind 127.0.0.1 --save '' --appendonly no >"$log" 2>&1 &
server=$!
for _ in $(seq 1 50); do redis-cli -p $port ping >/dev/null 2>&1 && break; sleep 0.1; done
kill -0 "$server" 2>/dev/null || { echo "redis-server did not start:"; cat "$log"; exit 1; }
echo "redis-server pid $server; allocator: $(redis-cli -p $port info memory | tr -d '\r' | grep mem_allocator)"
echo "(redis reports the allocator it was built with; its malloc and free are hakmem's:"
echo " $(grep -o '/[^ ]*libhakmem[^ ]*' /proc/$server/maps | sort -u | head -1))"

echo
echo "== load: redis-benchmark, 200k requests, values of 16..4096 bytes"
for size in 16 256 4096; do
    redis-benchmark -p $port -q -n 70000 -r 100000 -d $size -t set,get,lpush,lpop |
        tr '\r' '\n' | grep 'requests per second' | sed "s/^/  d=$size /"
done
sleep 1.2    # one more ACE snapshot

echo
echo "== acectl list"
"$acectl" list
echo
echo "== acectl show $server (classes that were used)"
"$acectl" show "$server"
echo
echo "== acectl pin, then reset, of the 64-byte class"
"$acectl" pin "$server" 64B 128
"$acectl" show "$server" --json | python3 -c 'import json,sys; c=[k for k in json.load(sys.stdin)["classes"] if k["block_size"]==64][0]; print("  64B: count", c["count"], "pinned", c["pinned"])'
"$acectl" reset "$server" 64B

echo
echo "== redis-cli flushall, then acectl trim: what the data held goes back now"
redis-cli -p $port flushall >/dev/null
"$acectl" trim "$server"

redis-cli -p $port shutdown nosave >/dev/null 2>&1 || true
wait "$server" || true
server=
echo
echo "== hakmem's own report at exit (HAKMEM_STATS=1), last lines"
grep 'hakmem stats' "$log" | tail -6
