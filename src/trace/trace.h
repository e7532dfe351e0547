/* Trace box: USDT probes (provider "hakmem") on the cold paths.
 *
 * Each macro is one statically defined tracing point (<sys/sdt.h>): a
 * single `nop` plus an ELF note (.note.stapsdt) naming the probe and where
 * its arguments live, so a tracer (acetrace, bpftrace, perf, systemtap) can
 * attach to it in a running process.  Nothing is called and no argument is
 * computed beyond what the compiler already has in a register or memory.
 * Built in when the library is compiled with HM_TRACING (meson option
 * `tracing`, on when sys/sdt.h is found); otherwise every macro is empty.
 *
 * Never used on the malloc/free fast paths (src/hot).  Probes and their
 * arguments (docs/tracing.md):
 *   refill(class, wanted, got, heap)      end of a refill, batch carved;
 *                                         class 72: a page block handed out
 *   flush(class, blocks)                  blocks a bin gave back to spans
 *   remote_collect(class, blocks)         remote frees taken back by the owner
 *   event_dropped(class)                  the ACE ring was full
 *   ace_decision(class, old, new, reason) the rule ran for a class
 *   purge(bytes)                          free pages or cached large blocks
 *                                         went back to the OS */
#ifndef HM_TRACE_H
#define HM_TRACE_H

/* Reason codes of ace_decision. */
#define HM_TRACE_REASON_KEEP   0   /* new == old */
#define HM_TRACE_REASON_GROW   1   /* frequent refills: doubled */
#define HM_TRACE_REASON_SHRINK 2   /* rare refills, heavy overflow */
#define HM_TRACE_REASON_DECAY  3   /* idle window: back toward the default */

#ifdef HM_TRACING
#include <sys/sdt.h>

#define HM_TRACE_REFILL(cls, want, got, heap) \
    DTRACE_PROBE4(hakmem, refill, (unsigned)(cls), (unsigned)(want), (unsigned)(got), \
                  (unsigned long)(heap))
#define HM_TRACE_FLUSH(cls, blocks) \
    DTRACE_PROBE2(hakmem, flush, (unsigned)(cls), (unsigned)(blocks))
#define HM_TRACE_REMOTE_COLLECT(cls, blocks) \
    DTRACE_PROBE2(hakmem, remote_collect, (unsigned)(cls), (unsigned)(blocks))
#define HM_TRACE_EVENT_DROPPED(cls) \
    DTRACE_PROBE1(hakmem, event_dropped, (unsigned)(cls))
#define HM_TRACE_ACE_DECISION(cls, old, new, reason) \
    DTRACE_PROBE4(hakmem, ace_decision, (unsigned)(cls), (unsigned)(old), (unsigned)(new), \
                  (unsigned)(reason))
#define HM_TRACE_PURGE(bytes) \
    DTRACE_PROBE1(hakmem, purge, (unsigned long)(bytes))

#else

#define HM_TRACE_REFILL(cls, want, got, heap) ((void)0)
#define HM_TRACE_FLUSH(cls, blocks) ((void)0)
#define HM_TRACE_REMOTE_COLLECT(cls, blocks) ((void)0)
#define HM_TRACE_EVENT_DROPPED(cls) ((void)0)
#define HM_TRACE_ACE_DECISION(cls, old, new, reason) ((void)0)
#define HM_TRACE_PURGE(bytes) ((void)0)

#endif

/* The reason code of a decision from the rule's input and output: a grown
 * count is "grow"; a smaller one is "decay" after an idle window (no
 * refills), "shrink" otherwise. */
#define HM_TRACE_REASON(old, new, refills) \
    ((new) > (old) ? HM_TRACE_REASON_GROW : (new) == (old) ? HM_TRACE_REASON_KEEP \
     : (refills) ? HM_TRACE_REASON_SHRINK : HM_TRACE_REASON_DECAY)

#endif
