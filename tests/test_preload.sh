#!/usr/bin/env bash
# Integration: real programs under LD_PRELOAD=libhakmem.so give the same
# output as without it.  Every preloaded run proves hakmem was the allocator
# (HAKMEM_STATS=1 makes it print its report at exit, which only hakmem does).
set -uo pipefail
lib=$(realpath "$1")
early_init=$2
bad_free=$3
libc_names=$4
glibc_extras=$5
fork_join=$6
fork_stdio=$7
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

ok() { echo "ok: $1"; passed=$((passed + 1)); }
not_ok() { echo "FAIL: $1"; failed=$((failed + 1)); }

# same NAME CMD...: runs CMD plain and preloaded (with hak_env set in the
# preloaded run); stdout and status must match.
hak_env=()
same() {
    local name=$1
    shift
    "$@" >"$work/plain.out" 2>"$work/plain.err"
    local plain_rc=$?
    env "${hak_env[@]}" LD_PRELOAD="$lib" HAKMEM_STATS=1 "$@" >"$work/hak.out" 2>"$work/hak.err"
    local hak_rc=$?
    if ! grep -q 'hakmem stats: totals' "$work/hak.err"; then
        not_ok "$name: hakmem was not the allocator"
        tail -5 "$work/hak.err"
    elif [[ $plain_rc -ne $hak_rc ]]; then
        not_ok "$name: exit $hak_rc under hakmem, $plain_rc without"
        tail -5 "$work/hak.err"
    elif ! cmp -s "$work/plain.out" "$work/hak.out"; then
        not_ok "$name: output differs"
        diff "$work/plain.out" "$work/hak.out" | head -10
    elif [[ ! -s $work/plain.out ]]; then
        not_ok "$name: printed nothing"
    else
        ok "$name ($(wc -l <"$work/hak.out") lines)"
    fi
}

have() { command -v "$1" >/dev/null 2>&1; }

# --- programs that start early and fork -----------------------------------
same "early_init" "$early_init"
if grep -q 'allocator: hakmem' "$work/hak.err" && grep -q 'allocator: not hakmem' "$work/plain.err"; then
    ok "early_init: dlsym from a constructor sees hakmem"
else
    not_ok "early_init: allocator line"
fi

# --- an interposer that forwards to glibc's __libc_malloc ---------------------
same "libc_names" "$libc_names"
if grep -q 'libc names: hakmem' "$work/hak.err" && grep -q 'libc names: not hakmem' "$work/plain.err"; then
    ok "libc_names: __libc_malloc is hakmem's"
else
    not_ok "libc_names: $(grep 'libc names' "$work/hak.err")"
fi

# --- glibc's extras: mallinfo2, malloc_trim, mallopt, malloc_info -----------
same "glibc_extras" "$glibc_extras"
if grep -q ': NO' "$work/hak.out"; then
    not_ok "glibc_extras: $(grep ': NO' "$work/hak.out" | head -3 | tr '\n' ' ')"
fi

# --- python3 ---------------------------------------------------------------
py=$(command -v /usr/bin/python3 || command -v python3 || true)
if [[ -n $py ]]; then
    cat >"$work/t.py" <<'EOF'
import hashlib, json, re, threading, collections
d = {str(i): [i] * (i % 7) for i in range(200000)}
s = json.dumps(d)
print(len(s), hashlib.sha256(s.encode()).hexdigest())
words = re.findall(r"\d+", s)
print(len(words), collections.Counter(w[-1] for w in words).most_common(3))
out = []
def work(k):
    out.append(sum(len(str(x) * 3) for x in range(k, k + 100000)))
ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print(sorted(out))
b = bytearray()
for i in range(2000):
    b += bytes(i % 251 for _ in range(i))
print(len(b), hashlib.md5(b).hexdigest())
EOF
    same "python3" "$py" "$work/t.py"
    grep -q 'page_map=on' "$work/hak.err" && ok "python3: free's fast path had its page map" ||
        not_ok "python3: no page map"
    # Under a 3 GB address-space limit the page map's 16 GiB reservation
    # fails: every free takes the slow path, and the output is the same.
    same "python3 (no page map)" bash -c 'ulimit -v 3000000 && exec "$0" "$1"' "$py" "$work/t.py"
    grep -q 'page_map=off' "$work/hak.err" && ok "python3: ran without the page map" ||
        not_ok "python3 (no page map): the page map was there"
else
    echo "skip: python3 not installed"
fi

