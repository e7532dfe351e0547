/* Segments and spans: 4 MiB of 64 KiB pages, handed to threads as spans,
 * and the decay that gives free pages back to the OS. */
#define _GNU_SOURCE
#include "os_internal.h"

#include <limits.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../trace/trace.h"

/* Owns no blocks: every page of a segment that carries no span points here,
 * so free() needs no NULL check before reading the owner. */
struct hm_span hm_sentinel_span = { .owner = HM_OWNER_SENTINEL };

_Static_assert(sizeof(struct hm_span) == 192, "span layout");
_Static_assert(sizeof(struct hm_segment) <= HM_PAGE_SIZE, "header fits page 0");

/* ---- mutexes held across fork ----------------------------------------- */

/* pthread_self() of the thread between fork's prepare and parent or child
 * handlers; 0 otherwise.  Only that thread reads its own id here. */
static _Atomic uintptr_t fork_holder;
static pid_t fork_pid;                  /* the forking process: a child differs */

static bool fork_holds(void)
{
    uintptr_t holder = atomic_load_explicit(&fork_holder, memory_order_relaxed);
    return holder && holder == (uintptr_t)pthread_self();
}

void hm_mutex_lock(pthread_mutex_t *m)
{
    if (!fork_holds())
        pthread_mutex_lock(m);
}

void hm_mutex_unlock(pthread_mutex_t *m)
{
    if (!fork_holds())
        pthread_mutex_unlock(m);
}

/* A fork from inside the window (another library's handler may fork:
 * glibc lets it) counts here: its handlers keep the locks for ours of the
 * fork that opened the window. */
static unsigned fork_depth;

bool hm_fork_hold_nested(void)
{
    if (!fork_holds())
        return false;
    fork_depth++;
    return true;
}

void hm_fork_hold_begin(void)
{
    fork_pid = getpid();
    atomic_store_explicit(&fork_holder, (uintptr_t)pthread_self(), memory_order_relaxed);
}

bool hm_fork_hold_end(void)
{
    if (fork_depth) {
        fork_depth--;
        return false;
    }
    atomic_store_explicit(&fork_holder, 0, memory_order_relaxed);
    return true;
}

/* ---- registry of span segments ----------------------------------------- */

/* Every span segment, so a purger can reach segments of any thread. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hm_segment *registry;
/* Where the next hm_segment_purge_step goes on (NULL: at the start). */
static struct hm_segment *step_at;

static void registry_add(struct hm_segment *seg)
{
    hm_mutex_lock(&registry_lock);
    seg->all_prev = NULL;
    seg->all_next = registry;
    if (registry)
        registry->all_prev = seg;
    registry = seg;
    hm_mutex_unlock(&registry_lock);
}

static void registry_remove(struct hm_segment *seg)
{
    hm_mutex_lock(&registry_lock);
    if (step_at == seg)
        step_at = seg->all_next;
    if (seg->all_prev)
        seg->all_prev->all_next = seg->all_next;
    else
        registry = seg->all_next;
    if (seg->all_next)
        seg->all_next->all_prev = seg->all_prev;
    hm_mutex_unlock(&registry_lock);
}

void hm_segment_fork_prepare(void)
{
    hm_mutex_lock(&registry_lock);
}

void hm_segment_fork_release(void)
{
    hm_mutex_unlock(&registry_lock);
}

/* The page-state lock: held for a few bit operations by the owner, or for
 * the madvise calls of one purge (the owner then waits that long).  It
 * holds the process's fork generation while taken, 0 when free.  A
 * thread of the parent may hold one at the fork (an owner in a span call
 * or a purge takes it without any lock the fork's handlers take): the
 * child, which has no such thread, counts a lock taken in an older
 * generation as free, instead of spinning on it for ever (a child's
 * mallinfo2 hung there).  The segment is then one of a thread that is
 * gone, stopped between page-state updates of pages that hold no live
 * block; nothing has to visit every segment at the fork. */
_Atomic uint32_t hm_fork_generation = 1;

void hm_segment_fork_child(void)
{
    atomic_fetch_add_explicit(&hm_fork_generation, 1, memory_order_relaxed);
}

