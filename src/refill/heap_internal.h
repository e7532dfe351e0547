/* Refill box internals: the per-thread heap.  Only src/refill/ includes this. */
#ifndef HM_HEAP_INTERNAL_H
#define HM_HEAP_INTERNAL_H

#include <sys/types.h>

#include "refill.h"
#include "../segment/segment.h"

struct hm_heap_class_stats {
    uint64_t refills, blocks_refilled, flushes, blocks_flushed, remote_frees, ace_drops;
    uint64_t batch_start_ns;          /* ACE: first refill of the pending batch */
    uint16_t batch_refills;           /* ACE: refills in the pending batch (<= 8) */
    uint16_t flushes_since_refill;    /* overflows since the bin was last empty (<= 8) */
    uint32_t flushed_since_refill;    /* ACE: overflow since the batch was sent */
    uint32_t remote_since_refill;
    uint32_t blocks_since_report;     /* ACE: blocks refilled since the last event */
    uint32_t last_refill;             /* blocks the last refill put in the bin */
    /* The bin's blocks after its last slow path, which other threads'
     * reports read: never the bin itself, which is in its thread's TLS and
     * may be unmapped once the thread is gone (see hm_class_counters). */
    uint32_t bin_blocks;
    /* A draining bin's current window: its allocations, and its frees
     * since blocks_drained (low 32 bits) was drain_frees_at. */
    uint32_t drain_frees_at, drain_allocs;
    uint64_t blocks_drained;
};

struct hm_remote_batch {
    struct hm_span *sp;
    void *head, *tail;
    uint32_t count;
};

/* Blocks of a medium class between the thread's bin and their spans, as
 * pointers, newest last (see "the stash" in refill.c).  They count as used
 * by their spans, like a bin's. */
#define HM_STASH_MAX 16
struct hm_stash {
    uint32_t count;                 /* written under the heap's lock, read by reports */
    void *slot[HM_STASH_MAX];
};

/* A thread's heap: the spans it owns, per class, and the segments they live
 * in.  Only a holder of its lock touches it (its thread; another thread
 * tidying it while the thread idles), except the registry link, the
 * counters that reports read, and the batches of remote frees and of
 * drained frees, which only its thread touches (or a tidier that exits
 * the heap of a thread gone). */
/* Where a compaction pass that ran out of its step goes on: a class, and
 * a position in the class's partial list. */
struct hm_compact_cursor {
    unsigned cls;
    uint32_t span;
};

