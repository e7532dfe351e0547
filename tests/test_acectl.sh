#!/usr/bin/env bash
# Integration: acectl against live processes under LD_PRELOAD=libhakmem.so
# HAKMEM_ACE=1, and against bad input (docs/acectl.md).
#   test_acectl.sh ACECTL WORKLOAD LIBHAKMEM
# Prints one line per check and "N passed, M failed"; exits 1 on a failure.
set -uo pipefail
acectl=${1:-}
workload=${2:-}
lib=${3:-}
if [[ ! -x $acectl || ! -x $workload || ! -f $lib ]]; then
    echo "skip: acectl, the workload or libhakmem.so is missing"
    echo "0 passed, 0 failed"
    exit 0
fi
if [[ ! -d /dev/shm || ! -w /dev/shm ]]; then
    echo "skip: /dev/shm is not writable"
    echo "0 passed, 0 failed"
    exit 0
fi
lib=$(realpath "$lib")
work=$(mktemp -d)
shm=/dev/shm
passed=0
failed=0
pids=()
fakes=()

cleanup() {
    for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null; kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    for f in "${fakes[@]}"; do rm -f "$f"; done
    rm -rf "$work"
}
trap cleanup EXIT

ok() { echo "ok: $1"; passed=$((passed + 1)); }
not_ok() { echo "FAIL: $1"; failed=$((failed + 1)); }

# expect_rc NAME RC CMD...: CMD must exit with RC (its output is kept in
# $work/out and $work/err, and shown on a failure).
expect_rc() {
    local name=$1 want=$2
    shift 2
    "$@" >"$work/out" 2>"$work/err"
    local rc=$?
    if [[ $rc -eq $want ]]; then
        ok "$name (exit $rc)"
    else
        not_ok "$name: exit $rc, expected $want"
        head -5 "$work/out" "$work/err"
    fi
}

# check NAME CONDITION...: a test(1)-style condition.
check() {
    local name=$1
    shift
    if [ "$@" ]; then ok "$name"; else not_ok "$name ($*)"; fi
}

# wait_for SECONDS CMD...: polls CMD every 50 ms; false if it never succeeds.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS > deadline)) && return 1
        sleep 0.05
    done
}

# ---- JSON, without jq: acectl prints one class per line ------------------
snap() { "$acectl" show --json "$1" >"$work/snap.json" 2>"$work/snap.err"; }
# top KEY: a top-level value of the last snapshot.
top() { sed -n "s/.*\"$1\": \([^,}]*\).*/\1/p" "$work/snap.json" | head -1; }
# cls SIZE KEY: a field of the class with that block size.
cls() { grep "\"block_size\": $1," "$work/snap.json" | sed -n "s/.*\"$2\": \([^,}]*\).*/\1/p"; }
# counts: every class's count, one line.
counts() { sed -n 's/.*"count": \([0-9]*\).*/\1/p' "$work/snap.json" | tr '\n' ' '; }
defaults() { sed -n 's/.*"default": \([0-9]*\).*/\1/p' "$work/snap.json" | tr '\n' ' '; }
valid_json() {
    if command -v python3 >/dev/null; then python3 -m json.tool "$1" >/dev/null
    elif command -v jq >/dev/null; then jq . "$1" >/dev/null
    else return 0
    fi
}

hot=64
hot_moved() { snap "$1" && [[ $(cls $hot count) != "$(cls $hot default)" ]]; }
hot_at_default() { snap "$1" && [[ $(cls $hot count) == "$(cls $hot default)" ]]; }
region_of() { [[ -f $shm/hakmem.$1 ]]; }
no_region_of() { [[ ! -e $shm/hakmem.$1 ]]; }

start_workload() {
    LD_PRELOAD=$lib HAKMEM_ACE=1 "$workload" "$@" >"$work/wl.out" 2>"$work/wl.err" &
    wl=$!
    pids+=("$wl")
}

# A pid that names no process (and no region): a child that has exited.
dead_pid() {
    local p
    while :; do
        true & p=$!
        wait "$p"
        if ! kill -0 "$p" 2>/dev/null && [[ ! -e $shm/hakmem.$p ]]; then
            echo "$p"
            return
        fi
    done
}

# le32 N: N as 4 little-endian bytes, for printf.
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
# poke FILE OFFSET BYTES: overwrite bytes (printf escapes) in place.
poke() { printf "$3" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none; }