static bool seg_trylock(struct hm_segment *seg)
{
    uint32_t gen = atomic_load_explicit(&hm_fork_generation, memory_order_relaxed);
    uint32_t seen = atomic_load_explicit(&seg->lock, memory_order_relaxed);
    return seen != gen &&               /* free (0), or taken before a fork */
           atomic_compare_exchange_strong_explicit(&seg->lock, &seen, gen, memory_order_acquire,
                                                   memory_order_relaxed);
}

/* Its holder may be preempted, or in a purge's madvise: the waiter backs
 * off as the heap locks' do, or under SCHED_FIFO it spun until the
 * kernel's real-time throttling stopped it (0.8 s of CPU for one malloc
 * and free against a thread in malloc_trim on the same CPU). */
static void seg_lock(struct hm_segment *seg)
{
    for (unsigned spins = 0; !seg_trylock(seg); spins++) {
        /* A fork child's handler that runs before ours: a lock of a thread
         * the child does not have is free, as after our handler.  Asked
         * before the waiter starts to sleep (no thread of the child will
         * ever let it go), and again later. */
        if ((spins == 63 || spins == 1024) && fork_holds() && getpid() != fork_pid)
            atomic_fetch_add_explicit(&hm_fork_generation, 1, memory_order_relaxed);
        hm_lock_backoff(spins);
    }
}

static void seg_unlock(struct hm_segment *seg)
{
    atomic_store_explicit(&seg->lock, 0, memory_order_release);
}

/* dirty_since_ns is read without the lock as a hint (purge_all skips clean
 * segments), so its writes are atomic too.  Caller holds the lock. */
static void mark_dirty_since(struct hm_segment *seg, uint64_t now)
{
    if (!seg->dirty_since_ns)
        __atomic_store_n(&seg->dirty_since_ns, now, __ATOMIC_RELAXED);
}

static uint64_t clock_read(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t hm_clock_ns(void)
{
    return clock_read(CLOCK_MONOTONIC_COARSE);
}

uint64_t hm_clock_precise_ns(void)
{
    return clock_read(CLOCK_MONOTONIC);
}

/* Page bitmaps change under the segment lock, but hints read them without
 * it (hm_segment_has_dirty_run, the heap's span search): the stores are
 * atomic (relaxed), so those reads are not data races. */
static void set_pages(uint64_t *bits, uint64_t value)
{
    __atomic_store_n(bits, value, __ATOMIC_RELAXED);
}

/* Bits first .. first + count - 1. */
static uint64_t page_run(unsigned first, unsigned count)
{
    return (count >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << count) - 1)) << first;
}

/* Pages `run` may hold `bytes` (from each page's start) resident, or more,
 * as a span of class cls1 - 1 (0: none) left them or will. */
static void note_resident(struct hm_segment *seg, uint64_t run, size_t bytes, unsigned cls1)
{
    uint8_t os = (uint8_t)((bytes + HM_OS_PAGE - 1) / HM_OS_PAGE);
    for (; run; run &= run - 1) {
        unsigned i = (unsigned)__builtin_ctzll(run);
        if (os > seg->resident_os_pages[i])
            seg->resident_os_pages[i] = os;
        seg->last_class[i] = (uint8_t)cls1;
    }
}

/* Free pages `run` went back to the OS. */
static void forget_resident(struct hm_segment *seg, uint64_t run)
{
    for (; run; run &= run - 1) {
        unsigned i = (unsigned)__builtin_ctzll(run);
        seg->resident_os_pages[i] = 0;
        seg->last_class[i] = 0;
    }
}

/* ---- huge pages -------------------------------------------------------- */

/* A segment of a big heap asks for transparent huge pages: each 2 MiB half
 * is then faulted in at once on its first touch, one fault instead of 512,
 * and the program's accesses to it need one TLB entry instead of 512.  So
 * a span that takes pages of such a half makes all of it resident: its
 * other free pages count as dirty from then on, and decay like any freed
 * page.  A half with no span left goes back whole, in one call (the kernel
 * frees the huge page; the next touch gets a new one), and keeps asking.
 * A half given back in part while a span still uses it stops asking for
 * good: the kernel's background collapse (khugepaged) would otherwise fill
 * the given-back pages in again, and memory returned would come back
 * resident without anyone asking for it. */