struct hm_heap {
    uintptr_t id;                           /* == its address; spans' owner */
    pid_t tid;                              /* its thread's (0: no thread's): see thread_gone */
    pid_t pid;                              /* the process that attached it (or forked it) */
    /* Held by the owner through each slow path (hm_heap_lock), so that
     * another thread may tidy the heap while its thread idles (see
     * hm_heaps_tidy_idle); the fast paths never take it: they touch only
     * the thread cache, which nobody else touches. */
    _Atomic uint32_t lock;                  /* HM_HEAP_FREE, _OWNER or _TIDIER */
    uint32_t lock_depth;                    /* the owner's re-entries (see hm_heap_lock) */
    uint32_t entries;                       /* slow paths entered (under the lock) */
    /* The tidier's view, under heaps_lock: the entries it last saw, since
     * when, and whether it has tidied the heap since (then only frees by
     * other threads can give it more to do). */
    uint32_t idle_entries;
    bool tidied;
    uint64_t idle_since_ns;
    uint64_t gone_checked_ns;               /* when thread_gone was last asked */
    struct hm_span *partial[HM_NUM_CLASSES];  /* spans with blocks to hand out */
    /* Segments this heap owns, listed by room (see list_insert), and how
     * many of them it drains (see hm_heap_reclaim). */
    struct hm_segment *segments, *segments_last;
    struct hm_segment *segments_full;       /* the first full one (NULL: none) */
    unsigned segments_drained;
    struct hm_segment *purge_at;            /* where the next purge step goes on */
    /* Empty segments kept for reuse (their pages decay like any free page),
     * linked through seg->next; beyond HM_HEAP_RESERVE they are unmapped. */
    struct hm_segment *reserve;
    unsigned reserve_count;
    unsigned segments_taken;                /* fresh ones (not of exited threads), ever */
    struct hm_heap *next_live, *prev_live;  /* registry (under heaps_lock) */
    /* Free heaps' list (see heaps_free), and since when this one is on it. */
    struct hm_heap *next_free, *prev_free;
    uint64_t freed_ns;
    uint32_t slow_path_ticks;               /* refills, page blocks, flushes: pace periodic work */
    bool purge_behind;                      /* the last purge step ran out */
    uint64_t compacted_ns;                  /* last pass over nearly empty spans */
    bool compact_unfinished;                /* that pass ran out of its step */
    /* malloc_trim's pass over the heap, which may take several steps:
     * which trim it belongs to, and where it goes on. */
    uint64_t trim_gen;
    struct hm_compact_cursor trim_at;
    /* Frees of other threads' blocks, batched per class (one span per
     * batch): one CAS per batch instead of one per block.  Blocks in a
     * batch count as used by their span, so it cannot go away meanwhile. */
    struct hm_remote_batch remote[HM_NUM_CLASSES + 1];
    uint64_t remote_open[2];                /* bit per class: batch not empty */
    size_t remote_held;                     /* bytes in all batches */
    /* Frees into draining bins, waiting to go back to their spans together,
     * at most HM_DRAIN_BATCH (see drain_defer): its thread adds to them
     * without the lock; puts hold it.  They count as used by their spans,
     * like a bin's blocks. */
#define HM_DRAIN_BATCH 32
    uint32_t drained_count;
    uint16_t drained_busy;                  /* drain_defers in progress */
    uint16_t drained_putting;               /* a put of drained frees in progress */
    void *drained[HM_DRAIN_BATCH];
    struct hm_heap_class_stats stats[HM_NUM_CLASSES + 1];   /* + page blocks */
    /* What the caches can hold until each class's next slow path, per
     * class (blocks) and in all (bytes): see hm_cache_bound_note. */
    uint16_t cache_bound_blocks[HM_NUM_CLASSES];     /* saturated: see cache_bound_set */
    uint64_t cache_bound;
    /* Set when other threads' frees may wait in the heap's segments: by a
     * remote free that announced a span on a segment's empty pending
     * stack, and when a segment joins the heap.  hm_heap_collect clears it
     * and only then walks the segments, so a refill that finds no partial
     * span does not read every segment's header when nobody freed into
     * them (a heap of 2 GiB: 512 headers, each a cache and TLB miss, at
     * every such refill).  On its own line: other threads write it.  Not
     * cleared when the heap is reused (hm_heap_attach): a thread that read
     * the owner of a segment just before it moved may still set it, which
     * costs one walk. */
    _Alignas(64) _Atomic uint32_t remote_hint;
    _Alignas(64) struct hm_stash stash[HM_NUM_CLASSES];  /* last: see hm_heap_attach */
};

#define HM_HEAP_RESERVE 4

/* The heap's lock word: only its owner thread ever stores HM_HEAP_OWNER,
 * so an owner that finds it there is re-entering its own slow path: a
 * signal handler that allocates, or an abort handler after a diagnostic
 * (hm_fatal) that a slow path raised.  It goes on, as it would have
 * without the lock, instead of waiting for itself. */
enum { HM_HEAP_FREE, HM_HEAP_OWNER, HM_HEAP_TIDIER };

/* The owner's lock: one uncontended compare-exchange.  Contended only
 * while a tidier holds it, for one step of bounded work. */
void hm_heap_lock_wait(struct hm_heap *h);
bool hm_heap_lock_at_exit(struct hm_heap *h);
static inline void hm_heap_lock(struct hm_heap *h)
{
    uint32_t seen = HM_HEAP_FREE;
    if (__builtin_expect(!atomic_compare_exchange_strong_explicit(
                             &h->lock, &seen, HM_HEAP_OWNER, memory_order_acquire,
                             memory_order_relaxed), 0)) {
        if (seen == HM_HEAP_OWNER)
            h->lock_depth++;
        else
            hm_heap_lock_wait(h);
    }
    h->entries++;
}