# --- git -------------------------------------------------------------------
if have git; then
    repo=$work/repo
    mkdir "$repo"
    (
        cd "$repo" && git init -q -b main . && git config user.email t@example.com &&
            git config user.name test
        for i in $(seq 1 40); do seq 1 $((i * 50)) >"f$i.txt"; done
    )
    export GIT_AUTHOR_DATE='2020-01-01T00:00:00Z' GIT_COMMITTER_DATE='2020-01-01T00:00:00Z'
    git -C "$repo" add . && git -C "$repo" commit -qm one
    sed -i 's/7/seven/' "$repo"/f*.txt
    same "git diff" git -C "$repo" diff --stat
    same "git log" git -C "$repo" log --stat
    LD_PRELOAD=$lib git -C "$repo" commit -qam two
    same "git show" git -C "$repo" show --format=%H HEAD
    same "git gc+fsck" sh -c "git -C '$repo' gc -q && git -C '$repo' fsck --full --no-progress && git -C '$repo' count-objects -v"
fi

# --- sqlite3 ---------------------------------------------------------------
if have sqlite3; then
    sql="create table t(a integer primary key, b text, c real);
with recursive n(i) as (select 1 union all select i+1 from n where i < 100000)
insert into t select i, printf('%08d', i*7919 % 100003), i*0.5 from n;
create index tb on t(b);
select count(*), sum(c), min(b), max(b) from t;
select b from t order by b desc limit 3;
select length(group_concat(b)) from t;"
    same "sqlite3" sqlite3 ":memory:" "$sql"
fi

# --- perl ------------------------------------------------------------------
if have perl; then
    same "perl" perl -e 'my %h; for my $i (1..200000) { $h{"k$i"} = "v" x ($i % 50) }
        my @k = sort { length($h{$a}) <=> length($h{$b}) or $a cmp $b } keys %h;
        print scalar(@k), " $k[0] $k[-1]\n"; my $s = join(",", @k); print length($s), "\n";'
fi

# --- gcc -------------------------------------------------------------------
if have gcc; then
    cat >"$work/prog.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
struct node { struct node *next; int v; };
int main(void) {
    struct node *head = NULL;
    for (int i = 0; i < 100000; i++) { struct node *n = malloc(sizeof *n); n->v = i; n->next = head; head = n; }
    long s = 0; while (head) { struct node *n = head; s += n->v; head = n->next; free(n); }
    printf("%ld\n", s);
    return 0;
}
EOF
    same "gcc" sh -c "gcc -O2 -Wall -Wextra -o '$work/prog' '$work/prog.c' && '$work/prog' && sha256sum < '$work/prog'"
fi

# --- sort ------------------------------------------------------------------
if have sort; then
    seq 1 300000 | awk '{ printf "%d %x\n", ($1 * 7919) % 100003, $1 }' >"$work/lines"
    same "sort" sh -c "sort -S 8M '$work/lines' | sha256sum; sort -n -k1,1 -u '$work/lines' | tail -3"
fi

# --- redis-server (links jemalloc; its malloc now resolves to hakmem) --------
if have redis-server && have redis-cli; then
    redis_run() {
        local port=$1
        shift
        "$@" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
            --daemonize no >"$work/redis.$port.log" 2>&1 &
        local pid=$!
        for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
        {
            redis-cli -p "$port" set k hello
            redis-cli -p "$port" get k
            for i in $(seq 1 200); do echo "RPUSH list item$i"; done | redis-cli -p "$port" >/dev/null
            redis-cli -p "$port" lrange list 0 4
            redis-cli -p "$port" debug populate 50000 key 100 >/dev/null
            redis-cli -p "$port" dbsize
            redis-cli -p "$port" memory doctor >/dev/null && echo doctor-ok
            redis-benchmark -p "$port" -q -n 20000 -t set,get,lpush,lpop -r 1000 >/dev/null && echo bench-ok
            redis-cli -p "$port" flushall
            redis-cli -p "$port" dbsize
        } >"$work/redis.$port.out" 2>&1
        redis-cli -p "$port" shutdown nosave >/dev/null 2>&1
        wait "$pid"
        echo $?
    }
    # redis_same NAME PORT REPORT ENV...: a preloaded run against the plain
    # one; its log must hold a report matching REPORT.
    redis_same() {
        local name=$1 port=$2 report=$3 rc
        shift 3
        rc=$(redis_run "$port" env LD_PRELOAD="$lib" HAKMEM_STATS=1 "$@")
        if ! grep -q "$report" "$work/redis.$port.log"; then
            not_ok "$name: no hakmem report matching '$report'"
        elif [[ $plain_rc != "$rc" ]] || ! cmp -s "$work/redis.16379.out" "$work/redis.$port.out"; then
            not_ok "$name: output or exit differs ($plain_rc vs $rc)"
            diff "$work/redis.16379.out" "$work/redis.$port.out" | head
        else
            ok "$name ($(wc -l <"$work/redis.$port.out") lines)"
        fi
    }
    plain_rc=$(redis_run 16379 env)
    redis_same "redis-server" 16380 'hakmem stats: totals'
    redis_same "redis-server (ACE)" 16381 'hakmem stats: totals.* ace=running' HAKMEM_ACE=1