#define HM_HUGE_PAGE       ((size_t)2 << 20)
#define HM_SEGMENT_HALVES  (HM_SEGMENT_SIZE / HM_HUGE_PAGE)
#define HM_HALF_PAGES      (unsigned)(HM_HUGE_PAGE / HM_PAGE_SIZE)

/* Where a segment's halves differ from each other or from its neighbours,
 * the kernel keeps separate areas for them (up to three a segment), and a
 * process may have vm.max_map_count (65530 by default) in all: past 4096
 * segments that asked, a new one stays on small pages, so that a heap of
 * hundreds of GiB cannot run the process out of areas. */
uint64_t hm_huge_segments_max = 4096;

static void huge_pages_ask(struct hm_segment *seg)
{
    if (atomic_fetch_add_explicit(&hm_segment_counters.huge_segments, 1, memory_order_relaxed) >=
            hm_huge_segments_max ||
        !hm_os_huge_pages(seg, HM_SEGMENT_SIZE, true)) {
        atomic_fetch_sub_explicit(&hm_segment_counters.huge_segments, 1, memory_order_relaxed);
        return;
    }
    seg->huge_asked = true;
    atomic_store_explicit(&seg->huge_halves, (1u << HM_SEGMENT_HALVES) - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&hm_segment_counters.huge_halves, HM_SEGMENT_HALVES,
                              memory_order_relaxed);
}

/* The segment is going away. */
static void huge_pages_forget(struct hm_segment *seg)
{
    if (!seg->huge_asked)
        return;
    unsigned halves = atomic_load_explicit(&seg->huge_halves, memory_order_relaxed);
    atomic_fetch_sub_explicit(&hm_segment_counters.huge_halves, (uint64_t)__builtin_popcount(halves),
                              memory_order_relaxed);
    atomic_fetch_sub_explicit(&hm_segment_counters.huge_segments, 1, memory_order_relaxed);
}

static uint64_t half_pages(unsigned i)
{
    return page_run(i * HM_HALF_PAGES, HM_HALF_PAGES);
}

/* The halves still asking for huge pages that hold any of `pages`. */
static unsigned asking_halves(const struct hm_segment *seg, uint64_t pages)
{
    unsigned halves = atomic_load_explicit(&seg->huge_halves, memory_order_relaxed), hit = 0;
    for (unsigned i = 0; halves && i < HM_SEGMENT_HALVES; i++)
        if ((halves >> i & 1) && (pages & half_pages(i)))
            hit |= 1u << i;
    return hit;
}

/* Pages `run` were taken (or the header written): the free pages of an
 * asking half they touch are resident now, and so are the taken pages
 * whole, however little their span carves (noted for when it goes: see
 * trim_inherited).  Caller holds the lock, or the segment is not shared
 * yet. */
static void huge_pages_touched(struct hm_segment *seg, uint64_t run)
{
    unsigned hit = asking_halves(seg, run);
    for (unsigned i = 0; hit; i++, hit >>= 1) {
        if (hit & 1)
            note_resident(seg, run & half_pages(i), HM_PAGE_SIZE, 0);
        uint64_t resident = (hit & 1) ? seg->free_pages & half_pages(i) & ~seg->dirty_pages : 0;
        if (resident) {
            note_resident(seg, resident, HM_PAGE_SIZE, 0);
            set_pages(&seg->dirty_pages, seg->dirty_pages | resident);
            mark_dirty_since(seg, hm_clock_ns());
        }
    }
}

/* Pages `gone` went back: an asking half that a span still uses stops. */
static void huge_pages_settle(struct hm_segment *seg, uint64_t gone)
{
    unsigned hit = asking_halves(seg, gone);
    uint64_t free_pages = __atomic_load_n(&seg->free_pages, __ATOMIC_RELAXED);
    for (unsigned i = 0; hit; i++, hit >>= 1) {
        uint64_t half = half_pages(i);
        if (!(hit & 1) || (free_pages & half) == half)
            continue;                        /* no span in it: stays huge */
        if (atomic_fetch_and_explicit(&seg->huge_halves, ~(1u << i), memory_order_relaxed) &
            (1u << i)) {
            hm_os_huge_pages((char *)seg + i * HM_HUGE_PAGE, HM_HUGE_PAGE, false);
            atomic_fetch_sub_explicit(&hm_segment_counters.huge_halves, 1, memory_order_relaxed);
        }
    }
}

