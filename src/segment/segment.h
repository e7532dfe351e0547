/* Segment box: memory from the OS, and the map from an address to its owner.
 *
 * A segment is 4 MiB, aligned to 4 MiB, cut into 64 pages of 64 KiB.  Page 0
 * holds the segment header; spans are runs of pages that carve blocks of one
 * size class.  A large block (above the largest class) is its own mapping
 * whose header sits at the start of its first 4 MiB granule.
 *
 * The segment map has one entry per 4 MiB granule of the 47-bit address
 * space: the slow paths find a pointer's header in one load, and an address
 * we never mapped finds NULL, which is how invalid frees are caught without
 * a per-block header.  The page map has one word per 64 KiB page: free()'s
 * fast path reads only that word to learn whether the block is of a span
 * of this thread's, and which bin takes it. */
#ifndef HM_SEGMENT_H
#define HM_SEGMENT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HM_SEGMENT_SHIFT 22
#define HM_SEGMENT_SIZE  ((size_t)1 << HM_SEGMENT_SHIFT)
#define HM_PAGE_SHIFT    16
#define HM_PAGE_SIZE     ((size_t)1 << HM_PAGE_SHIFT)
#define HM_SEGMENT_PAGES 64u
#define HM_ADDRESS_BITS  47
#define HM_OS_PAGE       ((size_t)4096)

/* n rounded up to a multiple of a (a power of two). */
static inline size_t hm_round_up(size_t n, size_t a)
{
    return (n + a - 1) & ~(a - 1);
}

/* Span owners.  A live span's owner is its heap's id: the heap's address,
 * a multiple of HM_HEAP_ALIGN.  These values are never heap ids. */
#define HM_HEAP_ALIGN      ((uintptr_t)4096)
#define HM_OWNER_NONE      (~(uintptr_t)1)  /* a thread cache not set up yet */
#define HM_OWNER_EXITED    (~(uintptr_t)2)  /* its heap was given back at thread exit */
#define HM_OWNER_ABANDONED ((uintptr_t)1)   /* its thread exited */
#define HM_OWNER_SENTINEL  (~(uintptr_t)0)  /* not a span: a free or header page */
#define HM_OWNER_DRAIN     ((uintptr_t)2)   /* with a heap id: the heap drains it */

enum hm_segment_kind { HM_SEGMENT_SPANS = 1, HM_SEGMENT_LARGE = 2 };

/* One span.  The first cache line is read by every thread that frees into
 * the span; the second is written by remote frees; the third belongs to the
 * owner thread alone. */
struct hm_span {
    _Atomic uintptr_t owner;
    uint32_t size_class;
    uint32_t block_size;
    char *start;                    /* first block */
    uint64_t block_recip;           /* 2^44 / block_size, rounded up: see hm_span_is_block */
    uint32_t capacity;              /* blocks the span holds */
    uint8_t page_index;
    uint8_t pages;
    uint32_t bin_offset;            /* of the owner's bin for the class, in its thread cache */
    char pad0[64 - 8 - 8 - 8 - 8 - 4 - 2 - 2 - 4];

    /* Blocks freed by other threads: a list's head with its length in the
     * top bits (hm_remote_word), so that the owner takes it whole without
     * walking it.  Its tail is the first pusher's, written before that
     * thread announces the span on the pending stack (see remote_push). */
    _Atomic uintptr_t remote;
    struct hm_span *pending_next;   /* link in the segment's pending stack */
    void *remote_tail;
    char pad1[64 - 24];

    void *free;                     /* blocks given back to the span */
    char *bump;                     /* next never-carved block */
    char *end;                      /* end of the carvable area */
    uint32_t used;                  /* blocks out of the span (users, caches, remote lists) */
    uint32_t holes;                 /* free blocks on pages given back to the OS */
    uint64_t sparse_since_ns;       /* when it was first seen nearly empty; 0: not */
    struct hm_span *next, *prev;    /* heap's partial list for the class */
    uint8_t in_partial;             /* on its heap's list for the class */
    uint16_t resident_pages;        /* OS pages from its start resident when it was set up:
                                     * carving there costs no page faults */
    uint32_t freed_since_compact;   /* blocks returned to it since its last compaction */
} __attribute__((aligned(64)));

/* A span's remote list as one word: user addresses fit in 48 bits, and a
 * span holds at most 4096 blocks (16 B ones in one page; a class's span has
 * at most 4 pages, and bigger blocks: test_size_class checks every class),
 * so the length fits above them. */
#define HM_REMOTE_COUNT_SHIFT 48
_Static_assert(HM_PAGE_SIZE / 16 < ((uintptr_t)1 << (64 - HM_REMOTE_COUNT_SHIFT)),
               "a span's block count fits in a remote word");