# ---- usage ----------------------------------------------------------------
expect_rc "--help" 0 "$acectl" --help
check "--help documents the exit codes" "$(grep -c 'EXIT STATUS' "$work/out")" -eq 1
expect_rc "no command" 1 "$acectl"
expect_rc "unknown command" 1 "$acectl" frobnicate 1
expect_rc "show without PID" 1 "$acectl" show
expect_rc "show with a bad PID" 1 "$acectl" show 12x
expect_rc "show with PID 0" 1 "$acectl" show 0
expect_rc "show with two PIDs" 1 "$acectl" show 1 2
expect_rc "unknown option" 1 "$acectl" show --frob 1
expect_rc "pin without COUNT" 1 "$acectl" pin 1 3
expect_rc "pin with a bad COUNT" 1 "$acectl" pin 1 3 many
expect_rc "pin with a huge COUNT" 1 "$acectl" pin 1 3 99999999999
expect_rc "freeze with a CLASS" 1 "$acectl" freeze 1 3
expect_rc "trim with a CLASS" 1 "$acectl" trim 1 3
expect_rc "watch --interval 0" 1 "$acectl" watch 1 --interval 0
expect_rc "watch --count x" 1 "$acectl" watch 1 --count x

# ---- processes without a region -------------------------------------------
gone=$(dead_pid)
expect_rc "no such process" 2 "$acectl" show "$gone"
expect_rc "no such process (pin)" 2 "$acectl" pin "$gone" 3 8
sleep 5 &
sleeper=$!
pids+=("$sleeper")
expect_rc "a process without hakmem" 3 "$acectl" show "$sleeper"
expect_rc "a process without hakmem (freeze)" 3 "$acectl" freeze "$sleeper"
LD_PRELOAD=$lib HAKMEM_ACE=0 "$workload" --seconds 30 >/dev/null 2>&1 &
ace_off=$!
pids+=("$ace_off")
sleep 1
expect_rc "a hakmem process with ACE off" 3 "$acectl" show "$ace_off"
kill "$ace_off"

# ---- a live workload ------------------------------------------------------
start_workload --seconds 60 --threads 2 --size $hot
if wait_for 10 region_of "$wl"; then
    ok "the workload's region appears"
else
    not_ok "the workload's region appears"
fi
ls -ln "$shm/hakmem.$wl" >"$work/ls" 2>/dev/null
check "region mode is 0600" "$(cut -c1-10 "$work/ls")" == "-rw-------"
check "region owned by us" "$(awk '{print $3}' "$work/ls")" == "$(id -u)"

expect_rc "show --json" 0 snap "$wl"
check "show --json is valid JSON" "$(valid_json "$work/snap.json" && echo yes)" == yes
check "json pid" "$(top pid)" == "$wl"
check "json version" "$(top version)" == 1
check "json frozen" "$(top frozen)" == false
check "json has every class" "$(grep -c '"block_size"' "$work/snap.json")" -ge 32
for key in count default min max refills events drops cached pinned; do
    check "json class field $key" -n "$(cls $hot $key)"
done
check "json process bytes_mapped" "$(top bytes_mapped)" -gt 0
if wait_for 10 hot_moved "$wl"; then
    ok "learning moved the ${hot} B class from its default ($(cls $hot default) -> $(cls $hot count))"
else
    not_ok "learning moved the ${hot} B class: still $(cls $hot count)"
fi
check "refills counted" "$(cls $hot refills)" -gt 0
check "events counted" "$(cls $hot events)" -gt 0
hot_class=$(cls $hot class)
hot_def=$(cls $hot default)
hot_max=$(cls $hot max)

expect_rc "show (table)" 0 "$acectl" show "$wl"
check "the table has the hot class" "$(awk -v c="$hot_class" '$1 == c && $2 == '$hot "$work/out" | wc -l)" -eq 1
check "the table has totals" "$(grep -c '^totals:' "$work/out")" -eq 1
expect_rc "list" 0 "$acectl" list
check "list shows the workload" "$(awk -v p="$wl" '$1 == p' "$work/out" | wc -l)" -eq 1
expect_rc "list --json" 0 "$acectl" list --json
check "list --json is valid JSON" "$(valid_json "$work/out" && echo yes)" == yes
expect_rc "watch --count 2" 0 "$acectl" watch "$wl" --interval 0.2 --count 2
check "watch printed 2 samples" "$(grep -c 'count(chg)' "$work/out")" -eq 2

# pin: far below where learning takes a hot class; it must stay there.
pin_to=$((hot_def / 4))
expect_rc "pin ${hot}B $pin_to" 0 "$acectl" pin "$wl" ${hot}B $pin_to
snap "$wl"
check "pin shows the count" "$(cls $hot count)" == $pin_to
check "pin shows pinned" "$(cls $hot pinned)" == true
sleep 0.5
snap "$wl"
check "learning leaves the pinned class alone (0.5 s later)" "$(cls $hot count)" == $pin_to
refused=$(top requests_refused)