void hm_segment_give_back(struct hm_segment *seg, void *p, size_t len)
{
    hm_os_advise(p, len, MADV_DONTNEED);
    size_t first = (size_t)((char *)p - (char *)seg) >> HM_PAGE_SHIFT;
    size_t last = (size_t)((char *)p + len - 1 - (char *)seg) >> HM_PAGE_SHIFT;
    huge_pages_settle(seg, page_run((unsigned)first, (unsigned)(last - first + 1)));
}

/* ---- page state and the decay purge ------------------------------------ */

void hm_count_purged(size_t bytes)
{
    HM_TRACE_PURGE(bytes);
    atomic_fetch_add_explicit(&hm_segment_counters.bytes_purged, bytes, memory_order_relaxed);
}

/* Free pages go into use (under the lock): no longer free, and no longer
 * dirty (in use, resident is right).  With the last dirty page goes the
 * age, or pages freed later would inherit it and go back too early. */
static void take_pages(struct hm_segment *seg, uint64_t run)
{
    set_pages(&seg->free_pages, seg->free_pages & ~run);
    set_pages(&seg->dirty_pages, seg->dirty_pages & ~run);
    if (!seg->dirty_pages)
        __atomic_store_n(&seg->dirty_since_ns, 0, __ATOMIC_RELAXED);
    huge_pages_touched(seg, run);
}

/* Gives back the segment's dirty free pages, once the oldest has waited
 * delay_ns, run by run until `budget` bytes went.  Caller holds the lock. */
static size_t purge_locked(struct hm_segment *seg, uint64_t now_ns, uint64_t delay_ns,
                           size_t budget)
{
    /* A clock read before another thread dirtied the segment is older
     * than its age: that is no age at all, not 2^64 ns. */
    uint64_t since = seg->dirty_since_ns;
    if (!since || now_ns < since || now_ns - since < delay_ns || !budget)
        return 0;
    uint64_t dirty = seg->dirty_pages & seg->free_pages;
    size_t bytes = 0;
    /* An asking half with no span goes whole, past the budget if need be:
     * giving back one huge page is one quick call, and a half given back in
     * steps would sit partly resident meanwhile (see huge pages). */
    unsigned hit = asking_halves(seg, dirty);
    for (unsigned i = 0; hit; i++, hit >>= 1) {
        uint64_t half = half_pages(i);
        if ((hit & 1) && (dirty & half) == half) {
            hm_segment_give_back(seg, (char *)seg + i * HM_HUGE_PAGE, HM_HUGE_PAGE);
            forget_resident(seg, half);
            bytes += HM_HUGE_PAGE;
            dirty &= ~half;
        }
    }
    while (dirty && bytes < budget) {
        unsigned first = (unsigned)__builtin_ctzll(dirty);
        uint64_t rest = ~(dirty >> first);
        unsigned run = rest ? (unsigned)__builtin_ctzll(rest) : 64 - first;
        size_t left = budget - bytes;       /* in pages, rounded up */
        left = left / HM_PAGE_SIZE + (left % HM_PAGE_SIZE != 0);
        if (run > left)
            run = (unsigned)left;
        hm_segment_give_back(seg, (char *)seg + (size_t)first * HM_PAGE_SIZE,
                             (size_t)run * HM_PAGE_SIZE);
        forget_resident(seg, page_run(first, run));
        bytes += (size_t)run * HM_PAGE_SIZE;
        dirty &= ~page_run(first, run);
    }
    /* Still dirty: the pages past the budget (their age stays, so the next
     * step takes them). */
    set_pages(&seg->dirty_pages, dirty);
    if (!dirty)
        __atomic_store_n(&seg->dirty_since_ns, 0, __ATOMIC_RELAXED);
    if (bytes)
        hm_count_purged(bytes);
    return bytes;
}

size_t hm_segment_purge(struct hm_segment *seg, uint64_t now_ns, uint64_t delay_ns,
                        size_t budget)
{
    if (!__atomic_load_n(&seg->dirty_since_ns, __ATOMIC_RELAXED))
        return 0;
    seg_lock(seg);
    size_t bytes = purge_locked(seg, now_ns, delay_ns, budget);
    seg_unlock(seg);
    return bytes;
}

static void unmap_waiting(void);