static inline uintptr_t hm_remote_word(void *head, uint32_t count)
{
    return (uintptr_t)head | ((uintptr_t)count << HM_REMOTE_COUNT_SHIFT);
}

static inline void *hm_remote_head(uintptr_t w)
{
    return (void *)(w & (((uintptr_t)1 << HM_REMOTE_COUNT_SHIFT) - 1));
}

static inline uint32_t hm_remote_count(uintptr_t w)
{
    return (uint32_t)(w >> HM_REMOTE_COUNT_SHIFT);
}

struct hm_segment {
    uint32_t kind;
    uint32_t pages_used;            /* spans' pages in use, header excluded */
    _Atomic uintptr_t owner;        /* heap id (| HM_OWNER_DRAIN), or HM_OWNER_ABANDONED */
    /* Page state, under `lock`: the owner changes it when spans come and
     * go, a purger (the ACE thread) when it returns free pages to the OS.
     * 0 when free, else the fork generation that took it (see seg_lock). */
    _Atomic uint32_t lock;
    uint64_t free_pages;            /* bit i set: page i is free */
    uint64_t dirty_pages;           /* free pages that may still be resident */
    uint64_t dirty_since_ns;        /* when the oldest of those was freed; 0: none */
    struct hm_segment *all_next, *all_prev;   /* every span segment (registry) */
    struct hm_segment *next, *prev; /* the heap's list, or the abandoned stack */
    _Atomic(struct hm_span *) pending; /* spans whose remote list became non-empty */
    /* Remote frees between their push onto `pending` and their last read
     * of the segment (the owner, to hint it): once the push lands, the
     * owner may collect the span and free the segment, whose unmapping
     * then waits for them (see hm_segment_free). */
    _Atomic uint32_t announcing;
    _Atomic unsigned huge_halves;   /* bit per 2 MiB half asking for huge pages */
    bool huge_asked;                /* mapped asking for them (see hm_huge_segments_max) */
    bool on_abandoned;              /* on the abandoned stack (under its lock) */
    uint64_t drained_ns;            /* drained: when it last gave back a span (refill) */
    uint64_t pooled_ns;             /* in the process pool of empty segments since (refill) */
    /* Large blocks only. */
    char *map_base;
    size_t map_size;
    char *user;
    size_t alignment;
    uint64_t fresh_ns;              /* its first return to the cache, or last renewal; 0: none */
    struct hm_span *page_span[HM_SEGMENT_PAGES];
    struct hm_span spans[HM_SEGMENT_PAGES];  /* not present in a large block's header */
    /* What each free page's last span left there, under `lock` (see
     * trim_inherited; after spans, so not in a large block's header
     * either): how many of its OS pages, from its start, may still be
     * resident (an upper bound, 0 once given back), and that span's class
     * plus one (0: none). */
    uint8_t resident_os_pages[HM_SEGMENT_PAGES];
    uint8_t last_class[HM_SEGMENT_PAGES];
    /* Per span, one bit per block: the span's "holes", free blocks whose
     * OS pages were given back while the span stayed in use.  Touched only
     * for spans that were compacted. */
    uint64_t hole_bits[HM_SEGMENT_PAGES][HM_PAGE_SIZE / 16 / 64];
};

struct hm_segmap {
    struct hm_segment *_Atomic *table;
    uintptr_t entries;              /* 0 until the map exists */
};

extern struct hm_segmap hm_segmap;
extern struct hm_span hm_sentinel_span;

/* The entry of the first granule: never a header, and not NULL either, so
 * that a pointer below 4 MiB (whose granule base is NULL) never matches. */
#define HM_SEGMAP_POISON ((struct hm_segment *)1)

/* The header of the segment or large block that owns address u, or NULL. */
static inline struct hm_segment *hm_segment_of(uintptr_t u)
{
    if (__builtin_expect((u >> HM_SEGMENT_SHIFT) >= hm_segmap.entries, 0))
        return 0;
    struct hm_segment *seg = atomic_load_explicit(&hm_segmap.table[u >> HM_SEGMENT_SHIFT],
                                                  memory_order_relaxed);
    return seg == HM_SEGMAP_POISON ? 0 : seg;
}

/* The page map: one word per 64 KiB page of the 47-bit address space
 * (16 GiB of address space, reserved; only the words of pages we use are
 * ever touched).  A page of a live span holds the span's tag: its owner's
 * heap id ORed with the offset of the owner's bin for the span's class in
 * the owner's thread cache.  Every other page holds 0.  free() needs
 * nothing else: the tag XOR the thread's own heap id is below
 * HM_HEAP_ALIGN exactly when the page is a span of this thread's, and is
 * then the bin's offset. */
struct hm_pagemap {
    _Atomic uintptr_t *table;
    uintptr_t entries;              /* 0 until the map exists */
};
extern struct hm_pagemap hm_pagemap __attribute__((visibility("hidden")));

