/* Per-thread heaps: set-up, spans from segments, thread exit, and handing
 * the segments of exited threads to the threads that still run. */
#define _GNU_SOURCE
#include "heap_internal.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../diag/diag.h"
#include "../process/process.h"

/* Heaps live in chunks of memory mapped for them and are recycled, never
 * unmapped: a heap id must not be reused while a span still names it, and
 * exit abandons every span before the heap goes back to the pool.  A
 * remote free may still store into a heap whose thread is gone (see
 * hint_owner), so its memory stays mapped for good. */
#define HEAP_CHUNK (256 * 1024)
#define HEAP_BYTES hm_round_up(sizeof(struct hm_heap), HM_HEAP_ALIGN)
_Static_assert(sizeof(struct hm_heap) <= (20 << 10), "a heap is 20 KiB (README, docs/contracts.md)");

static pthread_mutex_t heaps_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hm_heap *heaps_live;
/* Exited threads' heaps for the next threads, most recently exited first
 * (linked through next_free and prev_free).  Those free for the purge
 * delay give their pages back and wait in heaps_released instead (see
 * heaps_free_decay): a server whose 500 threads ended kept 10 MiB of
 * their heaps.  All under heaps_lock. */
static struct hm_heap *heaps_free, *heaps_free_last;
static uint64_t heaps_free_count;
#define HEAPS_RELEASED_MAX 4096
static struct hm_heap *heaps_released[HEAPS_RELEASED_MAX];
static unsigned heaps_released_count;
static uint64_t heaps_released_ever;
static char *heap_chunk_next, *heap_chunk_end;
static uint64_t threads_exited;
static uint64_t heaps_tidied;             /* under heaps_lock */
static uint64_t heaps_orphaned;           /* exited for a gone thread (orphan_exit) */
/* In a fork child, the heaps of the parent's other threads that no slow
 * path held at the fork, whose segments the child has not given up yet
 * (see hm_refill_fork_child), linked through next_free (under heaps_lock). */
static struct hm_heap *heaps_forked;
static _Atomic uint64_t threads_live;

uint64_t hm_heap_live_count(void)
{
    return atomic_load_explicit(&threads_live, memory_order_relaxed);
}

/* Totals of heaps that have exited, so reports keep their counts. */
static struct hm_heap_class_stats retired[HM_NUM_CLASSES + 1];

/* Segments of exited threads that still hold live blocks: a stack, newest
 * on top (or one a sweep found at least half free: see adopt_segment),
 * doubly linked (`next`, `prev`) so that a segment can leave it from
 * anywhere (a thread that frees into it takes it over).  Under
 * abandoned_lock. */
static pthread_mutex_t abandoned_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hm_segment *abandoned;
static struct hm_segment *sweep_cursor;   /* where the next sweep starts; NULL: the top */
static uint64_t segments_abandoned, segments_adopted, segments_swept;

static void abandoned_push(struct hm_segment *seg)
{
    seg->prev = NULL;
    seg->next = abandoned;
    if (abandoned)
        abandoned->prev = seg;
    seg->on_abandoned = true;
    __atomic_store_n(&abandoned, seg, __ATOMIC_RELAXED);   /* read unlocked as a hint */
}

static void abandoned_unlink(struct hm_segment *seg)
{
    if (seg->prev)
        seg->prev->next = seg->next;
    else
        __atomic_store_n(&abandoned, seg->next, __ATOMIC_RELAXED);
    if (seg->next)
        seg->next->prev = seg->prev;
    if (seg == sweep_cursor)
        sweep_cursor = seg->next;
    seg->next = seg->prev = NULL;
    seg->on_abandoned = false;
}

static pthread_key_t thread_exit_key;

static void on_thread_exit(void *arg)
{
    hm_thread_exit(arg);
}

void hm_refill_module_init(void)
{
    hm_free_key_init();
    if (pthread_key_create(&thread_exit_key, on_thread_exit) != 0)
        hm_fatal("malloc", "cannot create the thread-exit key", NULL);
}

static void free_unlink(struct hm_heap *h)
{
    if (h->prev_free)
        h->prev_free->next_free = h->next_free;
    else
        heaps_free = h->next_free;
    if (h->next_free)
        h->next_free->prev_free = h->prev_free;
    else
        heaps_free_last = h->prev_free;
    heaps_free_count--;
}

static void free_push(struct hm_heap *h)
{
    h->freed_ns = hm_clock_ns();
    h->prev_free = NULL;
    h->next_free = heaps_free;
    if (heaps_free)
        heaps_free->prev_free = h;
    else
        heaps_free_last = h;
    heaps_free = h;
    heaps_free_count++;
}

/* Heaps free for the delay give their pages back, the longest free
 * first, within `budget`, in which each counts its bytes given back, as a
 * purge counts them (a system call of 2.5-5 us); returns the cost.  Their
 * memory then reads as zero, as a new heap's: a stash's count is zero,
 * which it was at the exit anyway.  A remote free's late hint (see
 * hint_owner) may fault one page back in.  A heap the OS would not give
 * back (locked memory) stays on the list, as if freed now.  Under
 * heaps_lock, as the tidying steps that call it are. */
static size_t heaps_free_decay(uint64_t delay_ns, size_t budget)
{
    size_t done = 0;
    uint64_t now = hm_clock_ns();
    while (done < budget && heaps_released_count < HEAPS_RELEASED_MAX) {
        struct hm_heap *h = heaps_free_last;
        if (!h || now < h->freed_ns || now - h->freed_ns < delay_ns)
            break;
        free_unlink(h);
        done += HEAP_BYTES;
        if (!hm_os_advise(h, HEAP_BYTES, MADV_DONTNEED)) {
            free_push(h);
            break;
        }
        heaps_released[heaps_released_count++] = h;
        heaps_released_ever++;
    }
    return done;
}

/* A free heap still resident first, then one whose pages went back (as
 * cheap as a new one, and no new address space), then a new one. */