/* One segment of a pass over the registry (under registry_lock). */
static size_t purge_visit(struct hm_segment *seg, uint64_t now_ns, uint64_t delay_ns,
                          size_t budget)
{
    if (!__atomic_load_n(&seg->dirty_since_ns, __ATOMIC_RELAXED))
        return 0;
    /* A busy segment is its owner at work: try it next time. */
    if (!seg_trylock(seg))
        return 0;
    size_t bytes = purge_locked(seg, now_ns, delay_ns, budget);
    seg_unlock(seg);
    return bytes;
}

/* A pass over the registry from seg, at most `visits` segments, until
 * *bytes reach the budget; returns where it stopped (the segment it ran
 * out in), NULL at the end.  Under registry_lock. */
static struct hm_segment *purge_pass(struct hm_segment *seg, unsigned visits, uint64_t now_ns,
                                     uint64_t delay_ns, size_t budget, size_t *bytes)
{
    for (; seg && *bytes < budget && visits; visits--) {
        *bytes += purge_visit(seg, now_ns, delay_ns, budget - *bytes);
        if (*bytes >= budget)
            break;
        seg = seg->all_next;
    }
    return seg;
}

size_t hm_segment_purge_all(uint64_t now_ns, uint64_t delay_ns, size_t budget)
{
    size_t bytes = hm_large_cache_purge(now_ns, delay_ns, budget);
    hm_mutex_lock(&registry_lock);
    unmap_waiting();
    purge_pass(registry, UINT_MAX, now_ns, delay_ns, budget, &bytes);
    hm_mutex_unlock(&registry_lock);
    return bytes;
}

/* Each segment read is a cache and TLB miss: a process of 2 GiB has 512,
 * which one slow path read whole four times per delay. */
#define HM_PURGE_STEP_VISITS 64

bool hm_segment_purge_step(uint64_t now_ns, uint64_t delay_ns, size_t budget)
{
    size_t bytes = hm_large_cache_purge(now_ns, delay_ns, budget);
    hm_mutex_lock(&registry_lock);
    unmap_waiting();
    step_at = purge_pass(step_at ? step_at : registry, HM_PURGE_STEP_VISITS, now_ns, delay_ns,
                         budget, &bytes);
    bool unfinished = step_at != NULL;
    hm_mutex_unlock(&registry_lock);
    return unfinished;
}

/* ---- segments and spans ------------------------------------------------ */

void hm_segment_usage(struct hm_segment_usage *out)
{
    uint64_t used = 0, free_pages = 0, resident = 0;
    hm_mutex_lock(&registry_lock);
    for (struct hm_segment *seg = registry; seg; seg = seg->all_next) {
        seg_lock(seg);
        used += seg->pages_used;
        free_pages += (uint64_t)__builtin_popcountll(seg->free_pages);
        resident += (uint64_t)__builtin_popcountll(seg->free_pages & seg->dirty_pages);
        seg_unlock(seg);
    }
    hm_mutex_unlock(&registry_lock);
    out->span_bytes = used * HM_PAGE_SIZE;
    out->free_bytes = free_pages * HM_PAGE_SIZE;
    out->resident_free_bytes = resident * HM_PAGE_SIZE;
}

struct hm_segment *hm_segment_alloc(uintptr_t owner, bool huge)
{
    struct hm_segment *seg = (struct hm_segment *)hm_os_map(HM_SEGMENT_SIZE, HM_SEGMENT_SIZE, 0);
    if (!seg)
        return NULL;
    /* Before the header's first write, or its half would start on small
     * pages. */
    if (huge)
        huge_pages_ask(seg);
    /* Fresh mapping: already zero.  Only the header page is written. */
    seg->kind = HM_SEGMENT_SPANS;
    seg->free_pages = ~(uint64_t)1;         /* page 0 is the header */
    huge_pages_touched(seg, 1);             /* which faults in its half */
    atomic_store_explicit(&seg->owner, owner, memory_order_relaxed);
    for (unsigned i = 0; i < HM_SEGMENT_PAGES; i++)
        seg->page_span[i] = &hm_sentinel_span;
    atomic_store_explicit(&seg->lock, 0, memory_order_relaxed);
    registry_add(seg);
    hm_segmap_set((uintptr_t)seg, seg);
    hm_count_mapped((int64_t)HM_SEGMENT_SIZE);
    atomic_fetch_add_explicit(&hm_segment_counters.segments, 1, memory_order_relaxed);
    return seg;
}

