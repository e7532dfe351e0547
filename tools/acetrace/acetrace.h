/* acetrace: what the BPF side (acetrace.bpf.c) and the user side
 * (acetrace.c) share.  Kept free of kernel and libc headers beyond the
 * fixed-width types, so both compilers read it. */
#ifndef ACETRACE_H
#define ACETRACE_H

#define ACETRACE_MAX_CLASSES 128   /* a power of two; hakmem has 72 + page blocks */

enum acetrace_kind {
    ACETRACE_REFILL = 0,
    ACETRACE_FLUSH = 1,
    ACETRACE_REMOTE_COLLECT = 2,
    ACETRACE_EVENT_DROPPED = 3,
    ACETRACE_ACE_DECISION = 4,
    ACETRACE_PURGE = 5,
};

/* One probe hit, through the ring buffer (only when events are printed). */
struct acetrace_event {
    __u64 ts_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 x;            /* refill: heap id; purge: bytes */
    __u32 tid;
    __u32 kind;         /* enum acetrace_kind */
    __u32 cls;
    __u32 a, b, c;      /* refill: wanted, got; flush/remote_collect: blocks;
                         * ace_decision: old, new, reason */
};

/* Per-class totals kept by the BPF side (exact: no ring buffer involved). */
struct acetrace_class {
    __u64 refills, blocks_wanted, blocks_refilled;
    __u64 flushes, blocks_flushed;
    __u64 collects, blocks_collected;
    __u64 drops;
    __u64 decisions, changes;
    __u64 count;        /* the count of the last decision (0: none yet) */
};

#endif