static struct hm_heap *heap_take(void)
{
    struct hm_heap *h = heaps_free;
    if (h) {
        free_unlink(h);
        return h;
    }
    if (heaps_released_count)
        return heaps_released[--heaps_released_count];
    if (heap_chunk_next + sizeof *h > heap_chunk_end) {
        char *c = mmap(NULL, HEAP_CHUNK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (c == MAP_FAILED)
            return NULL;
        heap_chunk_next = c;
        heap_chunk_end = c + HEAP_CHUNK;
    }
    h = (struct hm_heap *)heap_chunk_next;
    /* Heap ids (addresses) are multiples of HM_HEAP_ALIGN: page-map tags
     * carry a bin offset in the low bits. */
    heap_chunk_next += HEAP_BYTES;
    return h;
}

/* Onto the registry's list of live heaps (under heaps_lock). */
static void live_push(struct hm_heap *h)
{
    h->prev_live = NULL;
    h->next_live = heaps_live;
    if (heaps_live)
        heaps_live->prev_live = h;
    heaps_live = h;
}

struct hm_heap *hm_heap_attach(struct hm_tcache *tc)
{
    if (!hm_process_init())
        return NULL;
    if (tc->heap)                      /* set up by a re-entrant call */
        return tc->heap;
    pid_t tid = tc != &hm_exited_tcache ? gettid() : 0, pid = getpid();
    hm_mutex_lock(&heaps_lock);
    struct hm_heap *h = heap_take();
    if (h) {
        /* Not remote_hint (see there), nor the stashes (the last member,
         * half the heap): a new heap's memory is fresh and zero, and a
         * heap goes back to the free list only after its thread's exit
         * emptied every stash.  Their pages are then touched only by the
         * classes that use them. */
        memset(h, 0, offsetof(struct hm_heap, remote_hint));
        h->id = (uintptr_t)h;
        h->tid = tid;
        h->pid = pid;
        live_push(h);
        if (tc != &hm_exited_tcache)        /* no thread's */
            atomic_fetch_add_explicit(&threads_live, 1, memory_order_relaxed);
    }
    hm_mutex_unlock(&heaps_lock);
    if (!h)
        return NULL;
    /* The bins are empty with no room (a new thread's are zero; an exited
     * one's were reset): a class's first refill (or a free into it before
     * that) sets its cap, so a thread pays only for the classes it uses. */
    tc->heap = h;
    tc->key = hm_free_key;
    tc->owner = h->id;
    /* May allocate (keys past the first 32): the cache already works. */
    if (tc != &hm_exited_tcache)
        pthread_setspecific(thread_exit_key, tc);
    return h;
}

/* A key destructor that runs after ours may still allocate (glibc runs
 * them in rounds, and ours is among the first keys: any library's that
 * allocates does so after it).  Its thread's heap is gone, and a new one
 * might never be exited: glibc runs at most PTHREAD_DESTRUCTOR_ITERATIONS
 * rounds, and which round this is cannot be told from inside one.  So
 * exited threads allocate from one heap for them all, under a mutex, with
 * a thread cache that is no thread's: static, so that reports read it
 * safely.  Their frees go to it as remote frees, like any exited
 * thread's.  (A heap for each such allocation, given back after it, cost
 * 1.3 us a malloc; one kept until the next round leaked when the thread's
 * first allocation came in a destructor, which glibc's last round did not
 * follow.) */
struct hm_tcache hm_exited_tcache;

/* Its lock, which the thread that holds it may take again: from an abort
 * handler after a diagnostic under it, or a signal handler (as
 * hm_heap_lock lets its owner re-enter).  One CAS takes it, so no signal
 * finds it half taken (a signal inside pthread_mutex_lock of a recursive
 * mutex, before it noted its owner, left the handler waiting for ever). */
static _Atomic uintptr_t exited_holder;     /* pthread_self() of the holder; 0: free */
static unsigned exited_depth;               /* the holder's re-entries */

void hm_exited_lock(void)
{
    uintptr_t self = (uintptr_t)pthread_self();
    for (unsigned spins = 0;; spins++) {
        uintptr_t seen = 0;
        if (atomic_compare_exchange_strong_explicit(&exited_holder, &seen, self,
                                                    memory_order_acquire, memory_order_relaxed))
            return;
        if (seen == self) {
            exited_depth++;
            return;
        }
        hm_lock_backoff(spins);
    }
}

void hm_exited_unlock(void)
{
    if (exited_depth)
        exited_depth--;
    else
        atomic_store_explicit(&exited_holder, 0, memory_order_release);
}

/* ---- segments ---------------------------------------------------------- */

/* A heap's segments are listed by room: those with two free pages or more
 * first, then those with one, then the full ones.  A walk for room
 * (new_span) stops at the first segment with too little, and one for free
 * pages to purge (hm_heap_purge) at the first full one: a big heap is
 * mostly segments full of long-lived blocks, and reading each one's header
 * is a cache and TLB miss (a 2 GiB heap: 512 of them at every new span and
 * purge step).  Segments of two-page spans never fill: 31 spans leave one
 * of 63 pages, which only a one-page span can use.  A segment joins at the
 * head of its part of the list, and moves when a span alloc, release or
 * resize changes its room.  Only the heap's owner allocates spans in its
 * segments, and releases go through span_release under the heap's lock,
 * so the order holds; were it off, a segment with room behind one with
 * less would only be passed over until its room next changed. */
static void list_insert(struct hm_heap *h, struct hm_segment *seg)
{
    unsigned room = hm_segment_room(seg);
    struct hm_segment *at = room == 2 ? h->segments : room == 1 ? h->segments_full : NULL;
    /* Before `at`, or at the tail. */
    seg->next = at;
    seg->prev = at ? at->prev : h->segments_last;
    if (seg->prev)
        seg->prev->next = seg;
    else
        h->segments = seg;
    if (at)
        at->prev = seg;
    else
        h->segments_last = seg;
    if (room == 0 && !h->segments_full)
        h->segments_full = seg;
}

static void list_remove(struct hm_heap *h, struct hm_segment *seg)
{
    if (h->purge_at == seg)
        h->purge_at = seg->next;
    if (h->segments_full == seg)
        h->segments_full = seg->next;
    if (seg->prev)
        seg->prev->next = seg->next;
    else
        h->segments = seg->next;
    if (seg->next)
        seg->next->prev = seg->prev;
    else
        h->segments_last = seg->prev;
    seg->next = seg->prev = NULL;
}

static bool is_drained(const struct hm_segment *seg)
{
    return atomic_load_explicit(&seg->owner, memory_order_relaxed) & HM_OWNER_DRAIN;
}

/* A segment that joins the heap may hold remote frees announced while it
 * had another owner, or none (see remote_hint). */
static void segment_link(struct hm_heap *h, struct hm_segment *seg)
{
    atomic_store_explicit(&h->remote_hint, 1, memory_order_relaxed);
    h->segments_drained += is_drained(seg);
    list_insert(h, seg);
}

static void segment_unlink(struct hm_heap *h, struct hm_segment *seg)
{
    h->segments_drained -= is_drained(seg);
    list_remove(h, seg);
}

void hm_heap_segment_changed(struct hm_heap *h, struct hm_segment *seg, unsigned old_room)
{
    if (hm_segment_room(seg) != old_room) {
        list_remove(h, seg);
        list_insert(h, seg);
    }
}

/* Empty segments kept process-wide for the next thread that needs one: a
 * program that starts and ends threads all the time would otherwise map,
 * fault in and unmap a segment per thread.  Their free pages decay like
 * any others (the registry still lists them). */
#define EMPTY_POOL_MAX 2
static struct hm_segment *empty_pool;
static unsigned empty_count;

static void empty_pool_put(struct hm_segment *seg)
{
    hm_mutex_lock(&abandoned_lock);
    if (empty_count < EMPTY_POOL_MAX) {
        atomic_store_explicit(&seg->owner, HM_OWNER_ABANDONED, memory_order_relaxed);
        seg->pooled_ns = hm_clock_ns();
        seg->next = empty_pool;
        __atomic_store_n(&empty_pool, seg, __ATOMIC_RELAXED);
        empty_count++;
        seg = NULL;
    }
    hm_mutex_unlock(&abandoned_lock);
    if (seg)
        hm_segment_free(seg);
}

static struct hm_segment *empty_pool_take(void)
{
    if (!__atomic_load_n(&empty_pool, __ATOMIC_RELAXED))
        return NULL;
    hm_mutex_lock(&abandoned_lock);
    struct hm_segment *seg = empty_pool;
    if (seg) {
        __atomic_store_n(&empty_pool, seg->next, __ATOMIC_RELAXED);
        empty_count--;
    }
    hm_mutex_unlock(&abandoned_lock);
    return seg;
}

/* The pool's segments empty for the purge delay go back whole, header
 * and all: their free pages were purged already, but each kept its
 * header's pages and its page-map words (thread_churn's idle RSS with the
 * ACE thread, 1.74 MiB against glibc's 1.69).  The clock is read under
 * the lock: one read before it could be older than a segment pooled
 * meanwhile, which would then look pooled for ages. */
static void empty_pool_decay(uint64_t delay_ns)
{
    if (!__atomic_load_n(&empty_pool, __ATOMIC_RELAXED))
        return;
    struct hm_segment *old = NULL;
    hm_mutex_lock(&abandoned_lock);
    uint64_t now = hm_clock_ns();
    struct hm_segment *keep = NULL, **tail = &keep;
    for (struct hm_segment *seg = empty_pool, *next; seg; seg = next) {
        next = seg->next;
        if (now >= seg->pooled_ns && now - seg->pooled_ns >= delay_ns) {
            empty_count--;
            seg->next = old;
            old = seg;
        } else {
            *tail = seg;
            tail = &seg->next;
        }
    }
    *tail = NULL;
    __atomic_store_n(&empty_pool, keep, __ATOMIC_RELAXED);    /* read unlocked as a hint */
    hm_mutex_unlock(&abandoned_lock);
    while (old) {
        struct hm_segment *seg = old;
        old = seg->next;
        hm_segment_free(seg);
    }
}

/* An empty segment joins the heap's reserve (its pages decay like any free
 * page), up to HM_HEAP_RESERVE; beyond, the process pool or the OS takes
 * it at once.  Keeping more until they decay would save page faults when
 * a live set shrinks and grows again, but a thread whose burst of frees
 * ends in idleness runs no slow path to purge them: without the ACE
 * thread, that memory would stay resident for as long as it idles. */
void hm_heap_segment_emptied(struct hm_heap *h, struct hm_segment *seg)
{
    segment_unlink(h, seg);
    if (h->reserve_count < HM_HEAP_RESERVE) {
        seg->next = h->reserve;
        h->reserve = seg;
        h->reserve_count++;
        return;
    }
    empty_pool_put(seg);
}

/* The heap's empty segments: to the process pool (thread exit), or back
 * to the OS (trim). */
void hm_heap_release_reserve(struct hm_heap *h, bool unmap)
{
    while (h->reserve) {
        struct hm_segment *seg = h->reserve;
        h->reserve = seg->next;
        if (unmap)
            hm_segment_free(seg);
        else
            empty_pool_put(seg);
    }
    h->reserve_count = 0;
}

/* Takes over a segment of an exited thread: its spans become ours, and
 * those with blocks to hand out join our partial lists; or, to drain it
 * (see hm_heap_reclaim), ours tagged HM_OWNER_DRAIN, on no list. */
static void adopt(struct hm_heap *h, struct hm_segment *seg, bool drain)
{
    uintptr_t owner = drain ? h->id | HM_OWNER_DRAIN : h->id;
    atomic_store_explicit(&seg->owner, owner, memory_order_relaxed);
    segment_link(h, seg);
    for (unsigned i = 1; i < HM_SEGMENT_PAGES; i++) {
        struct hm_span *sp = seg->page_span[i];
        if (sp != &seg->spans[i])
            continue;
        hm_span_set_owner(sp, owner);
        if (!drain && (sp->free || sp->holes || sp->bump < sp->end))
            hm_partial_push(h, sp);
    }
}

/* Threads adopt segments of exited threads only when out of room, the
 * top of the stack first, and only an owner collects the frees other
 * threads made into a segment: a segment left deep in the stack, emptied
 * by such frees, would keep its memory for good.  A sweep collects them
 * in place, under the stack's lock (no adopter takes the segment
 * meanwhile), and gives back the spans they emptied.  At most `most`
 * segments with frees waiting, each a pass over its announced spans, and
 * HM_SWEEP_VISITS looked at for each: a slow path's purge and each
 * adoption sweep 2 (a few tens of microseconds, like the rest of their
 * work: all 400 of a test at once held a malloc for 16 ms), the ACE
 * thread 16 a pass, malloc_trim all.  Each sweep goes on down the stack
 * where the last one stopped, so every segment's turn comes.
 *
 * A segment a sweep leaves at least half free goes to the top, for the
 * next adopter, before a segment just abandoned, full of its thread's
 * blocks.  Workers that each hand half their blocks on to later ones and
 * exit abandon a few segments each, which those later frees empty: swept
 * at the purge's pace alone (a couple a quarter of the delay) and from the
 * top, where each exit pushes more, the emptied ones were out of reach,
 * and each thread mapped about half a megabyte more, for good (2.4 GB
 * after 5000 threads, 480 MB resident; now 420 MB mapped after 20,000 and
 * 130 MB resident).  Sweeping at each adoption ties the pace to demand.
 *
 * A segment left empty goes to the pool or the OS once its free pages
 * were purged (unmapping 4 MiB of resident pages costs about half a
 * millisecond; the purge gives them back in steps, and an adopter may
 * reuse them meanwhile), or at once for malloc_trim (`now`). */
#define HM_SWEEP_STEP   2
#define HM_SWEEP_PASS   16
#define HM_SWEEP_VISITS 16

static bool mostly_free(const struct hm_segment *seg)
{
    uint64_t free_pages = __atomic_load_n(&seg->free_pages, __ATOMIC_RELAXED);
    return (unsigned)__builtin_popcountll(free_pages) >= HM_SEGMENT_PAGES / 2;
}

/* The top abandoned segment, for a heap out of room; then a sweep step,
 * which readies the top for the next adopter.  Not before: the adopter
 * collects its segment's frees itself, and goes on to the next one if
 * they empty it (the empty segment goes to its reserve), where a sweep
 * first left that segment empty at the top, to be adopted as such, and
 * the empty segments below it stayed there until purged: short-lived
 * threads that each handed one block on held 17 segments instead of 5. */
static struct hm_segment *adopt_segment(struct hm_heap *h)
{
    if (!__atomic_load_n(&abandoned, __ATOMIC_RELAXED))
        return NULL;
    hm_mutex_lock(&abandoned_lock);
    struct hm_segment *seg = abandoned;
    if (seg) {
        abandoned_unlink(seg);
        segments_adopted++;
    }
    hm_mutex_unlock(&abandoned_lock);
    if (seg)
        adopt(h, seg, false);
    hm_abandoned_sweep(HM_SWEEP_STEP, false);
    return seg;
}

void hm_abandoned_sweep(unsigned most, bool now)
{
    if (!__atomic_load_n(&abandoned, __ATOMIC_RELAXED))
        return;
    uint64_t collected[HM_NUM_CLASSES + 1] = { 0 };
    struct hm_segment *emptied = NULL, *seg, *next;
    unsigned swept = 0;
    hm_mutex_lock(&abandoned_lock);
    unsigned visits = now ? UINT_MAX : most * HM_SWEEP_VISITS;
    seg = now || !sweep_cursor ? abandoned : sweep_cursor;
    for (; seg && swept < most && visits; seg = next, visits--) {
        next = seg->next;
        bool pending = atomic_load_explicit(&seg->pending, memory_order_relaxed);
        if (pending) {
            hm_segment_collect_abandoned(seg, collected);
            swept++;
        }
        if (hm_segment_is_empty(seg) && (now || !hm_segment_has_dirty_run(seg, 1))) {
            abandoned_unlink(seg);
            seg->next = emptied;
            emptied = seg;
            segments_swept++;
        } else if (pending && mostly_free(seg) && seg != abandoned) {
            abandoned_unlink(seg);
            abandoned_push(seg);
        }
    }
    sweep_cursor = seg;
    hm_mutex_unlock(&abandoned_lock);
    while ((seg = emptied)) {
        emptied = seg->next;
        empty_pool_put(seg);
    }
    if (!swept)
        return;
    hm_mutex_lock(&heaps_lock);            /* not under abandoned_lock: fork's order */
    for (unsigned c = 0; c <= HM_NUM_CLASSES; c++)
        retired[c].remote_frees += collected[c];
    hm_mutex_unlock(&heaps_lock);
}

/* The most one call gives back: 64 OS pages, a few tens of microseconds
 * (a purge costs about a microsecond a page, several in a VM), so the
 * malloc that runs it is not one a server's slowest request waits on for
 * milliseconds.  Steps come every 64 slow paths of the thread (refills,
 * page blocks, flushes), every 8 while they fall behind (the ACE thread,
 * when on, takes everything at once). */
#define HM_PURGE_STEP ((size_t)256 << 10)

static _Atomic bool global_unfinished;      /* purge_all's last step ran out */

static void abandon_still_drained(struct hm_heap *h, uint64_t now, uint64_t delay_ns);

/* The segments of a list (the heap's reserve, linked through `next`)
 * purged until the step is done; returns the bytes done so far. */
static size_t purge_list(struct hm_segment *seg, uint64_t now, uint64_t delay_ns, size_t done)
{
    for (; seg && done < HM_PURGE_STEP; seg = seg->next)
        done += hm_segment_purge(seg, now, delay_ns, HM_PURGE_STEP - done);
    return done;
}

/* The heap's own segments with free pages, from where the last step
 * stopped, at most HM_PURGE_VISITS a step: a step's cost does not grow
 * with the heap (a heap of 512 segments that each keep a page free read
 * all their headers every 64 slow paths).  Past the last of them, the
 * next step starts over. */
#define HM_PURGE_VISITS 16

static size_t purge_own(struct hm_heap *h, uint64_t now, uint64_t delay_ns, size_t done)
{
    if (done >= HM_PURGE_STEP)
        return done;
    struct hm_segment *seg = h->purge_at ? h->purge_at : h->segments;
    for (unsigned visits = 0; seg && !hm_segment_is_full(seg) && visits < HM_PURGE_VISITS;
         visits++) {
        done += hm_segment_purge(seg, now, delay_ns, HM_PURGE_STEP - done);
        if (done >= HM_PURGE_STEP)
            break;                  /* the step ran out in seg: the next one goes on there */
        seg = seg->next;
    }
    h->purge_at = seg && !hm_segment_is_full(seg) ? seg : NULL;
    return done;
}

unsigned hm_heap_purge_interval(const struct hm_heap *h)
{
    return h->purge_behind || atomic_load_explicit(&global_unfinished, memory_order_relaxed)
               ? 8 : 64;
}

/* Own segments every call; every segment (those of exited threads, the
 * large-block cache) at most four times per delay, by whichever thread
 * gets there first; all within one step.  A pass a step cut short goes on
 * at the next step instead of waiting for its turn. */
void hm_heap_purge(struct hm_heap *h, uint64_t delay_ns)
{
    static _Atomic uint64_t last_global;
    uint64_t now = hm_clock_ns();
    size_t done = 0;
    /* The pass walks every partial span: a few times per delay is enough,
     * where every 64 slow paths of 2-block batches would be thousands. */
    if (h->compact_unfinished || now - h->compacted_ns >= delay_ns / 4) {
        h->compacted_ns = now;
        done += hm_heap_compact_sparse(h, now, delay_ns, 3, HM_PURGE_STEP);
        h->compact_unfinished = done >= HM_PURGE_STEP;
    }
    abandon_still_drained(h, now, delay_ns);
    done = purge_own(h, now, delay_ns, done);
    done = purge_list(h->reserve, now, delay_ns, done);
    h->purge_behind = done >= HM_PURGE_STEP;
    if (h->purge_behind)
        return;
    uint64_t last = atomic_load_explicit(&last_global, memory_order_relaxed);
    /* Signed: another thread may have stored a later time than ours. */
    if ((atomic_load_explicit(&global_unfinished, memory_order_relaxed) ||
         (int64_t)(now - last) >= (int64_t)(delay_ns / 4)) &&
        atomic_compare_exchange_strong(&last_global, &last, now)) {
        empty_pool_decay(delay_ns);         /* at most EMPTY_POOL_MAX unmaps */
        hm_abandoned_sweep(HM_SWEEP_STEP, false);
        done += hm_heaps_tidy_idle_step(h, delay_ns, HM_PURGE_STEP - done);
        size_t step = done < HM_PURGE_STEP ? HM_PURGE_STEP - done : 0;
        bool behind = hm_segment_purge_step(now, delay_ns, step);
        atomic_store_explicit(&global_unfinished, behind, memory_order_relaxed);
        h->purge_behind = behind;
    }
}

/* ---- idle heaps -------------------------------------------------------- */

/* The owner waits while a tidier finishes its step (at most a few
 * milliseconds: see HM_TIDY_STEP). */
void hm_heap_lock_wait(struct hm_heap *h)
{
    for (unsigned spins = 0; !hm_heap_lock_take(h, HM_HEAP_OWNER); spins++)
        hm_lock_backoff(spins);
}

/* The owner's lock at the process's exit, if it can be had: not when it
 * is the owner's already (a handler that exits), nor after about 10 ms
 * of a tidier's holding it.  A tidier may never let go then: one whose
 * thread's signal handler called exit too (a second exit blocks), or one
 * of the parent's, in a child forked without our handlers. */
bool hm_heap_lock_at_exit(struct hm_heap *h)
{
    for (unsigned spins = 0; spins < 128 + 500; spins++) {      /* 500 naps of 20 us */
        if (hm_heap_lock_take(h, HM_HEAP_OWNER)) {
            h->entries++;
            return true;
        }
        if (atomic_load_explicit(&h->lock, memory_order_relaxed) == HM_HEAP_OWNER)
            return false;
        hm_lock_backoff(spins);
    }
    return false;
}

static void give_up_all(struct hm_heap *h);
static void heap_retire(struct hm_heap *h);

/* Whether h's thread is gone, though it never exited the heap: its first
 * allocation came in glibc's last round of key destructors, after which
 * none of ours runs (see hm_exited_tcache), or it ended by a bare exit
 * system call.  ESRCH only: a live thread keeps its id, and a gone one's
 * id taken by a new thread only delays this until that one is gone too.
 * Never in a process other than the heap's: a vfork child shares our
 * memory but not our thread ids, and a child forked without our handlers
 * keeps its parent's ids in its own heap.  Left, so never exited by us:
 * a heap attached in a vfork child (the child's ids), a thread-group
 * leader that ended before the others (a zombie until they end, it
 * answers).  Not covered: a child forked twice without our handlers whose
 * pid is its gone grandparent's, and whose thread id is not its own.
 * errno as it was: this runs in the application's malloc. */
static bool thread_gone(const struct hm_heap *h)
{
    if (!h->tid)
        return false;               /* the exited threads' heap */
    int saved = errno;
    pid_t pid = getpid();
    bool gone = h->pid == pid && syscall(SYS_tgkill, pid, h->tid, 0) != 0 && errno == ESRCH;
    errno = saved;
    return gone;
}

/* Asked of a heap found idle for the purge delay, until it is tidied, then
 * at most every HM_GONE_RECHECK_NS (its thread may end later, tidied while
 * it lived): a thousand idle threads cost a hundred calls a second.  Each
 * asking counts HM_GONE_CHECK_COST in the step's budget (two system calls,
 * about 1.3 us here): heaps tidied in one pass come due together, and 1000
 * asked in one step held heaps_lock 1.3 ms; the step stops, and the next
 * goes on with those not yet asked. */
#define HM_GONE_RECHECK_NS 10000000000ull
#define HM_GONE_CHECK_COST ((size_t)2 << 10)

static bool gone_check_due(struct hm_heap *h, uint64_t now, size_t *done)
{
    if (h->tidied && now - h->gone_checked_ns < HM_GONE_RECHECK_NS)
        return false;
    h->gone_checked_ns = now;
    *done += HM_GONE_CHECK_COST;
    return true;
}

/* What exiting a gone thread's heap counts for in a tidying step's budget
 * (it takes about 5 us; a step's 512 KiB of purging, about 2 ms): a step
 * exits tens, not thousands under heaps_lock (2000 took 10 ms). */
#define HM_ORPHAN_COST ((size_t)16 << 10)

/* A fork child's heaps of its parent's other threads (heaps_forked),
 * within `budget` as orphan_exit counts them: their stashes and the frees
 * other threads made into them go back, and their segments are given up
 * as at an exit, for the child to reuse (the frees it made into them went
 * to spans no thread collected: a child that freed a parent thread's 64
 * MiB and allocated as much again held both).  Not their batches of
 * remote frees and of drained frees, which their threads filled without
 * the lock, maybe in the middle of a change at the fork (their blocks
 * stay allocated).  Never reused: their ids may be in blocks of their
 * bins, which nobody returns.  Under heaps_lock. */
static size_t give_up_forked(size_t budget)
{
    size_t done = 0;
    while (heaps_forked && done < budget) {
        struct hm_heap *h = heaps_forked;
        heaps_forked = h->next_free;
        give_up_all(h);
        hm_os_advise(h, HEAP_BYTES, MADV_DONTNEED);     /* never reused: see above */
        done += HM_ORPHAN_COST;
    }
    return done;
}

/* Exits a gone thread's heap for it, holding its lock as a tidier, under
 * heaps_lock.  As at a thread's exit, except its bins: they were in the
 * thread's TLS, gone or another thread's by now, so their blocks (at most
 * a cap a class) stay counted as live in their spans for good.  Its
 * batches live in the heap and go back. */
static void orphan_exit(struct hm_heap *h)
{
    hm_remote_flush(h);
    hm_drained_put_orphaned(h);
    give_up_all(h);
    hm_heap_tidier_unlock(h);
    heap_retire(h);
    heaps_orphaned++;
}

/* One step of the ACE thread's tidying gives back at most 512 KiB, about
 * 2 ms of work (compaction walks the free lists of the spans it empties:
 * an idle heap of a million 100 B blocks, 1% live, took 240 ms whole),
 * during which the registry is locked and a waking owner waits.  Up to 8
 * steps a pass, every 100 ms, with both locks let go between steps. */
#define HM_TIDY_STEP  ((size_t)512 << 10)
#define HM_TIDY_STEPS 8

/* A heap whose thread entered no slow path for the delay keeps what its
 * last slow paths left: blocks in its stashes, nearly empty spans, frees
 * of its blocks by other threads.  Its owner would deal with them at its
 * next slow path; a thread blocked for minutes never gets there.  So
 * whoever runs the process-wide purge (the ACE thread, or any thread's
 * slow path a few times per delay) does it for the owner, holding its
 * lock: only a heap whose lock is free, whose slow-path count has not
 * moved for the delay.  Its bins stay: the fast paths touch them without
 * a lock.  Walked under heaps_lock, so a heap cannot leave the registry
 * meanwhile, and fork (whose prepare handler takes heaps_lock) never finds
 * a heap held by a tidier. */
size_t hm_heaps_tidy_idle_step(struct hm_heap *self, uint64_t delay_ns, size_t budget)
{
    hm_mutex_lock(&heaps_lock);
    size_t done = give_up_forked(budget);
    if (done < budget)
        done += heaps_free_decay(delay_ns, budget - done);
    for (struct hm_heap *h = heaps_live, *next; h && done < budget; h = next) {
        next = h->next_live;
        if (h == self || !hm_heap_trylock(h))
            continue;
        /* Read under the heap's lock: every time its owner wrote is older. */
        uint64_t now = hm_clock_ns();
        if (h->entries != h->idle_entries || !h->idle_since_ns) {
            h->idle_entries = h->entries;
            h->idle_since_ns = now;
            h->tidied = false;
        } else if (now - h->idle_since_ns >= delay_ns && gone_check_due(h, now, &done) &&
                   thread_gone(h)) {
            orphan_exit(h);
            done += HM_ORPHAN_COST;
            continue;
        } else if (now - h->idle_since_ns >= delay_ns && done < budget &&
                   now - h->compacted_ns >= delay_ns / 4 &&
                   (!h->tidied || hm_heap_has_remote_frees(h))) {
            /* Once tidied, an idle heap changes only by frees of other
             * threads: a thousand idle threads' heaps are not walked again
             * every pass for nothing.  Not with the budget spent (by the
             * check above): the next step tidies it. */
            abandon_still_drained(h, now, delay_ns);
            size_t bytes = hm_heap_tidy(h, budget - done);
            heaps_tidied++;
            if (bytes < budget - done) {
                h->compacted_ns = now;      /* done: look again in a quarter delay */
                h->tidied = true;
            }
            done += bytes;
        }
        hm_heap_tidier_unlock(h);
    }
    hm_mutex_unlock(&heaps_lock);
    return done;
}

/* In rounds of at most one tidier's step a heap, both locks let go
 * between rounds for a nap: a heap of a million 100 B blocks, 1% live,
 * takes about 60 ms whole, and its owner's next slow path, or a thread's
 * start or exit (heaps_lock), must not wait that long.  The nap is five
 * of a waiting owner's (see hm_heap_lock_wait): without it the next round
 * took the lock back before the owner looked again, and one malloc waited
 * out the whole trim.  Each heap is passed over once (its cursor goes on
 * where the last step stopped, however its thread frees meanwhile), so
 * the work is bounded by what the heaps hold; a heap found busy (its
 * owner in a slow path) is tried again on HM_TRIM_BUSY_LAPS trips round
 * the list only, since an owner that keeps entering slow paths purges its heap
 * itself (with 64 threads churning on 2 cores, retrying every round made
 * a trim take 2-14 s).  HM_TRIM_MAX_NS and HM_TRIM_ROUNDS only bound what
 * nothing else does. */
#define HM_TRIM_ROUNDS      (1 << 16)
#define HM_TRIM_BUSY_LAPS   8
#define HM_TRIM_MAX_NS      10000000000ull
#define HM_TRIM_NAP_NS      100000
/* What a round may cost over all heaps, so that heaps_lock (a thread's
 * start and exit) is let go every 8 ms or so however many heaps there
 * are: 200 idle heaps at a step each held it 35 ms. */
#define HM_TRIM_ROUND_COST  (4 * HM_TIDY_STEP)

void hm_heaps_trim_others(struct hm_heap *self, uint64_t gen)
{
    uint64_t start = hm_clock_ns();
    hm_mutex_lock(&heaps_lock);
    give_up_forked(SIZE_MAX);
    hm_mutex_unlock(&heaps_lock);
    int laps = 0;           /* rounds that went all the way down the list */
    for (int round = 0; round < HM_TRIM_ROUNDS; round++) {
        bool more = false, late = false, cut = false;
        size_t spent = 0;
        hm_mutex_lock(&heaps_lock);
        /* From the head each round: a heap done for this trim costs a
         * trylock, so the round's cost goes to the first ones not done. */
        for (struct hm_heap *h = heaps_live; h; h = h->next_live) {
            if ((late = hm_clock_ns() - start >= HM_TRIM_MAX_NS))
                break;
            if (spent >= HM_TRIM_ROUND_COST) {
                cut = more = true;
                break;
            }
            if (h == self)
                continue;
            if (!hm_heap_trylock(h)) {
                more |= laps < HM_TRIM_BUSY_LAPS;
                continue;
            }
            size_t cost;
            more |= !hm_heap_trim(h, gen, HM_TIDY_STEP, &cost);
            spent += cost;
            hm_heap_tidier_unlock(h);
        }
        hm_mutex_unlock(&heaps_lock);
        if (!more || late)
            return;
        laps += !cut;
        hm_nap_ns(HM_TRIM_NAP_NS);
    }
}

/* In steps of at most a tidying step's cost, heaps_lock let go between
 * them: 4000 heaps at once would hold it 10 ms. */
bool hm_heap_release_unused(void)
{
    empty_pool_decay(0);
    hm_mutex_lock(&heaps_lock);
    uint64_t before = heaps_released_ever, steps = heaps_free_count * HEAP_BYTES / HM_TIDY_STEP;
    hm_mutex_unlock(&heaps_lock);
    /* As many steps as the heaps free now take: threads that keep
     * exiting meanwhile do not keep the trim going. */
    for (uint64_t i = 0; i <= steps; i++) {
        hm_mutex_lock(&heaps_lock);
        size_t done = heaps_free_decay(0, HM_TIDY_STEP);
        hm_mutex_unlock(&heaps_lock);
        if (done < HM_TIDY_STEP)
            break;
    }
    hm_mutex_lock(&heaps_lock);
    bool any = heaps_released_ever != before;
    hm_mutex_unlock(&heaps_lock);
    return any;
}

void hm_heaps_tidy_idle(uint64_t delay_ns)
{
    empty_pool_decay(delay_ns);
    hm_abandoned_sweep(HM_SWEEP_PASS, false);
    for (int i = 0; i < HM_TIDY_STEPS; i++)
        if (hm_heaps_tidy_idle_step(NULL, delay_ns, HM_TIDY_STEP) < HM_TIDY_STEP)
            break;
}

static void abandon_segment(struct hm_segment *seg)
{
    atomic_store_explicit(&seg->owner, HM_OWNER_ABANDONED, memory_order_relaxed);
    hm_mutex_lock(&abandoned_lock);
    abandoned_push(seg);
    segments_abandoned++;
    hm_mutex_unlock(&abandoned_lock);
}

/* A segment its heap lets go of (at its thread's exit, or one that stopped
 * draining), already off the heap's lists: its empty spans go back, the
 * others are nobody's, and the segment goes to the abandoned stack, or
 * the pool if nothing is left in it.  Its free pages decay like any
 * others: the next thread often adopts the segment and reuses them. */
static void give_up_segment(struct hm_segment *seg)
{
    for (unsigned i = 1; i < HM_SEGMENT_PAGES; i++) {
        struct hm_span *sp = seg->page_span[i];
        if (sp != &seg->spans[i])
            continue;
        sp->in_partial = 0;
        sp->next = sp->prev = NULL;
        if (sp->used == 0)
            hm_span_release(seg, sp);
        else
            hm_span_set_owner(sp, HM_OWNER_ABANDONED);
    }
    if (hm_segment_is_empty(seg))
        empty_pool_put(seg);
    else
        abandon_segment(seg);
}

struct span_shape {
    unsigned cls, pages;
    uint32_t block_size;
};

static struct hm_span *span_in(struct hm_heap *h, struct hm_segment *seg, struct span_shape s)
{
    /* Not in a segment we drain: its pages serve us once it is empty. */
    if (atomic_load_explicit(&seg->owner, memory_order_relaxed) != h->id)
        return NULL;
    /* Full segments are most of a big heap: skip them without the lock
     * (only this thread takes pages from its segments). */
    if ((unsigned)__builtin_popcountll(__atomic_load_n(&seg->free_pages, __ATOMIC_RELAXED)) < s.pages)
        return NULL;
    unsigned room = hm_segment_room(seg);
    struct hm_span *sp = hm_span_alloc(seg, s.pages, s.cls, s.block_size, h->id,
                                       (uint32_t)offsetof(struct hm_tcache, bins[s.cls]));
    if (sp)
        hm_heap_segment_changed(h, seg, room);
    return sp;
}

/* A heap that holds HM_HUGE_AFTER segments (16 MiB) is big: the segments
 * it maps from then on ask for huge pages (see segment.c).  A huge segment
 * holds a 2 MiB half resident from its first touch of it, so a heap that
 * has barely begun the half holds up to 2 MiB more than it uses: at most
 * an eighth of a big heap, where it would double a small one.  Counted
 * only once the heap took that many fresh segments itself: a short-lived
 * thread that adopts exited threads' segments holds as many at once, and
 * leaves its own, each a huge half resident for a few live blocks, to the
 * next (a program of 20,000 threads that each handed half their blocks on
 * peaked at 0.8-1.1 GB resident, against 0.33 GB on small pages). */
#define HM_HUGE_AFTER 4

static bool holds_at_least(const struct hm_heap *h, unsigned most)
{
    unsigned n = 0;
    for (const struct hm_segment *seg = h->segments; seg && n < most; seg = seg->next)
        n++;
    return n >= most;
}

static bool is_big(const struct hm_heap *h)
{
    return h->segments_taken >= HM_HUGE_AFTER && holds_at_least(h, HM_HUGE_AFTER);
}

/* A thread that frees a block of an exited thread's segment takes the
 * segment over, to drain it.  Left abandoned, the segment would only see
 * its frees once an adopter (a thread out of room takes the top) or a
 * sweep (two segments a purge step or an adoption) came to it; with threads that come
 * and go, the stack grows faster than either gets down it.  A stress
 * program whose 2850 threads each live a few hundred operations and leave
 * their blocks to later ones peaked at 450-700 MB resident; with this,
 * 190-220 MB (glibc: 161-185 MB).
 *
 * Draining: the segment's spans are ours tagged HM_OWNER_DRAIN.  A free
 * into one goes straight back to the span (drain_free), not into a bin,
 * the spans join no partial list, and no new span starts in the segment:
 * it empties, and then serves us like any empty segment.  Taken over
 * outright instead (spans ours, on our lists), the stress program peaked
 * at 143-157 MB, but larson, where each thread frees what the one before
 * allocated, spread each thread's blocks over the partly used segments
 * the chain passed on: peak RSS +15-38% in three runs of 24M ops, where
 * drained it is +2-8%.
 *
 * Not by a thread that only frees (no segment of its own: nothing to
 * serve), nor by one that holds HM_RECLAIM_MAX segments already (its slow
 * paths walk them all; 4 halved the gain, 16 gave no more): their frees go
 * remote, as to a live owner. */
#define HM_RECLAIM_MAX 8

/* Takes seg off the abandoned stack if it is there (not yet pushed by its
 * exiting owner, or taken by another thread meanwhile: no). */
static bool take_abandoned(struct hm_segment *seg)
{
    hm_mutex_lock(&abandoned_lock);
    bool listed = seg->on_abandoned;
    if (listed) {
        abandoned_unlink(seg);
        segments_adopted++;
    }
    hm_mutex_unlock(&abandoned_lock);
    return listed;
}

bool hm_heap_reclaim(struct hm_heap *h, struct hm_segment *seg)
{
    /* The heap's lock first (a tidier may change its segment list), then
     * the stack's, as a refill that adopts takes them. */
    hm_heap_lock(h);
    bool taken = h->segments && !holds_at_least(h, HM_RECLAIM_MAX) && take_abandoned(seg);
    if (taken) {
        seg->drained_ns = hm_clock_ns();
        adopt(h, seg, true);
    }
    hm_heap_unlock(h);
    return taken;
}

/* A drained segment that gave back no span for a quarter of the delay has
 * stopped draining: a few live blocks pin its spans, and their free blocks
 * serve nobody (a long-lived thread would hold up to HM_RECLAIM_MAX such
 * segments for good).  Abandoned again, it is there for a thread out of
 * room to adopt, and for the sweep; a free into it may take it over again,
 * at most once a quarter of the delay.  Checked at the heap's purge steps,
 * and by the tidier for an idle heap. */
static void abandon_still_drained(struct hm_heap *h, uint64_t now, uint64_t delay_ns)
{
    if (!h->segments_drained)
        return;
    for (struct hm_segment *seg = h->segments, *next; seg; seg = next) {
        next = seg->next;
        if (atomic_load_explicit(&seg->owner, memory_order_relaxed) == h->id ||
            now - seg->drained_ns < delay_ns / 4)
            continue;
        segment_unlink(h, seg);
        give_up_segment(seg);
    }
}

/* A span in the first of the heap's segments with room for it (with a
 * run of free pages still resident: `resident`), walking only as far as
 * the segments with room enough (see list_insert). */
static struct hm_span *span_in_list(struct hm_heap *h, struct span_shape s, bool resident)
{
    unsigned need = s.pages > 1 ? 2 : 1;
    for (struct hm_segment *seg = h->segments; seg && hm_segment_room(seg) >= need;
         seg = seg->next) {
        if (resident && !hm_segment_has_dirty_run(seg, s.pages))
            continue;
        struct hm_span *sp = span_in(h, seg, s);
        if (sp)
            return sp;
    }
    return NULL;
}

/* A fresh span: room in our segments, then segments of exited threads,
 * then the reserve, then a new segment. */
static struct hm_span *new_span(struct hm_heap *h, struct span_shape s)
{
    for (int adopted = 0;; adopted++) {
        /* Pages still resident first, in whichever segment they are: a
         * live set that moves from one size to another then reuses the
         * memory the last one left, without page faults. */
        struct hm_span *sp = span_in_list(h, s, true);
        if (!sp)
            sp = span_in_list(h, s, false);
        if (sp)
            return sp;
        if (adopted == 8 || !adopt_segment(h))
            break;
        /* Its remote frees may fill our lists, or empty (and free) it. */
        hm_heap_collect_own(h);
        if (s.cls < HM_NUM_CLASSES && h->partial[s.cls])
            return h->partial[s.cls];
    }
    struct hm_segment *seg = h->reserve;
    if (seg) {
        h->reserve = seg->next;
        h->reserve_count--;
    }
    if (!seg)
        seg = empty_pool_take();
    if (!seg)
        seg = hm_segment_alloc(h->id, hm_options.huge_pages && is_big(h));
    if (!seg)
        return NULL;
    h->segments_taken++;
    atomic_store_explicit(&seg->owner, h->id, memory_order_relaxed);
    segment_link(h, seg);
    return span_in(h, seg, s);
}

struct hm_span *hm_heap_new_span(struct hm_heap *h, unsigned cls)
{
    struct span_shape s = { cls, hm_class_span_pages[cls], (uint32_t)hm_size_class_size(cls) };
    return new_span(h, s);
}

struct hm_span *hm_heap_new_pages(struct hm_heap *h, unsigned pages)
{
    struct span_shape s = { HM_PAGES_CLASS, pages, (uint32_t)(pages * HM_PAGE_SIZE) };
    return new_span(h, s);
}

/* ---- thread exit ------------------------------------------------------- */

static void retire_stats(struct hm_heap *h)
{
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++) {
        retired[c].refills += h->stats[c].refills;
        retired[c].blocks_refilled += h->stats[c].blocks_refilled;
        retired[c].flushes += h->stats[c].flushes;
        retired[c].blocks_flushed += h->stats[c].blocks_flushed;
        retired[c].remote_frees += h->stats[c].remote_frees;
        retired[c].ace_drops += h->stats[c].ace_drops;
        retired[c].blocks_drained += h->stats[c].blocks_drained;
    }
}