/* Segments freed while a remote free was still announcing a span in them,
 * linked through `next`, under registry_lock: unmapped once it is done.
 * (A fork child keeps any whose announcer was a thread of the parent:
 * their count never falls there.) */
static struct hm_segment *unmap_later;

static void unmap_segment(struct hm_segment *seg)
{
    hm_os_unmap(seg, HM_SEGMENT_SIZE);
    hm_count_mapped(-(int64_t)HM_SEGMENT_SIZE);
    atomic_fetch_sub_explicit(&hm_segment_counters.segments, 1, memory_order_relaxed);
}

static bool announced_to(struct hm_segment *seg)
{
    return atomic_load_explicit(&seg->announcing, memory_order_acquire) != 0;
}

/* Under registry_lock. */
static void unmap_waiting(void)
{
    for (struct hm_segment **link = &unmap_later, *seg; (seg = *link);) {
        if (announced_to(seg)) {
            link = &seg->next;
            continue;
        }
        *link = seg->next;
        unmap_segment(seg);
    }
}

void hm_segment_free(struct hm_segment *seg)
{
    registry_remove(seg);           /* after any purge_all working on it */
    huge_pages_forget(seg);
    hm_segmap_set((uintptr_t)seg, NULL);
    /* Released spans left their pages 0; make sure before the address
     * range can go to someone else. */
    hm_pagemap_set((uintptr_t)seg, HM_SEGMENT_PAGES, 0);
    /* An announcer reads only the header: the rest goes back now, so a
     * segment that waits on the list holds no free pages resident. */
    if (announced_to(seg))
        hm_os_advise((char *)seg + HM_PAGE_SIZE, HM_SEGMENT_SIZE - HM_PAGE_SIZE, MADV_DONTNEED);
    hm_mutex_lock(&registry_lock);
    unmap_waiting();
    if (announced_to(seg)) {
        seg->next = unmap_later;
        unmap_later = seg;
        seg = NULL;
    }
    hm_mutex_unlock(&registry_lock);
    if (seg)
        unmap_segment(seg);
}

bool hm_segment_is_empty(const struct hm_segment *seg)
{
    return seg->pages_used == 0;
}

/* First run of `pages` free pages (not page 0, the header), or -1.  Bit i
 * of `starts` stays set while pages i .. i + k are free: one AND per page
 * of the run, where a scan tested every start (most spans take 1-4 pages,
 * and a refill that needs a new span asks each segment of its heap). */
static int find_free_run(uint64_t free_pages, unsigned pages)
{
    uint64_t starts = free_pages & ~(uint64_t)1;
    for (unsigned k = 1; k < pages && starts; k++)
        starts &= free_pages >> k;
    return starts ? __builtin_ctzll(starts) : -1;
}

static char *page_address(struct hm_segment *seg, unsigned page)
{
    return (char *)seg + (size_t)page * HM_PAGE_SIZE;
}

/* The page-map word of the span's pages (0 unless a heap owns it). */
static uintptr_t span_tag(const struct hm_span *sp)
{
    return hm_page_tag(hm_span_owner(sp), sp->bin_offset);
}

bool hm_segment_has_dirty_run(const struct hm_segment *seg, unsigned pages)
{
    uint64_t free_pages = __atomic_load_n(&seg->free_pages, __ATOMIC_RELAXED);
    uint64_t dirty = __atomic_load_n(&seg->dirty_pages, __ATOMIC_RELAXED);
    return find_free_run(free_pages & dirty, pages) >= 0;
}

/* A span carves its blocks from its start, as they are asked for, and
 * never uses the tail its last block leaves (up to 31% of a span of
 * 8-128 KiB blocks).  On pages an earlier span left resident, both stay
 * resident and unused: the tail for as long as the span lives, and what
 * lies past its first carves until it gets that far, which a heap that
 * needs a few blocks of a class may never do (larson: a third of its
 * resident memory, a thread's 32 classes moving between pages as threads
 * come and go).
 *
 * So a new span gives back what it inherited in its tail.  A span of
 * many small blocks gives back all it inherited past its first
 * HM_TRIM_KEEP bytes, unless the page's last span was of the same class:
 * the heap that released it (a producer whose blocks all come back) is
 * likely to carve as far again.  Either way only HM_TRIM_MIN or more (a
 * call for less costs more than it saves), and nothing in a half asking
 * for huge pages (resident whole anyway).  Caller holds the lock; returns
 * the range to give back once it is let go, from the segment's start. */
