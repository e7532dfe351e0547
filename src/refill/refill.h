/* Refill box: everything between the thread caches and the segments.
 *
 * It fills an empty thread-cache bin with a batch of blocks (the class's
 * current refill count), takes back a bin that grew past its cap, collects
 * blocks that other threads freed, and hands a thread's memory on when the
 * thread exits.  It owns the per-thread heaps (span lists per class) and the
 * refill-count table that the ACE box tunes. */
#ifndef HM_REFILL_H
#define HM_REFILL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../segment/segment.h"
#include "../size_class/size_class.h"

/* One bin of a thread cache: a LIFO list linked through each block's first
 * word.  A free block's second word holds hm_free_key, which lets free()
 * notice a likely double free with one compare.  The bin counts the room
 * left below its cap rather than its blocks, so free() pays one decrement
 * for both: when room goes negative the block freed is one over the cap,
 * and the flush takes it.
 *
 * A draining bin (cap HM_BIN_DRAINING) takes no frees: its room stays far
 * below zero, so every free overflows and the flush hands the block
 * back to its span (small ones a batch at a time, see drain_defer).
 * While a class's live set shrinks, its allocations then come from the
 * spans refills pick, not from whichever blocks were freed last, so the
 * survivors gather in few spans and the others empty (see hm_flush). */
struct hm_bin {
    void *head;
    int32_t room;       /* cap - blocks held; -1: one over the cap */
    int32_t cap;        /* set at each refill (hm_bin_cap: 2x the refill count,
                         * more after a span's whole free list, wider for a
                         * class with a stash), or at a free before the
                         * class's first refill; or draining; 0 until then */
};

#define HM_BIN_DRAINING (-(1 << 30))

/* Blocks held.  Other threads' reports read the two fields unlocked and
 * may see them out of step: what cannot be is read as 0. */
static inline uint32_t hm_bin_count(const struct hm_bin *bin)
{
    int32_t room = __atomic_load_n(&bin->room, __ATOMIC_ACQUIRE);   /* see hm_thread_exit */
    int32_t cap = __atomic_load_n(&bin->cap, __ATOMIC_RELAXED);
    int64_t n = (int64_t)cap - room;
    int64_t most = cap >= 0 ? (int64_t)cap + 1 : 65536;  /* a draining bin: one batch */
    return n < 0 || n > most ? 0 : (uint32_t)n;
}

/* A prefetch for writing (PREFETCHW: every x86-64 CPU runs it, older
 * Intel ones as a no-op).  GCC emits a read prefetch for
 * __builtin_prefetch(p, 1) unless built for a CPU with it. */
static inline void hm_prefetch_write(const void *p)
{
#if defined(__x86_64__)
    __asm__ volatile("prefetchw (%0)" : : "r"(p));
#else
    __builtin_prefetch(p, 1);
#endif
}

/* Links a free block into the bin, marked with the free key.  The caller
 * counted it in the bin's room first (and flushes instead when there was
 * none: see hm_flush). */
static inline void hm_bin_link(struct hm_bin *bin, void *p, uintptr_t key)
{
    ((void **)p)[0] = bin->head;
    ((uintptr_t *)p)[1] = key;
    bin->head = p;
}

struct hm_heap;

/* A refill carves at most this many bytes of never-carved blocks, one
 * block at least: its batch is the refill count, or less where the count
 * would carve more.  Carving writes a link into each block, and a block
 * never carved is mostly on a page never touched, so each is a page fault
 * (1-5 us on this project's VM): a refill of two 32 KiB blocks took two in
 * one malloc, and big_heap without huge pages had a p99.9 of 6.3 us
 * (mimalloc, which extends a page's free list by 4 KiB at most: 2.7).
 * Capped, a call takes one fault where it took several, the rest come in
 * the calls that follow, or never for a block the program does not use:
 * p99.9 3.8 us.  Blocks handed back (free lists, holes, the stash) come
 * in whole batches, and so do never-carved blocks on pages still resident
 * (those an earlier span carved, and all of a span in a half asking for
 * huge pages, resident whole from its first touch): there the bound only
 * cost refills (phase_server 0.93x). */
#define HM_CARVE_BYTES ((size_t)4096)

/* Blocks above the largest class up to HM_PAGES_MAX are whole spans of
 * 64 KiB pages ("page blocks").  Their bin, after the classes' bins, has
 * cap 0: free() pushes a page block there like any block, the push
 * overflows, and the flush hands the block straight back to its span.
 * Half a segment at most: blocks of up to a whole segment left free runs
 * too short for the next big block in every segment, so each new one
 * faulted in a fresh segment while the freed pages waited for the purge
 * (the `large` benchmark: 71 MiB peak, 59.7 MiB with this bound, and
 * faster).  Above, a block is a mapping of its own, cached a while. */
#define HM_PAGES_CLASS HM_NUM_CLASSES
#define HM_PAGES_MAX   (HM_SEGMENT_SIZE / 2)   /* 2 MiB */

/* The thread cache: the only state the malloc/free fast paths touch. */
struct hm_tcache {
    uintptr_t owner;    /* id of the heap whose spans this thread owns */
    uintptr_t key;      /* hm_free_key, next to owner for free()'s compares */
    struct hm_heap *heap;
    struct hm_bin bins[HM_NUM_CLASSES + 1];
};