/* Gives back what the heap holds outside its thread's bins: the frees
 * other threads made into it and its stashes to their spans, empty spans
 * and segments to the OS, segments with live blocks to the abandoned list
 * for another thread to adopt.  Under the heap's lock. */
static void give_up_all(struct hm_heap *h)
{
    hm_heap_tidy_caches(h);
    memset(h->partial, 0, sizeof h->partial);
    for (struct hm_segment *seg = h->segments, *next; seg; seg = next) {
        next = seg->next;
        give_up_segment(seg);
    }
    h->segments = h->segments_last = h->segments_full = h->purge_at = NULL;
    h->segments_drained = 0;
    hm_heap_release_reserve(h, false);
}

/* Off the registry and onto the free list, its counters kept (under
 * heaps_lock). */
static void heap_retire(struct hm_heap *h)
{
    retire_stats(h);
    threads_exited++;
    atomic_fetch_sub_explicit(&threads_live, 1, memory_order_relaxed);
    if (h->prev_live)
        h->prev_live->next_live = h->next_live;
    else
        heaps_live = h->next_live;
    if (h->next_live)
        h->next_live->prev_live = h->prev_live;
    free_push(h);
}

/* Gives back what the thread holds: its bins' blocks to their spans, then
 * the rest (give_up_all). */