#define HM_TRIM_KEEP   ((size_t)8 << 10)
#define HM_TRIM_MIN    ((size_t)16 << 10)
#define HM_TRIM_BLOCKS 32u      /* spans of at least this many blocks */
struct trim {
    size_t from, len;
};

static struct trim trim_inherited(struct hm_segment *seg, unsigned at, unsigned pages,
                                  unsigned cls, uint32_t block_size)
{
    struct trim t = { 0, 0 };
    size_t base = (size_t)at * HM_PAGE_SIZE, bytes = (size_t)pages * HM_PAGE_SIZE;
    if (asking_halves(seg, page_run(at, pages)))
        return t;
    size_t end = 0;
    for (unsigned j = at; j < at + pages; j++)
        if (seg->resident_os_pages[j])
            end = (size_t)j * HM_PAGE_SIZE + (size_t)seg->resident_os_pages[j] * HM_OS_PAGE;
    size_t from = base + hm_round_up(bytes / block_size * block_size, HM_OS_PAGE);
    if ((size_t)block_size * HM_TRIM_BLOCKS <= bytes && seg->last_class[at] != cls + 1)
        from = base + HM_TRIM_KEEP;
    if (end < from + HM_TRIM_MIN)
        return t;
    /* What stays resident: up to `from`. */
    for (unsigned j = at; j < at + pages; j++) {
        size_t page = (size_t)j * HM_PAGE_SIZE;
        size_t keep = from > page ? (from - page) / HM_OS_PAGE : 0;
        if (seg->resident_os_pages[j] > keep)
            seg->resident_os_pages[j] = (uint8_t)keep;
    }
    t.from = from;
    t.len = end - from;
    return t;
}

/* OS pages from a new span's start that are resident, as the segment
 * notes them (see HM_CARVE_BYTES: carving there costs no page faults): as
 * far as earlier spans carved, less what went back since, and all of a
 * page in a half asking for huge pages (take_pages noted it whole).  It is
 * the upper bound trim_inherited needs: a released page block counts
 * whole however little the program touched, and pages a compaction gave
 * back count until the purge; an over-count costs a few page faults in
 * one refill, as before the bound.  Caller holds the lock, after
 * take_pages and trim_inherited. */
static uint16_t resident_from(const struct hm_segment *seg, unsigned at, unsigned pages)
{
    const unsigned per_page = HM_PAGE_SIZE / HM_OS_PAGE;
    unsigned n = 0;
    for (unsigned j = at; j < at + pages; j++) {
        n += seg->resident_os_pages[j];
        if (seg->resident_os_pages[j] < per_page)
            break;
    }
    return (uint16_t)n;
}

struct hm_span *hm_span_alloc(struct hm_segment *seg, unsigned pages, unsigned cls,
                              uint32_t block_size, uintptr_t owner, uint32_t bin_offset)
{
    seg_lock(seg);
    /* Pages still resident from a released span first: reusing them costs
     * no page faults and leaves no resident hole behind. */
    int at = find_free_run(seg->free_pages & seg->dirty_pages, pages);
    if (at < 0)
        at = find_free_run(seg->free_pages, pages);
    if (at < 0) {
        seg_unlock(seg);
        return NULL;
    }
    take_pages(seg, page_run((unsigned)at, pages));
    seg->pages_used += pages;
    struct trim trim = trim_inherited(seg, (unsigned)at, pages, cls, block_size);
    uint16_t resident = resident_from(seg, (unsigned)at, pages);
    seg_unlock(seg);
    if (trim.len) {
        hm_segment_give_back(seg, (char *)seg + trim.from, trim.len);
        hm_count_purged(trim.len);
    }

    struct hm_span *sp = &seg->spans[at];
    char *start = page_address(seg, (unsigned)at);
    size_t bytes = (size_t)pages * HM_PAGE_SIZE;
    sp->size_class = cls;
    sp->block_size = block_size;
    sp->block_recip = hm_block_recip(block_size);
    sp->start = start;
    sp->capacity = (uint32_t)(bytes / block_size);
    sp->page_index = (uint8_t)at;
    sp->pages = (uint8_t)pages;
    sp->bin_offset = bin_offset;
    atomic_store_explicit(&sp->remote, 0, memory_order_relaxed);
    sp->remote_tail = NULL;
    sp->pending_next = NULL;
    sp->free = NULL;
    sp->bump = start;
    sp->end = start + (size_t)sp->capacity * block_size;
    sp->used = 0;
    sp->holes = 0;
    sp->sparse_since_ns = 0;
    sp->freed_since_compact = 0;
    sp->in_partial = 0;
    sp->resident_pages = resident;
    sp->next = sp->prev = NULL;
    for (unsigned i = 0; i < pages; i++)
        seg->page_span[at + (int)i] = sp;
    hm_span_set_owner(sp, owner);
    return sp;
}

