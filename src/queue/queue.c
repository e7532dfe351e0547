/* Queue box: a bounded lock-free MPSC ring (see queue.h).
 *
 * The ring is Vyukov's bounded queue with one sequence number per slot:
 *
 *   init      slot[i].seq = i                    (slot i is free for ticket i)
 *   producer  pos = tail; if slot[pos].seq == pos, CAS tail pos -> pos+1;
 *             the winner owns the slot: it writes the event, then stores
 *             seq = pos+1 (release: the event is visible before the seq)
 *             if slot[pos].seq < pos the slot still holds the event of the
 *             previous lap: the ring is full, the event is dropped
 *   consumer  if slot[head].seq == head+1 the event is there: copy it out,
 *             then store seq = head+CAPACITY (release: the copy is done
 *             before a producer of the next lap may overwrite the slot)
 *
 * A push is one CAS on the tail plus one store and one add; it never waits
 * for another thread, never allocates and never makes a syscall.  A full
 * ring (or a slot whose previous-lap producer or the consumer has not
 * finished with it) drops the event and counts it in q->dropped
 * (Contract A).  The ring is the fixed array inside struct hm_queue, which
 * its owner declares statically (Contract C).
 *
 * A slot stores its seq less its index (slot_seq / slot_set_seq), so that
 * the initial state is all zeros: a ring in zero-initialised static memory
 * needs no init pass, and its pages become resident only as events reach
 * them (an init pass made every process with ACE on pay for the whole
 * ring at start).
 *
 * Atomics come from liburcu's headers only (<urcu/uatomic.h>, <urcu/arch.h>):
 * they are inline functions and macros, so the library does not link
 * liburcu.so.  On x86-64 liburcu 0.13 implements them with inline asm
 * (lock cmpxchg, lock add) and volatile accesses, which ThreadSanitizer
 * cannot see: under TSan every handoff of an event through the ring would be
 * reported as a data race.  liburcu 0.13 has no switch to map uatomic onto
 * the compiler's __atomic builtins (CONFIG_RCU_USE_ATOMIC_BUILTINS and
 * <urcu/uatomic/builtins.h> appeared in 0.14), so when the file is built
 * with -fsanitize=thread it uses the __atomic builtins directly, with the
 * same protocol: acquire loads and release stores stand for the
 * cmm_smp_rmb/wmb/mb barriers of the liburcu build. */
#include "queue.h"

#if defined(__SANITIZE_THREAD__)
#define HQ_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define HQ_TSAN 1
#endif
#endif

#define HQ_MASK ((unsigned long)HM_QUEUE_CAPACITY - 1)

_Static_assert((HM_QUEUE_CAPACITY & (HM_QUEUE_CAPACITY - 1)) == 0,
               "HM_QUEUE_CAPACITY must be a power of two");

#ifdef HQ_TSAN

#define hq_read(p)      __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define hq_set(p, v)    __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define hq_add(p, v)    ((void)__atomic_fetch_add((p), (v), __ATOMIC_RELAXED))
#define hq_rmb()        ((void)0)   /* hq_read is an acquire load */
#define hq_wmb()        ((void)0)   /* hq_set is a release store */
#define hq_mb()         ((void)0)   /* release orders earlier loads too */

static inline unsigned long hq_cmpxchg(unsigned long *p, unsigned long old,
                                       unsigned long new_)
{
    __atomic_compare_exchange_n(p, &old, new_, false, __ATOMIC_SEQ_CST,
                                __ATOMIC_RELAXED);
    return old;
}

#else

#include <urcu/arch.h>
#include <urcu/uatomic.h>

#define hq_read(p)              uatomic_read(p)
#define hq_set(p, v)            uatomic_set((p), (v))
#define hq_add(p, v)            uatomic_add((p), (v))
#define hq_cmpxchg(p, old, new_) uatomic_cmpxchg((p), (old), (new_))
#define hq_rmb()                cmm_smp_rmb()
#define hq_wmb()                cmm_smp_wmb()
#define hq_mb()                 cmm_smp_mb()

#endif

static inline unsigned long slot_seq(struct hm_queue_slot *slot, unsigned long index)
{
    return hq_read(&slot->seq) + index;
}

static inline void slot_set_seq(struct hm_queue_slot *slot, unsigned long index,
                                unsigned long seq)
{
    hq_set(&slot->seq, seq - index);
}

void hm_queue_init(struct hm_queue *q)
{
    /* Every slot free for its first ticket: all zeros.  Only slots a lap
     * moved are written; a fresh ring is read (the zero page), not touched. */
    for (unsigned long i = 0; i < HM_QUEUE_CAPACITY; i++)
        if (hq_read(&q->slots[i].seq) != 0)
            hq_set(&q->slots[i].seq, 0UL);
    hq_set(&q->head, 0UL);
    hq_set(&q->pushed, 0UL);
    hq_set(&q->dropped, 0UL);
    /* The tail last: a producer of another thread (there is none at init or
     * in a fork child, but be safe) sees the slots free before ticket 0. */
    hq_wmb();
    hq_set(&q->tail, 0UL);
    hq_mb();
}

bool hm_queue_push(struct hm_queue *q, const struct hm_event *ev)
{
    unsigned long pos = hq_read(&q->tail);
    struct hm_queue_slot *slot;

    for (;;) {
        slot = &q->slots[pos & HQ_MASK];
        unsigned long seq = slot_seq(slot, pos & HQ_MASK);
        long diff = (long)(seq - pos);

        if (diff == 0) {
            /* Free for this ticket: claim it.  uatomic_cmpxchg is a full
             * barrier, so the event write below cannot move above the seq
             * read that saw the slot free. */
            unsigned long seen = hq_cmpxchg(&q->tail, pos, pos + 1);
            if (seen == pos)
                break;
            pos = seen;             /* another producer took it: retry */
        } else if (diff < 0) {
            /* The slot still holds the event of the previous lap: full. */
            hq_add(&q->dropped, 1UL);
            return false;
        } else {
            /* Another producer claimed pos and already published; the tail
             * moved on. */
            pos = hq_read(&q->tail);
        }
    }

    slot->ev = *ev;
    hq_wmb();                       /* event before seq */
    slot_set_seq(slot, pos & HQ_MASK, pos + 1);
    hq_add(&q->pushed, 1UL);
    return true;
}

size_t hm_queue_drain(struct hm_queue *q, struct hm_event *out, size_t max)
{
    unsigned long head = hq_read(&q->head);
    size_t n = 0;

    while (n < max) {
        struct hm_queue_slot *slot = &q->slots[(head + n) & HQ_MASK];
        if (slot_seq(slot, (head + n) & HQ_MASK) != head + n + 1)
            break;                  /* empty, or its producer is mid-write */
        hq_rmb();                   /* seq before event */
        out[n] = slot->ev;
        n++;
    }
    if (n == 0)
        return 0;

    /* All copies done before any slot is handed to the next lap: one full
     * barrier for the batch (load -> store ordering). */
    hq_mb();
    for (size_t i = 0; i < n; i++)
        slot_set_seq(&q->slots[(head + i) & HQ_MASK], (head + i) & HQ_MASK,
                     head + i + HM_QUEUE_CAPACITY);
    hq_set(&q->head, head + n);
    return n;
}

uint64_t hm_queue_pushed(const struct hm_queue *q)
{
    return hq_read(&q->pushed);
}

uint64_t hm_queue_dropped(const struct hm_queue *q)
{
    return hq_read(&q->dropped);
}