# out of bounds: refused, counted, and nothing changes.
expect_rc "pin above max" 6 "$acectl" pin "$wl" "$hot_class" $((hot_max + 1))
expect_rc "pin to 0" 6 "$acectl" pin "$wl" "$hot_class" 0
expect_rc "pin a class that does not exist" 6 "$acectl" pin "$wl" 9999 4
expect_rc "reset a class that does not exist" 6 "$acectl" reset "$wl" 9999
expect_rc "pin a size no class holds" 1 "$acectl" pin "$wl" 99999999B 4
snap "$wl"
check "refused requests counted" "$(top requests_refused)" == $((refused + 4))
check "refused requests changed nothing" "$(cls $hot count) $(cls $hot pinned)" == "$pin_to true"

# reset: back to the default, unpinned; learning then moves it again.
expect_rc "reset the class" 0 "$acectl" reset "$wl" "$hot_class"
snap "$wl"
check "reset restores the default" "$(cls $hot count)" == "$hot_def"
check "reset unpins" "$(cls $hot pinned)" == false
if wait_for 10 hot_moved "$wl"; then ok "learning resumes after reset"; else not_ok "learning resumes after reset"; fi

# freeze: nothing changes, even a class reset to its default while frozen.
expect_rc "freeze" 0 "$acectl" freeze "$wl"
snap "$wl"
check "frozen shows" "$(top frozen)" == true
a=$(counts)
sleep 0.4
snap "$wl"
check "no count changes while frozen (0.4 s)" "$(counts)" == "$a"
expect_rc "reset all while frozen" 0 "$acectl" reset "$wl"
snap "$wl"
check "reset all restores every default" "$(counts)" == "$(defaults)"
sleep 0.4
snap "$wl"
check "still defaults 0.4 s later (frozen)" "$(counts)" == "$(defaults)"
check "events still drained while frozen" "$(cls $hot events)" -gt 0
expect_rc "unfreeze" 0 "$acectl" unfreeze "$wl"
snap "$wl"
check "unfrozen shows" "$(top frozen)" == false
if wait_for 10 hot_moved "$wl"; then ok "learning resumes after unfreeze"; else not_ok "learning resumes after unfreeze"; fi