void hm_thread_exit(struct hm_tcache *tc)
{
    struct hm_heap *h = tc->heap;
    if (!h)
        return;
    hm_heap_lock(h);
    hm_remote_flush(h);
    hm_drained_put(h);
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++) {
        if (hm_bin_count(&tc->bins[c]) || hm_stash_count(h, c))
            hm_bin_return_all(h, tc, c);
        /* As a new thread's.  cap first: a report that reads room (new)
         * then cap sees both new, and any other mix reads as empty. */
        __atomic_store_n(&tc->bins[c].cap, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&tc->bins[c].room, 0, __ATOMIC_RELEASE);
    }
    give_up_all(h);

    /* From here a malloc on this thread (a later destructor) starts over;
     * a free does not (see remote_free). */
    tc->owner = HM_OWNER_EXITED;
    tc->heap = NULL;
    /* A tidier may still find the heap, now empty, until it leaves the
     * registry below. */
    hm_heap_unlock(h);

    hm_mutex_lock(&heaps_lock);
    heap_retire(h);
    hm_mutex_unlock(&heaps_lock);
}

/* ---- counters ---------------------------------------------------------- */

/* Other threads' bins are read as noted at their last slow path, never
 * in their TLS: a thread whose first allocation came in glibc's last round
 * of key destructors keeps a heap that nothing exits (see
 * hm_exited_tcache), and its TLS goes with its stack.  Only the caller's
 * own bins, and the exited threads' (static), are read as they are. */