static inline uintptr_t hm_page_tag(uintptr_t owner, uint32_t bin_offset)
{
    return owner & (HM_HEAP_ALIGN - 1) ? 0 : owner | bin_offset;   /* not a heap: 0 */
}


/* The span of a block in a span segment; &hm_sentinel_span for pages that
 * carry no span and for every page of a large block's header. */
static inline struct hm_span *hm_span_of(const struct hm_segment *seg, uintptr_t u)
{
    return seg->page_span[(u >> HM_PAGE_SHIFT) & (HM_SEGMENT_PAGES - 1)];
}

static inline uintptr_t hm_span_owner(const struct hm_span *sp)
{
    return atomic_load_explicit(&sp->owner, memory_order_relaxed);
}

/* A span's block_recip for blocks of `size` bytes. */
static inline uint64_t hm_block_recip(uint32_t size)
{
    return ((uint64_t)1 << 44) / size + 1;
}

/* Whether p is the start of a block of sp: the slow paths' check of every
 * pointer freed to another thread or flushed.  A multiplication by the
 * reciprocal, not a division (20-40 cycles): for an offset below 2^22 (a
 * span lies in one segment) and a size of at most 2^21, the quotient
 * rounded down is exact, since the reciprocal's excess moves it by less
 * than 2^-22 and a quotient that is not whole falls short of the next
 * integer by at least 1/size >= 2^-21. */
static inline bool hm_span_is_block(const struct hm_span *sp, uintptr_t u)
{
    uintptr_t off = u - (uintptr_t)sp->start;
    if (u < (uintptr_t)sp->start || off >= (uintptr_t)sp->capacity * sp->block_size)
        return false;
    uint64_t q = ((uint64_t)off * sp->block_recip) >> 44;
    return q * sp->block_size == off;
}

/* Reserves the segment map (address space only).  0 on success. */
int hm_segment_module_init(void);

/* huge: back it with transparent huge pages as it is first touched (see
 * "huge pages" in segment.c). */
struct hm_segment *hm_segment_alloc(uintptr_t owner, bool huge);
/* At most this many segments that asked for huge pages are mapped at once
 * (4096: 16 GiB); a variable so that tests can lower it. */
extern uint64_t hm_huge_segments_max;
void hm_segment_free(struct hm_segment *seg);
bool hm_segment_is_empty(const struct hm_segment *seg);
/* Gives back [p, p + len) of the segment's pages (MADV_DONTNEED); a huge
 * half that a span still uses stops asking for huge pages. */
void hm_segment_give_back(struct hm_segment *seg, void *p, size_t len);

/* Whether the segment has `pages` free pages in a row that may still be
 * resident (a hint: read without the lock). */
bool hm_segment_has_dirty_run(const struct hm_segment *seg, unsigned pages);

/* A span of `pages` pages for class cls, or NULL when the segment has no
 * run that long.  The span's blocks are carved lazily (bump pointer).
 * bin_offset: where the owner's bin for cls sits in its thread cache
 * (below HM_HEAP_ALIGN), for the page map. */
struct hm_span *hm_span_alloc(struct hm_segment *seg, unsigned pages, unsigned cls,
                              uint32_t block_size, uintptr_t owner, uint32_t bin_offset);
void hm_span_release(struct hm_segment *seg, struct hm_span *sp);
/* A one-block span (a page block) grows into the free pages after it or
 * gives back its last pages; false when the pages after it are taken. */
bool hm_span_resize(struct hm_segment *seg, struct hm_span *sp, unsigned pages);
/* A span changes hands (thread exit, adoption): its pages' tags follow. */
void hm_span_set_owner(struct hm_span *sp, uintptr_t owner);
static inline struct hm_segment *hm_segment_of_span(const struct hm_span *sp)
{
    return (struct hm_segment *)((uintptr_t)sp & ~(uintptr_t)(HM_SEGMENT_SIZE - 1));
}

static inline uint64_t *hm_span_holes(const struct hm_span *sp)
{
    return hm_segment_of_span(sp)->hole_bits[sp->page_index];
}

/* Decay: pages of released spans go back to the OS (MADV_DONTNEED) once
 * they have been free for `delay_ns`, so a burst's memory does not stay
 * resident, and a span freed and reused at once costs no page faults.
 * hm_segment_purge does one segment (the owner's slow path); purge_all
 * walks every span segment, including those of exited threads (the ACE
 * thread, malloc_trim).  Both return the bytes given back, and stop once
 * they gave back `budget` bytes (rounded up to a 64 KiB page): the
 * application's slow paths purge in steps, since giving back memory costs
 * about a microsecond an OS page and a step is one malloc's delay.  What
 * is left keeps its age and goes at the next step.  HM_PURGE_ALL: no
 * bound. */