/* Page-map tags carry a bin's offset below the heap id's alignment. */
_Static_assert(sizeof(struct hm_tcache) <= HM_HEAP_ALIGN, "bin offsets fit a page-map tag");

/* The class of the bin at bin_offset in a thread cache (a page tag's). */
static inline unsigned hm_bin_class(uintptr_t bin_offset)
{
    return (unsigned)((bin_offset - offsetof(struct hm_tcache, bins)) / sizeof(struct hm_bin));
}

extern uintptr_t hm_free_key;

/* Fills tc's bin for cls and returns one block, or NULL when out of memory.
 * Sets the thread up (and the process) on first use. */
void *hm_refill(struct hm_tcache *tc, unsigned cls);

/* A page block of at least `size` bytes (above HM_MAX_CLASS_SIZE, at most
 * HM_PAGES_MAX), 64 KiB aligned; NULL when out of memory or while the
 * process is being set up. */
void *hm_alloc_pages(struct hm_tcache *tc, size_t size);

/* realloc of a page block of this thread's: grows it into the free pages
 * that follow it, or shrinks it, in place.  False: move it. */
bool hm_realloc_pages(struct hm_tcache *tc, void *p, size_t size);

/* p, freed into tc's bin for cls, found no room there: the bin's room
 * counts it already (one over the cap), but p is neither read nor linked
 * yet.  A full bin's older blocks go to their spans, or to the class's
 * stash, and p joins the bin; a draining bin's free goes back to its
 * span, a batch at a time (its checks, the double free's too, then). */
void hm_flush(struct hm_tcache *tc, unsigned cls, void *p);

/* Every free the fast path did not take: NULL, large blocks, blocks of other
 * threads' spans, invalid pointers and suspected double frees.  `call` names
 * the API for the diagnostic ("free", "realloc", ...). */
void hm_free_slow(struct hm_tcache *tc, void *p, const char *call);

/* hm_free_slow for a block that free() counted in a bin of tc's (which
 * had room) before it found the block marked free already: bin_offset is
 * the bin's offset in the thread cache, from the block's page tag. */
void hm_free_counted(struct hm_tcache *tc, uintptr_t bin_offset, void *p);

/* Usable size of a block we own; aborts with a diagnostic naming `call`
 * for a pointer we do not own.  0 for NULL. */
size_t hm_usable_size(void *p, const char *call);

/* malloc_trim: returns this thread's cache and every empty span and
 * segment it holds.  True when memory went back to the OS. */
bool hm_trim(struct hm_tcache *tc);

/* At the process's exit: the exiting thread's drained frees waiting in
 * its heap's batch go back to their spans (a block that fails its check
 * then gets its diagnostic, as it would have at a later put), unless its
 * heap's lock cannot be had soon (see hm_heap_lock_at_exit). */
void hm_drained_put_at_exit(struct hm_tcache *tc);

/* The process-wide purge's share of the heaps: tidies those whose threads
 * entered no slow path for delay_ns (their stashes, nearly empty spans and
 * remote frees; see hm_heaps_tidy_idle_step). */
void hm_heaps_tidy_idle(uint64_t delay_ns);

/* Thread exit: gives the thread's cached blocks and spans back. */
void hm_thread_exit(struct hm_tcache *tc);

/* Refill counts: defaults and bounds are fixed per class; the current count
 * is read once per refill (Contract B: a change affects the next refill). */
struct hm_refill_bounds {
    uint32_t min, def, max;
};
uint32_t hm_refill_count_load(unsigned cls);
void hm_refill_count_store(unsigned cls, uint32_t count);
struct hm_refill_bounds hm_refill_bounds(unsigned cls);

/* Per-class counters summed over all heaps (racy reads of live threads).
 * blocks_cached counts `self`'s bin (the caller's thread cache, or NULL)
 * as it is now, and other threads' bins as their last slow path left them. */
struct hm_class_counters {
    uint64_t refills, blocks_refilled, flushes, blocks_flushed;
    uint64_t remote_frees, blocks_cached, ace_drops, blocks_drained;
};
void hm_class_counters(unsigned cls, const struct hm_tcache *self, struct hm_class_counters *out);

struct hm_heap_counters {
    uint64_t threads_live, threads_exited;
    uint64_t segments_abandoned, segments_adopted;
    uint64_t segments_swept;        /* abandoned ones emptied and given back by a sweep */
    uint64_t heaps_tidied;          /* tidies of idle threads' heaps, ever */
    uint64_t heaps_orphaned;        /* heaps exited for a thread gone without exiting them */
    /* Exited threads' heaps kept for the next threads: resident, and
     * those whose pages went back after the purge delay. */
    uint64_t heaps_free, heaps_released;
};
void hm_heap_counters(struct hm_heap_counters *out);

/* Fork: the prepare handler takes every lock of the box; parent and child
 * release them, the child after its reset: its registry keeps only the
 * heap of `self`, the forking thread's cache (see hm_refill_fork_child). */
void hm_refill_fork_prepare(void);
void hm_refill_fork_release(void);
void hm_refill_fork_child(struct hm_tcache *self);

/* Tests only: called by a remote free between its push onto a segment's
 * pending stack and its hint to the segment's owner (see remote_push). */
extern void (*hm_remote_push_test_hook)(struct hm_segment *seg);

/* Process set-up hooks the init box calls. */
void hm_refill_module_init(void);

#endif