static uint32_t bin_blocks(const struct hm_heap *h, const struct hm_tcache *self, unsigned cls)
{
    if (self && h == self->heap)
        return hm_bin_count(&self->bins[cls]);
    if (h == hm_exited_tcache.heap)
        return hm_bin_count(&hm_exited_tcache.bins[cls]);
    return __atomic_load_n(&h->stats[cls].bin_blocks, __ATOMIC_RELAXED);
}

void hm_class_counters(unsigned cls, const struct hm_tcache *self, struct hm_class_counters *out)
{
    memset(out, 0, sizeof *out);
    hm_mutex_lock(&heaps_lock);
    out->refills = retired[cls].refills;
    out->blocks_refilled = retired[cls].blocks_refilled;
    out->flushes = retired[cls].flushes;
    out->blocks_flushed = retired[cls].blocks_flushed;
    out->remote_frees = retired[cls].remote_frees;
    out->ace_drops = retired[cls].ace_drops;
    out->blocks_drained = retired[cls].blocks_drained;
    for (struct hm_heap *h = heaps_live; h; h = h->next_live) {
        const struct hm_heap_class_stats *s = &h->stats[cls];
        out->refills += __atomic_load_n(&s->refills, __ATOMIC_RELAXED);
        out->blocks_refilled += __atomic_load_n(&s->blocks_refilled, __ATOMIC_RELAXED);
        out->flushes += __atomic_load_n(&s->flushes, __ATOMIC_RELAXED);
        out->blocks_flushed += __atomic_load_n(&s->blocks_flushed, __ATOMIC_RELAXED);
        out->remote_frees += __atomic_load_n(&s->remote_frees, __ATOMIC_RELAXED);
        out->ace_drops += __atomic_load_n(&s->ace_drops, __ATOMIC_RELAXED);
        out->blocks_drained += __atomic_load_n(&s->blocks_drained, __ATOMIC_RELAXED);
        out->blocks_cached += bin_blocks(h, self, cls) + hm_stash_count(h, cls);
    }
    hm_mutex_unlock(&heaps_lock);
}

