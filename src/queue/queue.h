/* Queue box: a bounded lock-free MPSC ring of refill events.
 *
 * Producers are the refill paths of any thread; the one consumer is the ACE
 * thread.  The ring is a fixed array inside struct hm_queue, which its owner
 * declares statically (Contract C: nothing is malloc'd at run time).  A push
 * never blocks, never allocates and never makes a syscall: when the ring is
 * full the event is dropped and counted (Contract A). */
#ifndef HM_QUEUE_H
#define HM_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Slots; a power of two.  Every slot a lap reaches stays resident, 40
 * bytes each: 1024 is 40 KiB (4096 held 160 KiB in every process with
 * ACE on).  The busiest benchmark pushes about 19k events a second and the
 * ACE thread drains every 10 ms while busy, so the ring holds some 50 ms
 * of them; none dropped at 8 threads on 2 cores.  After an idle spell the
 * thread sleeps up to half the purge delay (500 ms by default), and a
 * burst then drops most of its first events (82% in a 0.3 s burst after
 * 3 s idle; 78% with 4096 slots): learning lags that long.  A drop only
 * thins the sample. */
#define HM_QUEUE_CAPACITY 1024u

/* What a thread's refills of one class report: one event stands for a
 * batch of up to HM_EVENT_BATCH consecutive refills, so that a class that
 * refills every few allocations does not pay a push each time.  Its block
 * counts cover every refill since the thread's previous event of the
 * class, the unreported ones too (slow start, draining, cut batches). */
#define HM_EVENT_BATCH 8u

struct hm_event {
    uint32_t size_class;
    uint32_t refill_count;      /* blocks each refill was asked to carve (for traces) */
    uint64_t interval_ns;       /* from the batch's first refill to its last */
    uint32_t refills;           /* refills in the batch (1 if not set) */
    uint32_t blocks;            /* blocks the refills put in the bin since the last event */
    uint32_t blocks_flushed;    /* blocks the bin sent back (overflow) meanwhile */
    uint32_t remote_collected;  /* blocks of other threads' frees collected meanwhile */
};

struct hm_queue_slot {
    unsigned long seq;          /* liburcu uatomic: ticket that owns the slot, less
                                 * the slot's index (all zeros: every slot free) */
    struct hm_event ev;
};

struct hm_queue {
    unsigned long tail __attribute__((aligned(64)));   /* producers' ticket */
    unsigned long head __attribute__((aligned(64)));   /* consumer's ticket */
    unsigned long pushed __attribute__((aligned(64)));
    unsigned long dropped;
    struct hm_queue_slot slots[HM_QUEUE_CAPACITY] __attribute__((aligned(64)));
};

/* Sets every slot free; also used in a fork child, whose parent may have
 * been mid-push in a thread the child does not have. */
void hm_queue_init(struct hm_queue *q);

/* Returns false (and counts a drop) when the ring is full. */
bool hm_queue_push(struct hm_queue *q, const struct hm_event *ev);

/* Single consumer: moves up to max events into out; returns how many. */
size_t hm_queue_drain(struct hm_queue *q, struct hm_event *out, size_t max);

uint64_t hm_queue_pushed(const struct hm_queue *q);
uint64_t hm_queue_dropped(const struct hm_queue *q);

#endif