static inline void hm_heap_unlock(struct hm_heap *h)
{
    if (__builtin_expect(h->lock_depth, 0))
        h->lock_depth--;
    else
        atomic_store_explicit(&h->lock, HM_HEAP_FREE, memory_order_release);
}

/* Takes a free lock for `who`; reads it first, so that a held lock's line
 * is not written. */
static inline bool hm_heap_lock_take(struct hm_heap *h, uint32_t who)
{
    uint32_t seen = HM_HEAP_FREE;
    return atomic_load_explicit(&h->lock, memory_order_relaxed) == HM_HEAP_FREE &&
           atomic_compare_exchange_strong_explicit(&h->lock, &seen, who, memory_order_acquire,
                                                   memory_order_relaxed);
}

static inline bool hm_heap_trylock(struct hm_heap *h)
{
    return hm_heap_lock_take(h, HM_HEAP_TIDIER);
}

static inline void hm_heap_tidier_unlock(struct hm_heap *h)
{
    atomic_store_explicit(&h->lock, HM_HEAP_FREE, memory_order_release);
}

/* heap.c */
struct hm_heap *hm_heap_attach(struct hm_tcache *tc);
/* The cache of allocations by threads after their exit, and its lock
 * (see heap.c). */
extern struct hm_tcache hm_exited_tcache;
void hm_exited_lock(void);
void hm_exited_unlock(void);
struct hm_span *hm_heap_new_span(struct hm_heap *h, unsigned cls);
struct hm_span *hm_heap_new_pages(struct hm_heap *h, unsigned pages);
void hm_heap_segment_emptied(struct hm_heap *h, struct hm_segment *seg);
/* Gives back the free pages of this heap's segments that waited delay_ns,
 * a step at a time. */
void hm_heap_purge(struct hm_heap *h, uint64_t delay_ns);
/* Tidies the heaps whose threads entered no slow path for delay_ns (not
 * `self`, the caller's own): what their owners would have done at their
 * next slow paths, within `budget` (counted as hm_heap_tidy counts it);
 * returns the cost. */
size_t hm_heaps_tidy_idle_step(struct hm_heap *self, uint64_t delay_ns, size_t budget);
/* malloc_trim's share of the other threads' heaps (not `self`): each one
 * whose thread is not in a slow path at that moment is trimmed
 * (hm_heap_trim, trim `gen`), in the tidier's steps. */
void hm_heaps_trim_others(struct hm_heap *self, uint64_t gen);
/* Slow-path ticks between two steps (64, or 8 while steps fall behind: both
 * divide 2^32, so a wrapping tick keeps the pace). */
unsigned hm_heap_purge_interval(const struct hm_heap *h);
uint64_t hm_heap_live_count(void);
/* The heap's empty segments go to the process pool, or (unmap) to the OS. */
void hm_heap_release_reserve(struct hm_heap *h, bool unmap);
/* malloc_trim's: the process pool's empty segments, and the pages of the
 * exited threads' heaps kept for reuse, go back now; true when any heap's
 * did (the segments show in the bytes mapped). */
bool hm_heap_release_unused(void);

/* A segment's room, which orders its heap's list (see list_insert): 2
 * with two free pages or more, 1 with one, 0 full. */
static inline unsigned hm_segment_room(const struct hm_segment *seg)
{
    uint64_t free_pages = __atomic_load_n(&seg->free_pages, __ATOMIC_RELAXED);
    return !free_pages ? 0 : !(free_pages & (free_pages - 1)) ? 1 : 2;
}

static inline bool hm_segment_is_full(const struct hm_segment *seg)
{
    return hm_segment_room(seg) == 0;
}

/* A span of h's segment seg came, went or changed size (its room was
 * old_room before): it keeps its place in the list (see list_insert). */
void hm_heap_segment_changed(struct hm_heap *h, struct hm_segment *seg, unsigned old_room);

/* refill.c */
void hm_free_key_init(void);
void hm_heap_collect(struct hm_heap *h);
void hm_heap_collect_own(struct hm_heap *h);

/* Whether drained frees may wait unput, with no free key yet: in the
 * batch, or on their way in (a drain_defer) or out (a put) when a handler
 * re-entered the allocator.  The owner's slow paths then neither collect
 * remote frees (see hm_heap_collect_own) nor end a bin's drain.  A
 * handler that leaves a drain_defer or a put by siglongjmp (which no
 * malloc need survive) leaves its mark for good: the thread then never
 * collects other threads' frees of its blocks again, its draining bins
 * never stop draining, and after a drain_defer its batch never goes
 * back (its frees then go back one at a time). */