#define HM_PURGE_ALL SIZE_MAX
uint64_t hm_clock_ns(void);          /* monotonic, coarse (a few ms): ages */
uint64_t hm_clock_precise_ns(void);  /* monotonic, precise: intervals */
size_t hm_segment_purge(struct hm_segment *seg, uint64_t now_ns, uint64_t delay_ns,
                        size_t budget);
size_t hm_segment_purge_all(uint64_t now_ns, uint64_t delay_ns, size_t budget);
/* purge_all's work in steps, for the application's slow paths: `budget`
 * bytes, and at most HM_PURGE_STEP_VISITS segments read, from where the
 * last step stopped.  True while the pass is not done. */
bool hm_segment_purge_step(uint64_t now_ns, uint64_t delay_ns, size_t budget);

/* Freed large blocks wait in a bounded cache; this unmaps those unused for
 * delay_ns (while less than `budget` bytes went; at least one) and returns
 * their bytes.  config sets the delay free() applies. */
void hm_large_cache_config(uint64_t delay_ns);
size_t hm_large_cache_purge(uint64_t now_ns, uint64_t delay_ns, size_t budget);
size_t hm_large_cache_bytes(void);     /* what freed large blocks waiting in the cache map */

/* Fork: the registry and cache locks are held across fork(), and let go
 * (release) by the parent's and the child's handlers alike; the child's
 * reset (hm_segment_fork_child) comes first. */
void hm_segment_fork_prepare(void);
void hm_segment_fork_release(void);
void hm_segment_fork_child(void);
/* Counts forks down the process's line: a segment's lock taken in an
 * older generation is free (see seg_lock in segment.c). */
extern _Atomic uint32_t hm_fork_generation;
void hm_large_fork_prepare(void);
void hm_large_fork_release(void);

/* The allocator's mutexes that fork's prepare handlers take, locked and
 * unlocked through these.  From the end of the prepare handlers to the
 * start of the parent's or child's (hm_fork_hold_begin / _end), the
 * forking thread holds them all, and other libraries' fork handlers run on
 * it: those registered before ours run after our prepare handler and
 * before our parent and child handlers.  A malloc in one must not wait
 * for locks its own thread holds (glibc's malloc works there), so for that
 * thread, then, these do nothing; every other thread waits as usual.  A
 * signal handler on that thread that allocates in the window may find the
 * state a handler's allocation left halfway (as one that interrupts any
 * malloc may). */
void hm_mutex_lock(pthread_mutex_t *m);
void hm_mutex_unlock(pthread_mutex_t *m);
void hm_fork_hold_begin(void);
/* A fork made inside the window (another library's handler may fork):
 * hm_fork_hold_nested counts its prepare (true: nothing to take), and
 * hm_fork_hold_end is false at its parent and child handlers, which keep
 * the locks for ours of the outer fork. */
bool hm_fork_hold_nested(void);
bool hm_fork_hold_end(void);

/* Large blocks: one mapping each.  *zeroed says whether the memory is
 * fresh from the OS (a block reused from the cache is not). */
void *hm_large_alloc(size_t size, size_t alignment, bool *zeroed);
/* For a block that realloc grows past HM_PAGES_MAX: may take a bigger cached block. */
void *hm_large_alloc_growing(size_t size);
/* A sleep that is no cancellation point, errno kept; a lock waiter's
 * pause at its `spins`th try (spin, yield, then sleep). */
void hm_nap_ns(long ns);
void hm_lock_backoff(unsigned spins);
/* madvise, errno kept (see os.c); true if it worked. */
bool hm_os_advise(void *p, size_t size, int advice);
bool hm_large_free(struct hm_segment *seg);   /* false: not registered (a double free) */
size_t hm_large_usable_size(const struct hm_segment *seg);
/* Resizes in place or by moving the pages (mremap): the new user pointer,
 * or NULL when the OS refuses (the block is then unchanged). */
void *hm_large_resize(struct hm_segment *seg, size_t size);

/* Process-wide counters of the OS memory we hold. */
struct hm_segment_counters {
    _Atomic uint64_t bytes_mapped;
    _Atomic uint64_t segments;
    _Atomic uint64_t large_blocks;
    _Atomic uint64_t large_bytes;
    _Atomic uint64_t bytes_purged;      /* given back with MADV_DONTNEED, ever */
    _Atomic uint64_t huge_halves;       /* 2 MiB halves of segments asking for huge pages */
    _Atomic uint64_t huge_segments;     /* segments mapped asking for them, still mapped */
};
extern struct hm_segment_counters hm_segment_counters;

/* The pages of every span segment by state, in bytes (mallinfo2): in
 * spans, free, and free but still resident (what a trim would give back). */
struct hm_segment_usage {
    uint64_t span_bytes, free_bytes, resident_free_bytes;
};
void hm_segment_usage(struct hm_segment_usage *out);

#endif