void hm_heap_counters(struct hm_heap_counters *out)
{
    memset(out, 0, sizeof *out);
    out->threads_live = hm_heap_live_count();
    hm_mutex_lock(&heaps_lock);
    out->threads_exited = threads_exited;
    out->heaps_tidied = heaps_tidied;
    out->heaps_orphaned = heaps_orphaned;
    out->heaps_free = heaps_free_count;
    out->heaps_released = heaps_released_count;
    hm_mutex_unlock(&heaps_lock);
    hm_mutex_lock(&abandoned_lock);
    out->segments_abandoned = segments_abandoned;
    out->segments_adopted = segments_adopted;
    out->segments_swept = segments_swept;
    hm_mutex_unlock(&abandoned_lock);
}

/* ---- fork -------------------------------------------------------------- */

void hm_refill_fork_prepare(void)
{
    hm_exited_lock();                       /* first: its holder takes the others */
    hm_mutex_lock(&heaps_lock);
    hm_mutex_lock(&abandoned_lock);
}

void hm_refill_fork_release(void)
{
    hm_mutex_unlock(&abandoned_lock);
    hm_mutex_unlock(&heaps_lock);
    hm_exited_unlock();
}

/* Only the forking thread lives on in the child.  The other threads'
 * heaps leave the registry: their caches were in threads the child does
 * not have (reports and the tidier would read them), and their state may
 * be halfway through a slow path.  Their counters join the retired ones.
 * Those whose lock was free (no slow path under way) give up their
 * segments later (give_up_forked), not here: a child that execs at once
 * would pay a copy of each segment's header for nothing.  Their bins'
 * blocks stay allocated, as do all of a heap caught in a slow path. */