static inline bool hm_drained_waiting(const struct hm_heap *h)
{
    return h->drained_count || h->drained_busy || h->drained_putting;
}
/* Takes over, to drain it, an abandoned segment that the heap's thread
 * frees into, when the heap can; false: free remotely as to a live owner. */
bool hm_heap_reclaim(struct hm_heap *h, struct hm_segment *seg);
void hm_segment_collect_abandoned(struct hm_segment *seg, uint64_t *collected);
void hm_abandoned_sweep(unsigned most, bool now);
/* Whether other threads may have freed blocks of h's segments that it has
 * not collected yet (its remote_hint). */
bool hm_heap_has_remote_frees(const struct hm_heap *h);
/* An idle heap's tidying, by another thread holding its lock: remote
 * frees to it are collected, its stashes go back to their spans, its
 * empty segments are unmapped, and its spans at most half full are
 * compacted, within `budget` (as hm_heap_compact_sparse counts it, and
 * HM_SEGMENT_UNMAP_COST a segment); returns the cost.  Never reads its
 * thread's cache (the thread may be gone: a fork child's heaps of the
 * parent's other threads). */
size_t hm_heap_tidy(struct hm_heap *h, size_t budget);
/* A segment unmapped, in a tidying step's budget (bytes of work): about
 * what a thread's exit costs there. */
#define HM_SEGMENT_UNMAP_COST ((size_t)16 << 10)
/* Collects h's remote frees and returns its stashes to their spans. */
void hm_heap_tidy_caches(struct hm_heap *h);
/* malloc_trim's share of one heap, under its lock (its owner's or a
 * tidier's): remote frees collected, stashes back to their spans, and the
 * free pages of its partial spans given back (not the bins: only its
 * thread reaches those), until the cost reaches `budget` (counted as
 * hm_heap_compact_sparse counts it).  A later call for the same trim
 * (`gen`: each malloc_trim has its own, later ones greater) goes on from
 * the span where it stopped, so a heap whose thread keeps freeing is still passed over once.
 * True when the heap's pass is done (or a later trim's has begun); *cost:
 * what this step cost. */
bool hm_heap_trim(struct hm_heap *h, uint64_t gen, size_t budget, size_t *cost);
/* Sends this heap's batches of remote frees to their spans. */
void hm_remote_flush(struct hm_heap *h);
/* Compacts nearly empty spans until the step's cost reaches `budget`:
 * bytes given back, plus COMPACT_LINK_COST for each free-list link walked;
 * returns the cost. */
size_t hm_heap_compact_sparse(struct hm_heap *h, uint64_t now_ns, uint64_t delay_ns,
                              unsigned fill_shift, size_t budget);
void hm_span_put(struct hm_heap *h, struct hm_span *sp, void *block);
void hm_partial_push(struct hm_heap *h, struct hm_span *sp);
void hm_partial_remove(struct hm_heap *h, struct hm_span *sp);
void hm_bin_return_all(struct hm_heap *h, struct hm_tcache *tc, unsigned cls);
uint32_t hm_drained_put(struct hm_heap *h);
uint32_t hm_drained_put_orphaned(struct hm_heap *h);
/* A heap's first refills of a class that carve less than the refill
 * count (see slow_start in refill.c). */
#define HM_SLOW_START_REFILLS 3
/* A bin's cap after a refill of `got` blocks for a batch of `want`. */
int32_t hm_bin_cap(unsigned cls, uint32_t want, uint32_t got);
/* Counts class cls's bin and stash into h->cache_bound again, after a
 * slow path changed the bin's cap or the stash (see enforce_cache_budget),
 * and notes the bin's blocks for other threads' reports. */
void hm_cache_bound_note(struct hm_heap *h, struct hm_tcache *tc, unsigned cls);
/* Blocks of the class in h's stash (for reports; read without a lock). */
uint32_t hm_stash_count(const struct hm_heap *h, unsigned cls);

#endif