else
    echo "skip: redis-server not installed"
fi

# --- with the ACE thread (HAKMEM_ACE=1 starts it when the library loads) ----
# same_ace NAME CMD...: as same, with HAKMEM_ACE=1; the report at exit must
# show the thread running.
same_ace() {
    hak_env=(HAKMEM_ACE=1)
    same "$1 (ACE)" "${@:2}"
    hak_env=()
    grep -q 'totals.* ace=running' "$work/hak.err" || not_ok "$1 (ACE): the ACE thread was not running"
}
[[ -n $py ]] && same_ace "python3" "$py" "$work/t.py"
if have git && [[ -n ${repo:-} ]]; then
    same_ace "git log" git -C "$repo" log --stat
fi
have sqlite3 && same_ace "sqlite3" sqlite3 ":memory:" "$sql"
if have gcc; then
    same_ace "gcc" sh -c "gcc -O2 -Wall -Wextra -o '$work/prog' '$work/prog.c' && '$work/prog' && sha256sum < '$work/prog'"
fi
have sort && same_ace "sort" sh -c "sort -S 8M '$work/lines' | sha256sum"

# A fork child's first slow path may start its ACE thread: never a free's,
# which glibc makes while holding a lock pthread_create needs.
same_ace "fork_join" "$fork_join"

# fork() while threads allocate holding a FILE's lock and fflush(NULL)
# holds the FILE list's: the allocator's fork handler must take that list
# lock before its own, as glibc's malloc takes its own after it.  Also a
# single-threaded process's fork (glibc leaves the list lock alone then).
# Without MALLOC_PERTURB_ (meson sets it): glibc's malloc then fills each
# 3 MiB block while holding stdout's lock, and the plain run crawls.
# "nested": another library's prepare handler forks inside ours.
for mode in threads single nested; do
    same "fork_stdio $mode" env -u MALLOC_PERTURB_ "$fork_stdio" "$mode"
    same_ace "fork_stdio $mode" env -u MALLOC_PERTURB_ "$fork_stdio" "$mode"
done
# "in_flush": a single-threaded process forks from inside fflush(NULL),
# which holds the list lock already.  Not with ACE: its thread makes the
# process multi-threaded, and glibc alone leaves such a child's list lock
# broken (its reset, then fflush's own release).
same "fork_stdio in_flush" env -u MALLOC_PERTURB_ "$fork_stdio" in_flush

# --- the report at exit goes to stderr, not a file on its copy's number ------
# HAKMEM_STATS=1 keeps a copy of stderr (fd 100 or above) for the report; a
# program that closes it and opens a file on that number (a daemon that
# closes every descriptor) must not find the report in its file.
LD_PRELOAD=$lib HAKMEM_STATS=1 bash -c 'exec 100>&- 100>"$1"; echo data >&100' _ "$work/fd100" \
    2>"$work/fd100.err"
if grep -q 'hakmem stats' "$work/fd100"; then
    not_ok "stats report: written into the program's file on fd 100"
elif ! grep -q 'hakmem stats: totals' "$work/fd100.err"; then
    not_ok "stats report: not on stderr"
else
    ok "stats report: on stderr, not in a file reusing its descriptor"
fi
# With at most 100 descriptors there is no copy above 100: stderr itself.
if (ulimit -n 64 && LD_PRELOAD=$lib HAKMEM_STATS=1 env true) 2>&1 | grep -q 'hakmem stats: totals'; then
    ok "stats report: on stderr under a limit of 64 descriptors"
else
    not_ok "stats report: lost under a limit of 64 descriptors"
fi

# --- bad frees die with a diagnostic ----------------------------------------
for mode in invalid double offset; do
    LD_PRELOAD=$lib "$bad_free" "$mode" >"$work/bad.out" 2>"$work/bad.err"
    rc=$?
    want="free(): invalid pointer"
    [[ $mode == double ]] && want="free(): double free detected"
    if [[ $rc -eq 134 ]] && grep -q "hakmem: $want 0x" "$work/bad.err" && ! grep -q survived "$work/bad.out"; then
        ok "bad_free $mode aborts: $(head -1 "$work/bad.err")"
    else
        not_ok "bad_free $mode: rc=$rc $(head -2 "$work/bad.err")"
    fi
done

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