void hm_refill_fork_child(struct hm_tcache *self)
{
    /* The exited threads' heap stays: its cache is static, and no one was
     * using it (the prepare handler held its lock). */
    struct hm_heap *mine = self ? self->heap : NULL, *exited = hm_exited_tcache.heap;
    if (mine) {                         /* or its parent's thread looks gone */
        mine->tid = gettid();
        mine->pid = getpid();
        /* A remote free of a thread the child does not have may have
         * pushed without hinting yet: look once. */
        atomic_store_explicit(&mine->remote_hint, 1, memory_order_relaxed);
    }
    if (exited)
        atomic_store_explicit(&exited->remote_hint, 1, memory_order_relaxed);
    uint64_t n = 0;
    struct hm_heap *all = heaps_live;
    heaps_live = NULL;
    for (struct hm_heap *h = all, *next; h; h = next) {
        next = h->next_live;
        if (h == mine || h == exited) {
            live_push(h);
            continue;
        }
        retire_stats(h);
        threads_exited++;
        n++;
        if (atomic_load_explicit(&h->lock, memory_order_relaxed) == HM_HEAP_FREE) {
            h->next_free = heaps_forked;
            heaps_forked = h;
        }
    }
    atomic_fetch_sub_explicit(&threads_live, n, memory_order_relaxed);
    /* The child's ACE starts afresh (its queue, its counters): the events
     * its parent's queue dropped are not the child's to report. */
    for (struct hm_heap *h = heaps_live; h; h = h->next_live)
        for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
            h->stats[c].ace_drops = 0;
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
        retired[c].ace_drops = 0;
}
