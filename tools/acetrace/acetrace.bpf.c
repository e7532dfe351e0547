/* acetrace's BPF side: one program per hakmem USDT probe (provider
 * "hakmem", src/trace/trace.h).  Each program adds to per-class totals in
 * global data, which user space reads every second, and, when events are
 * wanted, sends one record through a ring buffer.  Needs no kernel BTF:
 * no kernel type is read, arguments come from libbpf's USDT helpers. */
#include <stdbool.h>
#include <linux/types.h>
#include <linux/bpf.h>
#include <asm/ptrace.h>     /* struct pt_regs, user-space layout */
#include <bpf/bpf_helpers.h>
#include <bpf/usdt.bpf.h>

#include "acetrace.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile int emit_events = 0;   /* set by user space before load */

struct acetrace_class classes[ACETRACE_MAX_CLASSES];
__u64 purges, purged_bytes, lost;

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 4 << 20);
} events SEC(".maps");

static __always_inline void emit(__u32 kind, __u32 cls, __u32 a, __u32 b, __u32 c, __u64 x)
{
    if (!emit_events)
        return;
    struct acetrace_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e) {
        __sync_fetch_and_add(&lost, 1);
        return;
    }
    e->ts_ns = bpf_ktime_get_ns();
    e->tid = (__u32)bpf_get_current_pid_tgid();
    e->kind = kind;
    e->cls = cls;
    e->a = a;
    e->b = b;
    e->c = c;
    e->x = x;
    bpf_ringbuf_submit(e, 0);
}

/* The mask keeps the verifier sure of the bound whatever order the
 * compiler puts the comparison and the address computation in. */
static __always_inline struct acetrace_class *class_of(__u32 cls)
{
    if (cls >= ACETRACE_MAX_CLASSES)
        return 0;
    return &classes[cls & (ACETRACE_MAX_CLASSES - 1)];
}

SEC("usdt")
int BPF_USDT(on_refill, __u32 cls, __u32 want, __u32 got, __u64 heap)
{
    struct acetrace_class *c = class_of(cls);
    if (c) {
        __sync_fetch_and_add(&c->refills, 1);
        __sync_fetch_and_add(&c->blocks_wanted, want);
        __sync_fetch_and_add(&c->blocks_refilled, got);
    }
    emit(ACETRACE_REFILL, cls, want, got, 0, heap);
    return 0;
}

SEC("usdt")
int BPF_USDT(on_flush, __u32 cls, __u32 blocks)
{
    struct acetrace_class *c = class_of(cls);
    if (c) {
        __sync_fetch_and_add(&c->flushes, 1);
        __sync_fetch_and_add(&c->blocks_flushed, blocks);
    }
    emit(ACETRACE_FLUSH, cls, blocks, 0, 0, 0);
    return 0;
}

SEC("usdt")
int BPF_USDT(on_remote_collect, __u32 cls, __u32 blocks)
{
    struct acetrace_class *c = class_of(cls);
    if (c) {
        __sync_fetch_and_add(&c->collects, 1);
        __sync_fetch_and_add(&c->blocks_collected, blocks);
    }
    emit(ACETRACE_REMOTE_COLLECT, cls, blocks, 0, 0, 0);
    return 0;
}

SEC("usdt")
int BPF_USDT(on_event_dropped, __u32 cls)
{
    struct acetrace_class *c = class_of(cls);
    if (c)
        __sync_fetch_and_add(&c->drops, 1);
    emit(ACETRACE_EVENT_DROPPED, cls, 0, 0, 0, 0);
    return 0;
}

SEC("usdt")
int BPF_USDT(on_ace_decision, __u32 cls, __u32 old, __u32 new, __u32 reason)
{
    struct acetrace_class *c = class_of(cls);
    if (c) {
        __sync_fetch_and_add(&c->decisions, 1);
        if (new != old)
            __sync_fetch_and_add(&c->changes, 1);
        c->count = new;     /* one ACE thread decides: no race */
    }
    emit(ACETRACE_ACE_DECISION, cls, old, new, reason, 0);
    return 0;
}

SEC("usdt")
int BPF_USDT(on_purge, __u64 bytes)
{
    __sync_fetch_and_add(&purges, 1);
    __sync_fetch_and_add(&purged_bytes, bytes);
    emit(ACETRACE_PURGE, 0, 0, 0, 0, bytes);
    return 0;
}