bool hm_span_resize(struct hm_segment *seg, struct hm_span *sp, unsigned pages)
{
    unsigned at = sp->page_index, old = sp->pages;
    if (pages == old)
        return true;
    if (at + pages > HM_SEGMENT_PAGES)
        return false;
    if (pages > old) {
        uint64_t run = page_run(at + old, pages - old);
        seg_lock(seg);
        bool room = (seg->free_pages & run) == run;
        if (room) {
            take_pages(seg, run);
            seg->pages_used += pages - old;
        }
        seg_unlock(seg);
        if (!room)
            return false;
        for (unsigned i = at + old; i < at + pages; i++)
            seg->page_span[i] = sp;
        hm_pagemap_set((uintptr_t)page_address(seg, at + old), pages - old, span_tag(sp));
    } else {
        hm_pagemap_set((uintptr_t)page_address(seg, at + pages), old - pages, 0);
        for (unsigned i = at + pages; i < at + old; i++)
            seg->page_span[i] = &hm_sentinel_span;
        uint64_t run = page_run(at + pages, old - pages), now = hm_clock_ns();
        seg_lock(seg);
        note_resident(seg, run, HM_PAGE_SIZE, 0);
        set_pages(&seg->free_pages, seg->free_pages | run);
        set_pages(&seg->dirty_pages, seg->dirty_pages | run);
        mark_dirty_since(seg, now);
        seg->pages_used -= old - pages;
        seg_unlock(seg);
    }
    sp->pages = (uint8_t)pages;
    sp->block_size = (uint32_t)(pages * HM_PAGE_SIZE);
    sp->block_recip = hm_block_recip(sp->block_size);
    sp->end = sp->start + sp->block_size;
    sp->bump = sp->end;
    return true;
}

void hm_span_set_owner(struct hm_span *sp, uintptr_t owner)
{
    atomic_store_explicit(&sp->owner, owner, memory_order_relaxed);
    hm_pagemap_set((uintptr_t)sp->start, sp->pages, span_tag(sp));
}

void hm_span_release(struct hm_segment *seg, struct hm_span *sp)
{
    if (sp->holes)
        memset(hm_span_holes(sp), 0, sizeof seg->hole_bits[0]);
    unsigned at = sp->page_index, pages = sp->pages;
    hm_span_set_owner(sp, HM_OWNER_SENTINEL);
    for (unsigned i = 0; i < pages; i++)
        seg->page_span[at + i] = &hm_sentinel_span;
    uint64_t run = page_run((unsigned)at, pages);
    uint64_t now = hm_clock_ns();
    size_t carved = (size_t)(sp->bump - sp->start);
    seg_lock(seg);
    /* Carved from the start: whole pages, then what the last one got. */
    for (unsigned j = 0; j < pages; j++) {
        size_t in_page = carved > (size_t)j * HM_PAGE_SIZE ? carved - (size_t)j * HM_PAGE_SIZE : 0;
        note_resident(seg, page_run(at + j, 1), in_page < HM_PAGE_SIZE ? in_page : HM_PAGE_SIZE,
                      sp->size_class + 1);
    }
    set_pages(&seg->free_pages, seg->free_pages | run);
    set_pages(&seg->dirty_pages, seg->dirty_pages | run);
    mark_dirty_since(seg, now);
    seg->pages_used -= pages;
    seg_unlock(seg);
}