# a stopped process cannot answer: timeout, and the request is withdrawn.
kill -STOP "$wl"
# The stop reaches each thread on its own: the ACE thread could still answer
# for a moment.  Wait until every thread shows stopped (T).
for _ in $(seq 200); do
    awk '/^State:/ && $2 != "T" { running = 1 } END { exit running }' /proc/"$wl"/task/*/status && break
    sleep 0.01
done
expect_rc "freeze a stopped process times out" 7 "$acectl" freeze "$wl"
# Interrupted while it waits (Ctrl-C, a timeout's signal): withdrawn too.
timeout -s INT 0.5 "$acectl" freeze "$wl" >/dev/null 2>&1
check "an interrupted request ends acectl by its signal" $? -eq 124
kill -CONT "$wl"
sleep 0.3
snap "$wl"
check "the withdrawn requests were never applied" "$(top frozen)" == false
expect_rc "requests work again after the timeout" 0 "$acectl" pin "$wl" "$hot_class" 2
expect_rc "reset" 0 "$acectl" reset "$wl" all

# trim: 64 MiB of 100 B blocks, one in 100 left live, pin every span they
# are in; with a purge delay of 10 minutes nothing decays meanwhile, and
# only a trim gives their free pages back (about 45 MiB).
rss_kb() { awk '/^VmRSS:/ { print $2 }' /proc/"$1"/status; }
LD_PRELOAD=$lib HAKMEM_ACE=1 HAKMEM_PURGE_DELAY_MS=600000 "$workload" --pinned 64 \
    --threads 1 --seconds 30 >"$work/tw.out" 2>"$work/tw.err" &
tw=$!
pids+=("$tw")
pinned_done() { grep -q '^pinned' "$work/tw.out"; }
if wait_for 20 pinned_done && wait_for 10 region_of "$tw"; then
    before=$(rss_kb "$tw")
    expect_rc "trim" 0 "$acectl" trim "$tw"
    after=$(rss_kb "$tw")
    echo "trim: resident $before -> $after KiB; acectl said: $(cat "$work/out")"
    check "trim gives back the free pages of pinned spans" $((before - after)) -gt 30000
    check "trim reports what the process holds" "$(grep -c 'trimmed, resident' "$work/out")" -eq 1
    snap "$tw"
    check "trim counted as applied" "$(top requests_applied)" -ge 1
else
    not_ok "the trim workload's region appears"
fi
kill -TERM "$tw" 2>/dev/null
wait "$tw" 2>/dev/null

# another user: acectl run as nobody must not read or steer our region.
if [[ $(id -u) -ne 0 ]]; then
    echo "skip: permission checks need root (to run acectl as nobody)"
elif ! id nobody >/dev/null 2>&1 || ! command -v setpriv >/dev/null; then
    echo "skip: permission checks need the nobody user and setpriv"
else
    pub=$(mktemp -d)
    chmod 755 "$pub"
    cp "$acectl" "$pub/acectl"
    chmod 755 "$pub/acectl"
    as_nobody() { setpriv --reuid="$(id -u nobody)" --regid="$(id -g nobody)" --clear-groups "$@"; }
    expect_rc "show as another user" 4 as_nobody "$pub/acectl" show "$wl"
    expect_rc "freeze as another user" 4 as_nobody "$pub/acectl" freeze "$wl"
    expect_rc "list as another user" 0 as_nobody "$pub/acectl" list
    check "another user's list does not show it" "$(awk -v p="$wl" '$1 == p' "$work/out" | wc -l)" -eq 0
    check "nor removes it" -f "$shm/hakmem.$wl"
    snap "$wl"
    check "the process is unaffected" "$(top frozen)" == false
    rm -rf "$pub"
fi

# bad region files, named for a pid that is gone (the file is judged first).
cp "$shm/hakmem.$wl" "$work/good"
fake=$(dead_pid)
f=$shm/hakmem.$fake
fakes+=("$f")
(umask 077; head -c 4096 /dev/urandom >"$f")
expect_rc "garbage region" 5 "$acectl" show "$fake"
(umask 077; head -c 100 "$work/good" >"$f")
expect_rc "truncated region (short header)" 5 "$acectl" show "$fake"
(umask 077; head -c 1000 "$work/good" >"$f")
poke "$f" 32 "$(le32 "$fake")"
expect_rc "truncated region (classes cut)" 5 "$acectl" show "$fake"
(umask 077; : >"$f")
expect_rc "empty region" 5 "$acectl" show "$fake"
(umask 077; cp "$work/good" "$f")
poke "$f" 8 '\x63'
expect_rc "another layout version" 5 "$acectl" show "$fake"
(umask 077; cp "$work/good" "$f")
expect_rc "a region naming another pid" 5 "$acectl" show "$fake"
poke "$f" 32 "$(le32 "$fake")"
expect_rc "a valid region of a dead process" 2 "$acectl" show "$fake"
chmod 644 "$f"
expect_rc "a region others can read" 4 "$acectl" show "$fake"
rm -f "$f"
ln -s "$shm/hakmem.$wl" "$f"
expect_rc "a symlinked region" 4 "$acectl" show "$fake"
rm -f "$f"
mkfifo -m 600 "$f"
expect_rc "a FIFO at the region's name" 4 "$acectl" show "$fake"
rm -f "$f"
(umask 077; head -c 4096 /dev/urandom >"$f")
"$acectl" list >/dev/null 2>"$work/err"
check "list removes a stale region of a dead process" ! -e "$f"
check "list says so" "$(grep -c "removed $f" "$work/err")" -eq 1
check "list keeps the live one" -f "$shm/hakmem.$wl"

# exit: the region goes with the process.
kill -TERM "$wl"
wait "$wl"
check "the workload exited normally" $? -eq 0
check "its region is removed at exit" ! -e "$shm/hakmem.$wl"
expect_rc "show after exit" 2 "$acectl" show "$wl"

# A process that learns nothing (no refill report) has no region, though
# its ACE thread runs from load: a shell that waits and then execs another
# program (exec runs no destructor) leaves no file behind.
LD_PRELOAD=$lib HAKMEM_ACE=1 bash -c 'echo $$; sleep 1.2; exec true' >"$work/sh.out" 2>&1
sh_pid=$(head -1 "$work/sh.out")
check "a shell that execs after 1.2 s leaves no region" ! -e "$shm/hakmem.$sh_pid"
rm -f "$shm/hakmem.$sh_pid"

# fork: the child gets its own region and does not remove the parent's.
start_workload --seconds 60 --fork --child-seconds 3
parent=$wl
wait_for 5 grep -q '^child ' "$work/wl.out"
child=$(awk '/^child /{print $2}' "$work/wl.out")
if [[ -n $child ]] && wait_for 10 region_of "$child"; then
    ok "the fork child has its own region"
else
    not_ok "the fork child has its own region"
fi
wait_for 10 region_of "$parent"
if [[ -n $child ]]; then
    expect_rc "show the child" 0 snap "$child"
    check "the child's region names the child" "$(top pid)" == "$child"
    expect_rc "freeze the child" 0 "$acectl" freeze "$child"
    snap "$parent"
    check "the parent is not frozen" "$(top frozen)" == false
    if wait_for 10 no_region_of "$child"; then
        ok "the child's region is removed when it exits"
    else
        not_ok "the child's region is removed when it exits"
    fi
fi
check "the parent's region survives the child" -f "$shm/hakmem.$parent"
expect_rc "show the parent" 0 snap "$parent"
check "the parent's region names the parent" "$(top pid)" == "$parent"
kill -TERM "$parent"
wait "$parent"
check "the parent's region is removed at exit" ! -e "$shm/hakmem.$parent"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
