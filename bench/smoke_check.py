#!/usr/bin/env python3
"""Runs one benchmark and checks its output contract (used by meson test).

    smoke_check.py [--expect ALLOC] [--preload LIB] [--expect-fail] -- PROGRAM ARGS...

Passes when the program exits 0 and prints exactly one stdout line, a
RESULT line of key=value pairs with the required keys and a known
allocator (equal to ALLOC if given).  With --expect-fail it passes only
when the program exits with status 1 and reports "FAIL bench=" on stderr,
as it must when the allocator hands out overlapping memory.  --preload
sets LD_PRELOAD for the program only, not for this script.
"""
import argparse
import os
import subprocess
import sys

REQUIRED = ["bench", "allocator", "threads", "ops", "seconds", "ops_per_sec",
            "peak_rss_kb", "final_rss_kb"]
NUMERIC = REQUIRED[2:]
ALLOCATORS = {"glibc", "jemalloc", "tcmalloc", "mimalloc", "hakmem"}


def parse_result(line):
    """Returns the key=value pairs of a RESULT line, or raises ValueError."""
    words = line.split()
    if not words or words[0] != "RESULT":
        raise ValueError("not a RESULT line: %r" % line)
    fields = {}
    for w in words[1:]:
        key, sep, value = w.partition("=")
        if not sep or not key:
            raise ValueError("not key=value: %r" % w)
        fields[key] = value
    for key in REQUIRED:
        if key not in fields:
            raise ValueError("missing key %s" % key)
    for key in NUMERIC:
        float(fields[key])
    return fields


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect", help="allocator the RESULT line must name")
    ap.add_argument("--preload", help="LD_PRELOAD for the program")
    ap.add_argument("--expect-fail", action="store_true")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if args.preload:
        env["LD_PRELOAD"] = args.preload
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    sys.stderr.write(p.stderr)
    sys.stdout.write(p.stdout)
    if args.expect_fail:
        if p.returncode != 1 or "FAIL bench=" not in p.stderr:
            sys.exit("expected exit status 1 and a FAIL message, got status %d" % p.returncode)
        print("ok: failure detected as expected")
        return
    if p.returncode != 0:
        sys.exit("exit status %d" % p.returncode)
    lines = p.stdout.splitlines()
    if len(lines) != 1:
        sys.exit("expected exactly one stdout line, got %d" % len(lines))
    try:
        fields = parse_result(lines[0])
    except ValueError as e:
        sys.exit("bad RESULT line: %s" % e)
    if fields["allocator"] not in ALLOCATORS:
        sys.exit("unknown allocator %s" % fields["allocator"])
    if args.expect and fields["allocator"] != args.expect:
        sys.exit("allocator=%s, expected %s" % (fields["allocator"], args.expect))


if __name__ == "__main__":
    main()
