/* The refill engine: batches from spans into thread caches and back. */
#define _GNU_SOURCE
#include "heap_internal.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>

#include "../ace/ace.h"
#include "../diag/diag.h"
#include "../process/process.h"
#include "../trace/trace.h"

uintptr_t hm_free_key;

/* ---- refill counts ----------------------------------------------------- */

/* Defaults: about 8 KiB per batch (two OS pages of fresh memory touched),
 * 2 to 64 blocks, so small classes move many blocks per refill and large
 * ones few; a short-lived thread does not carve much it will not use.  A
 * class refilled often learns a bigger batch with ACE.  The learner may
 * move a count within [min, max]; max caps a batch at 64 KiB (and so a
 * bin at 128 KiB per class, up to 512 KiB more for a bin widened by its
 * stash, whatever the count: see hm_bin_cap), so learning cannot trade
 * much memory for fewer refills. */
static _Atomic uint32_t refill_count[HM_NUM_CLASSES];

static uint32_t clamp_u32(uint64_t v, uint32_t lo, uint32_t hi)
{
    return v < lo ? lo : v > hi ? hi : (uint32_t)v;
}

struct hm_refill_bounds hm_refill_bounds(unsigned cls)
{
    uint64_t size = hm_size_class_size(cls);
    struct hm_refill_bounds b;
    b.def = clamp_u32(8192 / size, 2, 64);
    b.min = 1;
    b.max = clamp_u32(65536 / size, 2, 256);
    return b;
}

uint32_t hm_refill_count_load(unsigned cls)
{
    uint32_t n = atomic_load_explicit(&refill_count[cls], memory_order_relaxed);
    return n ? n : hm_refill_bounds(cls).def;
}

void hm_refill_count_store(unsigned cls, uint32_t count)
{
    struct hm_refill_bounds b = hm_refill_bounds(cls);
    atomic_store_explicit(&refill_count[cls], clamp_u32(count, b.min, b.max),
                          memory_order_relaxed);
}

/* ---- partial lists ----------------------------------------------------- */

void hm_partial_push(struct hm_heap *h, struct hm_span *sp)
{
    unsigned cls = sp->size_class;
    sp->prev = NULL;
    sp->next = h->partial[cls];
    if (sp->next)
        sp->next->prev = sp;
    h->partial[cls] = sp;
    sp->in_partial = 1;
}

void hm_partial_remove(struct hm_heap *h, struct hm_span *sp)
{
    if (sp->prev)
        sp->prev->next = sp->next;
    else
        h->partial[sp->size_class] = sp->next;
    if (sp->next)
        sp->next->prev = sp->prev;
    sp->next = sp->prev = NULL;
    sp->in_partial = 0;
}

static void span_release(struct hm_heap *h, struct hm_span *sp)
{
    struct hm_segment *seg = hm_segment_of_span(sp);
    if (sp->in_partial)
        hm_partial_remove(h, sp);
    if (hm_span_owner(sp) != h->id)             /* drained: still draining */
        seg->drained_ns = hm_clock_ns();
    unsigned room = hm_segment_room(seg);
    hm_span_release(seg, sp);
    if (hm_segment_is_empty(seg))
        hm_heap_segment_emptied(h, seg);
    else
        hm_heap_segment_changed(h, seg, room);
}

/* After blocks came back: list the span again if it was full, and give it
 * back to its segment once nothing is out.  Its pages stay resident for
 * the purge delay, so a class that cycles through one span reuses them
 * without page faults. */
static void span_settle(struct hm_heap *h, struct hm_span *sp)
{
    if (sp->used == 0) {
        span_release(h, sp);
        return;
    }
    if (!sp->in_partial && hm_span_owner(sp) == h->id)     /* not one we drain */
        hm_partial_push(h, sp);
}

/* n blocks returned to sp: what makes it worth compacting (saturating: a
 * wrapped count would hold its compaction back). */
static void note_freed(struct hm_span *sp, uint32_t n)
{
    uint32_t f = sp->freed_since_compact;
    sp->freed_since_compact = f + n >= f ? f + n : UINT32_MAX;
}

static inline void span_put(struct hm_heap *h, struct hm_span *sp, void *block)
{
    *(void **)block = sp->free;
    sp->free = block;
    sp->used--;
    note_freed(sp, 1);
    if (sp->used == 0 || !sp->in_partial)   /* span_settle's cases, tested here: most puts need neither */
        span_settle(h, sp);
}

void hm_span_put(struct hm_heap *h, struct hm_span *sp, void *block)
{
    span_put(h, sp, block);
}

/* ---- remote frees ------------------------------------------------------ */

void (*hm_remote_push_test_hook)(struct hm_segment *seg);

/* A segment's pending stack turned non-empty: its owner's next collect
 * walks its segments (see remote_hint).  The segment may be free by now
 * (its owner collected the push, and the span emptied it), but not yet
 * unmapped (see `announcing`).  The fence orders the push before
 * the read of the owner, as hm_heap_collect's orders a new owner's store
 * before its reads of the stacks: a segment that changes hands meanwhile
 * is then either hinted to its new owner or collected by it.  Heaps are
 * never unmapped, so an owner read just before the segment moved points
 * at a heap still: the hint there costs one walk.  A segment of an exited
 * thread has no heap: whoever takes it off the abandoned stack collects. */
static void hint_owner(struct hm_segment *seg)
{
    atomic_thread_fence(memory_order_seq_cst);
    uintptr_t owner = atomic_load_explicit(&seg->owner, memory_order_relaxed);
    if (owner == HM_OWNER_ABANDONED || owner == HM_OWNER_SENTINEL)
        return;
    struct hm_heap *h = (struct hm_heap *)(owner & ~HM_OWNER_DRAIN);
    atomic_store_explicit(&h->remote_hint, 1, memory_order_relaxed);
}

/* A block of a span this thread does not own goes on the span's remote
 * list.  Whoever makes that list non-empty also announces the span on its
 * segment's pending stack, so the owner finds it without scanning; it
 * writes the list's tail first (its own batch's tail, the list's last block
 * for good: later batches go in front), and the owner reads it only after
 * taking the span off that stack. */
static void remote_push(struct hm_span *sp, void *head, void *tail, uint32_t n)
{
    uintptr_t old = atomic_load_explicit(&sp->remote, memory_order_relaxed);
    do {
        *(void **)tail = hm_remote_head(old);
    } while (!atomic_compare_exchange_weak_explicit(
        &sp->remote, &old, hm_remote_word(head, hm_remote_count(old) + n),
        memory_order_acq_rel, memory_order_relaxed));
    if (old)
        return;
    sp->remote_tail = tail;
    struct hm_segment *seg = hm_segment_of_span(sp);
    struct hm_span *top = atomic_load_explicit(&seg->pending, memory_order_relaxed);
    bool first;
    for (;;) {
        /* The first span on the stack hints the owner, reading the segment
         * after the push: counted before it (the push releases the count
         * to the collector) and until that read, see `announcing`. */
        first = !top;
        if (first)
            atomic_fetch_add_explicit(&seg->announcing, 1, memory_order_relaxed);
        sp->pending_next = top;
        if (atomic_compare_exchange_weak_explicit(&seg->pending, &top, sp, memory_order_release,
                                                  memory_order_relaxed))
            break;
        if (first)
            atomic_fetch_sub_explicit(&seg->announcing, 1, memory_order_relaxed);
    }
    if (!first)
        return;
    if (__builtin_expect(hm_remote_push_test_hook != NULL, 0))
        hm_remote_push_test_hook(seg);
    hint_owner(seg);
    atomic_fetch_sub_explicit(&seg->announcing, 1, memory_order_release);
}

/* A batch goes when it holds REMOTE_BATCH blocks or all its span's (a
 * span of big blocks holds a few: one, for a page block), or when a block
 * of another span of its class comes; all go once REMOTE_HELD_MAX bytes
 * wait, at the thread's next refill, and at its exit.  So a thread holds
 * back little memory from its owners, even one that stops freeing. */
#define REMOTE_BATCH    32
#define REMOTE_HELD_MAX ((size_t)64 << 10)

static void batch_send(struct hm_heap *h, unsigned cls)
{
    struct hm_remote_batch *b = &h->remote[cls];
    /* Read before the push: the owner may then collect the blocks, and
     * release and reuse the span. */
    h->remote_held -= (size_t)b->count * b->sp->block_size;
    remote_push(b->sp, b->head, b->tail, b->count);
    b->sp = NULL;
    b->count = 0;
    h->remote_open[cls / 64] &= ~(1ull << (cls % 64));
}

void hm_remote_flush(struct hm_heap *h)
{
    for (unsigned w = 0; w < 2; w++)
        while (h->remote_open[w])
            batch_send(h, w * 64 + (unsigned)__builtin_ctzll(h->remote_open[w]));
}

/* A block of another thread's span joins this thread's batch for its
 * class.  Per class, not one batch for all: a thread that frees what
 * another allocated in mixed sizes (a consumer) meets a new span at almost
 * every block, and one batch sent at every change of span was one CAS per
 * block.  A class's blocks mostly come from the owner's one current span,
 * so batches fill. */
static void remote_free(struct hm_tcache *tc, struct hm_span *sp, void *p)
{
    /* A thread that only frees gets a heap for its batches.  Not one whose
     * heap went at exit: glibc frees the thread's own buffers after the
     * last round of key destructors, and a heap attached then would never
     * be given back (its batches lost, its cache's TLS gone under the
     * reports that read it). */
    struct hm_heap *h = tc->heap;
    if (!h && tc->owner != HM_OWNER_EXITED)
        h = hm_heap_attach(tc);
    if (!h) {                       /* set-up in progress, or exited: no batch */
        remote_push(sp, p, p, 1);
        return;
    }
    unsigned cls = sp->size_class;
    struct hm_remote_batch *b = &h->remote[cls];
    if (b->count && b->sp != sp)
        batch_send(h, cls);
    if (!b->count) {
        b->sp = sp;
        b->tail = p;
        h->remote_open[cls / 64] |= 1ull << (cls % 64);
    }
    *(void **)p = b->count ? b->head : NULL;
    b->head = p;
    b->count++;
    h->remote_held += sp->block_size;
    if (b->count >= REMOTE_BATCH || b->count >= sp->capacity)
        batch_send(h, cls);
    else if (h->remote_held >= REMOTE_HELD_MAX)
        hm_remote_flush(h);
}

/* Collects the remote lists of the spans announced on seg's pending stack
 * (a span is on it at most once: it is pushed when its list turns
 * non-empty, and its list is taken only by the segment's collector).  Each
 * list joins its span's free list whole: its length and tail came with it,
 * so no block is read here.  The blocks were last written by the threads
 * that freed them; a walk here would wait for each link in turn, where the
 * bin reads them later, each prefetched by the pop before it.  `joined`
 * then settles the span (which may release it, and with the last the
 * segment). */
typedef void joined_fn(void *ctx, struct hm_span *sp, uint32_t n);

static void collect_pending(struct hm_segment *seg, joined_fn *joined, void *ctx)
{
    struct hm_span *sp = atomic_exchange_explicit(&seg->pending, NULL, memory_order_acquire);
    while (sp) {
        /* Read the link and the tail before the list: once the list is
         * empty a remote free may push the span again and rewrite both
         * (acq_rel on the list keeps these reads before it). */
        struct hm_span *next_sp = sp->pending_next;
        void *tail = sp->remote_tail;
        uintptr_t list = atomic_exchange_explicit(&sp->remote, 0, memory_order_acq_rel);
        if (list) {
            uint32_t n = hm_remote_count(list);
            *(void **)tail = sp->free;
            sp->free = hm_remote_head(list);
            sp->used -= n;
            note_freed(sp, n);
            HM_TRACE_REMOTE_COLLECT(sp->size_class, n);
            joined(ctx, sp, n);
        }
        sp = next_sp;
    }
}

/* For the owner: counted in its stats, the span listed or released. */
static void settle_in_heap(void *ctx, struct hm_span *sp, uint32_t n)
{
    struct hm_heap *h = ctx;
    h->stats[sp->size_class].remote_frees += n;
    h->stats[sp->size_class].remote_since_refill += n;
    span_settle(h, sp);
}

/* For a segment of an exited thread, by whoever took it off the abandoned
 * stack (so nobody else collects it meanwhile): no heap, its spans are on
 * no partial list (their owner's exit took them off); counted per class
 * into the caller's array, and released once empty. */
static void settle_abandoned(void *ctx, struct hm_span *sp, uint32_t n)
{
    uint64_t *collected = ctx;
    collected[sp->size_class] += n;
    if (sp->used == 0)
        hm_span_release(hm_segment_of_span(sp), sp);
}

/* The owner's collection, in a slow path that took new spans or
 * pages after it: not while drained frees wait unput, which happens only
 * when the put before it had to leave them, or a handler re-entered a
 * put or a drain_defer (see hm_drained_waiting).  A second free of a
 * waiting block by another thread, on its span's remote list, would then
 * count the block free twice, and the span could empty and be reused
 * while the block waits: the put would free a live block.  The hint
 * stays set, so the next collection takes them.  See put_checked. */
void hm_heap_collect_own(struct hm_heap *h)
{
    if (!hm_drained_waiting(h))
        hm_heap_collect(h);
}

void hm_segment_collect_abandoned(struct hm_segment *seg, uint64_t *collected)
{
    collect_pending(seg, settle_abandoned, collected);
}

bool hm_heap_has_remote_frees(const struct hm_heap *h)
{
    return atomic_load_explicit(&h->remote_hint, memory_order_relaxed);
}

/* Cleared before the walk: a free announced after its segment was passed
 * sets it again, for the next collect. */
void hm_heap_collect(struct hm_heap *h)
{
    if (!atomic_load_explicit(&h->remote_hint, memory_order_relaxed) ||
        !atomic_exchange_explicit(&h->remote_hint, 0, memory_order_relaxed))
        return;
    atomic_thread_fence(memory_order_seq_cst);      /* see hint_owner */
    struct hm_segment *seg = h->segments;
    while (seg) {
        /* Collecting may empty and free this segment: step first. */
        struct hm_segment *next = seg->next;
        if (atomic_load_explicit(&seg->pending, memory_order_relaxed))
            collect_pending(seg, settle_in_heap, h);
        seg = next;
    }
}

static void bin_trim(struct hm_heap *h, struct hm_tcache *tc, unsigned cls, uint32_t keep);
static uint32_t stash_take(struct hm_stash *st, uint32_t n, void **list);

/* ---- draining bins ---------------------------------------------------- */

/* A bin that overflows this many times between two refills belongs to a
 * class whose live set shrinks (frees outran mallocs by about four caps): it
 * starts draining (see struct hm_bin).  In balance, each overflow after
 * the first needs the bin to gain half a cap before it runs dry, a coin
 * flip for a fair random walk: 8 in a row are rare. */
#define DRAIN_AFTER_FLUSHES 8
/* A draining bin judges the shrink over at least this many allocations:
 * a class with small batches sees too few per refill. */
#define DRAIN_WINDOW 32

static void drain_start(struct hm_heap *h, struct hm_tcache *tc, unsigned cls)
{
    struct hm_bin *bin = &tc->bins[cls];
    struct hm_heap_class_stats *s = &h->stats[cls];
    hm_bin_return_all(h, tc, cls);
    bin->cap = HM_BIN_DRAINING;
    bin->room = HM_BIN_DRAINING;
    s->drain_frees_at = (uint32_t)s->blocks_drained;
    s->drain_allocs = 0;
    s->last_refill = 0;         /* the bin was emptied, not handed out */
}

/* At a draining bin's refill: the bin ran dry, so the last refill's blocks
 * were handed out (bin_trim takes back what a trim returned instead).  It
 * goes on draining while frees come more than half again as often as
 * mallocs; a class in balance goes back to caching. */
static bool still_draining(struct hm_heap_class_stats *s)
{
    s->drain_allocs += s->last_refill;
    if (s->drain_allocs < DRAIN_WINDOW)
        return true;
    uint32_t frees = (uint32_t)s->blocks_drained - s->drain_frees_at;
    bool shrinking = (uint64_t)frees * 2 > (uint64_t)s->drain_allocs * 3;
    s->drain_frees_at = (uint32_t)s->blocks_drained;
    s->drain_allocs = 0;
    return shrinking;
}

/* ---- refill ------------------------------------------------------------ */

/* Takes up to n of the span's holes (free blocks whose pages went back to
 * the OS: touching them faults in zero pages). */
static uint32_t take_holes(struct hm_span *sp, uint32_t n, void **list)
{
    uint64_t *bits = hm_span_holes(sp);
    uint32_t got = 0;
    for (unsigned w = 0; got < n && sp->holes; w++) {
        while (bits[w] && got < n) {
            unsigned i = w * 64 + (unsigned)__builtin_ctzll(bits[w]);
            bits[w] &= bits[w] - 1;
            void *b = sp->start + (size_t)i * sp->block_size;
            *(void **)b = *list;
            *list = b;
            sp->holes--;
            got++;
        }
    }
    return got;
}

/* Blocks carved from a span so far (the reciprocal is exact here: see
 * hm_span_is_block). */
static uint32_t span_carved(const struct hm_span *sp)
{
    return (uint32_t)(((uint64_t)(sp->bump - sp->start) * sp->block_recip) >> 44);
}

/* Blocks on a span's free list: those carved, less those out and holes. */
static uint32_t free_listed(const struct hm_span *sp)
{
    return span_carved(sp) - sp->used - sp->holes;
}

/* A link of a span's free list that is not a carved block of the span: a
 * write after free broke the list. */
static void check_free_link(const struct hm_span *sp, const void *b, const char *call)
{
    if (!hm_span_is_block(sp, (uintptr_t)b) || (const char *)b >= sp->bump)
        hm_fatal(call, "heap corruption: a freed block was overwritten, near", b);
}

#ifndef NDEBUG
/* The length of a span's free list, walked at most `most` + 1 links, each
 * checked (a cycle or a broken link stops it with a diagnostic instead of
 * a hang or a crash). */
static uint32_t list_length(const struct hm_span *sp, uint32_t most)
{
    uint32_t n = 0;
    for (const void *b = sp->free; b && n <= most; b = *(void *const *)b) {
        check_free_link(sp, b, "malloc");
        n++;
    }
    return n;
}
#endif

/* A span's whole free list goes into an empty batch when it is no longer
 * than WHOLE_LIST_BATCHES batches and WHOLE_LIST_BYTES, or than the bin's
 * cap and the block returned (see span_take).  A producer thread's spans
 * fill with its consumers' frees, in lists of many batches: eight batches
 * took xmalloc's refills off the walk, two did not. */
#define WHOLE_LIST_BATCHES 8
#define WHOLE_LIST_BYTES   ((uint32_t)32 << 10)

static uint32_t whole_list_most(const struct hm_span *sp, uint32_t want)
{
    uint32_t most = WHOLE_LIST_BYTES / sp->block_size;
    if (most > WHOLE_LIST_BATCHES * want)
        most = WHOLE_LIST_BATCHES * want;
    return most > 2 * want + 1 ? most : 2 * want + 1;
}

/* Carves k (maybe 0) blocks in address order, touching only those k, and
 * prepends them to *list. */
static uint32_t span_carve(struct hm_span *sp, uint32_t k, void **list)
{
    if (!k)
        return 0;
    size_t bs = sp->block_size;
    char *first = sp->bump;
    char *last = first + (size_t)(k - 1) * bs;
    for (char *b = first; b < last; b += bs)
        *(void **)b = b + bs;
    *(void **)last = *list;
    *list = first;
    sp->bump = last + bs;
    return k;
}

/* Takes up to n blocks from a span, handed back first, then holes, then
 * never-carved ones (at most *carve bytes of them, which it counts down:
 * see HM_CARVE_BYTES), and prepends them to *list.  Returns how many: more
 * than n (up to `most`) when the span's whole free list goes at once. */
static uint32_t span_take(struct hm_span *sp, uint32_t n, uint32_t most, void **list,
                          size_t *carve)
{
    uint32_t got = 0;
    /* A free list of at most `most` blocks, into an empty batch, goes whole
     * without a walk: its blocks are mostly cold (other threads freed many
     * of them: see collect_pending), and each link read is a miss that the
     * next must wait for.  The bin reads them one at a time later, each
     * prefetched by the pop before it.  A list cut after n blocks costs
     * that walk, so lists of several batches go whole too. */
    if (!*list && sp->free && free_listed(sp) <= most) {
        got = free_listed(sp);
#ifndef NDEBUG
        /* Debug builds check the count it trusts: one too few would let
         * the span be released with a block still out. */
        if (list_length(sp, got) != got)
            hm_fatal("malloc", "heap corruption: a span's free list miscounted, near", sp->free);
#endif
        *list = sp->free;
        sp->free = NULL;
    }
    while (got < n && sp->free) {
        void *b = sp->free;
        sp->free = *(void **)b;
        *(void **)b = *list;
        *list = b;
        got++;
    }
    if (got < n && sp->holes)
        got += take_holes(sp, n - got, list);
    if (got < n && sp->bump < sp->end) {
        size_t bs = sp->block_size;
        uint32_t room = (uint32_t)((size_t)(sp->end - sp->bump) / bs);
        uint32_t k = n - got < room ? n - got : room;
        if (sp->bump + (size_t)k * bs > sp->start + (size_t)sp->resident_pages * HM_OS_PAGE) {
            /* Past what is resident: only what fits in the bound, or one
             * block into an empty batch; what is left ends the refill
             * unless a block fits. */
            uint32_t fit = (uint32_t)(*carve / bs);
            if (!fit && !*list)
                fit = 1;
            if (k > fit)
                k = fit;
            *carve = (size_t)k * bs + bs <= *carve ? *carve - (size_t)k * bs : 0;
        }
        got += span_carve(sp, k, list);
    }
    sp->used += got;
    if ((uint64_t)sp->used * 8 > sp->capacity)
        sp->sparse_since_ns = 0;
    return got;
}

/* Refills reach the learner in batches of HM_EVENT_BATCH per thread and
 * class, sent once the refill that completes a batch is done: two clock
 * reads and one push per batch.  The batch is taken under the heap's lock
 * (a tidier counts remote frees into it), and sent after: the first push
 * starts the ACE thread, and pthread_create allocates. */
static bool take_report(struct hm_heap *h, unsigned cls, uint32_t want, struct hm_event *out)
{
    struct hm_heap_class_stats *s = &h->stats[cls];
    if (s->batch_refills++ == 0)
        s->batch_start_ns = hm_clock_precise_ns();
    if (s->batch_refills < HM_EVENT_BATCH)
        return false;
    *out = (struct hm_event){
        .size_class = cls,
        .refill_count = want,
        .interval_ns = hm_clock_precise_ns() - s->batch_start_ns,
        .refills = s->batch_refills,
        .blocks = s->blocks_since_report,
        .blocks_flushed = s->flushed_since_refill,
        .remote_collected = s->remote_since_refill,
    };
    s->batch_refills = 0;
    s->flushed_since_refill = 0;
    s->remote_since_refill = 0;
    s->blocks_since_report = 0;
    return true;
}

static void send_report(struct hm_heap *h, const struct hm_event *ev)
{
    if (!hm_ace_record(ev)) {
        /* Only its thread writes it: a tidier does not. */
        h->stats[ev->size_class].ace_drops++;
        HM_TRACE_EVENT_DROPPED(ev->size_class);
    }
}

/* The bytes one thread may cache: a share of HAKMEM_TCACHE_MAX_KB among
 * the live threads, so 500 threads do not each keep a full cache; at least
 * 64 KiB (the small classes' bins, about one refill each), so the bound
 * holds for all caches together up to 512 threads at the default. */
#define CACHE_BUDGET_MIN ((uint64_t)64 << 10)

static uint64_t cache_budget(void)
{
    uint64_t threads = hm_heap_live_count();
    uint64_t share = hm_options.tcache_max_bytes / (threads ? threads : 1);
    return share > CACHE_BUDGET_MIN ? share : CACHE_BUDGET_MIN;
}

static uint32_t cached_count(struct hm_heap *h, struct hm_tcache *tc, unsigned cls)
{
    return hm_bin_count(&tc->bins[cls]) + hm_stash_count(h, cls);
}

static uint64_t cached_bytes(struct hm_heap *h, struct hm_tcache *tc)
{
    uint64_t bytes = 0;
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
        bytes += (uint64_t)cached_count(h, tc, c) * hm_size_class_size(c);
    return bytes;
}

/* A class's bin holds at most its cap and one until its next slow path (a
 * draining bin: its last refill's blocks), and its stash changes only in
 * slow paths; so h->cache_bound, noted at each slow path that changes
 * either, bounds what the caches hold at any time. */
static void cache_bound_set(struct hm_heap *h, unsigned cls, uint32_t n)
{
    /* A bin's cap is at most a few thousand blocks (a refill count of up
     * to 256 and a span's whole free list); a 16-bit count keeps the heap
     * within 20 KiB with the drained batch at 32.  Were n ever bigger,
     * the bound would count less than the cache holds, not corrupt. */
    if (n > UINT16_MAX)
        n = UINT16_MAX;
    h->cache_bound += ((int64_t)n - (int64_t)h->cache_bound_blocks[cls]) *
                      (int64_t)hm_size_class_size(cls);
    h->cache_bound_blocks[cls] = n;
}

void hm_cache_bound_note(struct hm_heap *h, struct hm_tcache *tc, unsigned cls)
{
    if (cls >= HM_NUM_CLASSES)
        return;
    const struct hm_bin *bin = &tc->bins[cls];
    cache_bound_set(h, cls, (bin->cap >= 0 ? (uint32_t)bin->cap + 1 : h->stats[cls].last_refill) +
                                h->stash[cls].count);
    __atomic_store_n(&h->stats[cls].bin_blocks, hm_bin_count(bin), __ATOMIC_RELAXED);
}

/* Over budget: empty bins, largest classes first (they hold the most bytes
 * per block, and small classes are the hottest), until under half of it.
 * Counting what the bins hold reads all of them, a few hundred ns paid by
 * the call whose slow path runs it (tail_latency's p99.9 was 10-18% higher
 * with the count at every check).  A cache whose bound is within the
 * budget cannot be over it: the bound counts the classes the thread used,
 * at their caps (all of them at the default caps: about 12.4 MiB, more
 * while stashes hold blocks), so at the default budget a process of up to
 * two threads skips the count while its stashes are near empty. */
static void enforce_cache_budget(struct hm_heap *h, struct hm_tcache *tc)
{
    uint64_t budget = cache_budget();
    if (h->cache_bound <= budget)
        return;
    uint64_t bytes = cached_bytes(h, tc);
    if (bytes <= budget)
        return;
    for (unsigned c = HM_NUM_CLASSES; c-- > 0 && bytes > budget / 2;) {
        uint32_t n = cached_count(h, tc, c);
        if (!n)
            continue;
        hm_bin_return_all(h, tc, c);
        bytes -= (uint64_t)n * hm_size_class_size(c);
    }
}

/* The periodic work of the application's slow paths (refills, page-block
 * allocations, flushes): every 64th keeps the cache within its budget, and
 * gives free pages back (without ACE nobody else does), a step at a time;
 * steps every 8th while the last one left some behind.  Not refills alone:
 * a program that allocates only page blocks, or a thread that mostly frees
 * blocks of segments it adopted from exited threads (larson's), would
 * seldom or never purge. */
static bool ticks_cross(uint32_t from, uint32_t to, uint32_t every)
{
    return (from & -every) != (to & -every);    /* every: a power of two */
}

/* n slow paths at once (a batch of drained frees counts each free). */
static void slow_path_ticks(struct hm_heap *h, struct hm_tcache *tc, uint32_t n)
{
    uint32_t from = h->slow_path_ticks, to = from + n;
    h->slow_path_ticks = to;
    if (ticks_cross(from, to, 64))
        enforce_cache_budget(h, tc);
    if (ticks_cross(from, to, hm_heap_purge_interval(h)))
        hm_heap_purge(h, hm_options.purge_delay_ns);
}

static void slow_path_tick(struct hm_heap *h, struct hm_tcache *tc)
{
    slow_path_ticks(h, tc, 1);
}

/* A heap's first refills of a class carve part of the count: an eighth,
 * a quarter, a half, then all of it.  A thread that lives for a few
 * hundred mallocs (a short request's worker) then carves, and at its exit
 * hands back, a few blocks of each class it used instead of 8 KiB of
 * each; a thread that keeps allocating a class reaches the full count at
 * its fourth refill.  thread_churn: 25% fewer instructions, 10% less peak
 * RSS. */
static uint32_t slow_start(const struct hm_heap_class_stats *s, uint32_t count)
{
    if (s->refills >= HM_SLOW_START_REFILLS)
        return count;
    uint32_t n = count >> (HM_SLOW_START_REFILLS - s->refills);
    return n ? n : 1;
}

static void *refill(struct hm_heap *h, struct hm_tcache *tc, unsigned cls, struct hm_event *ev,
                    bool *report)
{
    hm_remote_flush(h);
    uint32_t put = hm_drained_put(h);   /* counted in the drain window below */
    struct hm_bin *bin = &tc->bins[cls];
    struct hm_heap_class_stats *s = &h->stats[cls];
    /* The count is read here (Contract B), and where a never-refilled bin
     * is set up (bin_set_up). */
    uint32_t count = hm_refill_count_load(cls), want = slow_start(s, count);
    /* Drained frees still unput (a handler's refill: the put above had to
     * leave them, or the refill interrupted a drain_defer or a put; see
     * hm_drained_waiting) keep the bin draining: they carry no free key
     * yet, so a second free of one must come to the batch too, not into a
     * bin that caches it. */
    bool draining = bin->cap < 0 && (hm_drained_waiting(h) || still_draining(s));

    void *list = NULL;
    size_t carve = HM_CARVE_BYTES;
    uint32_t got = draining ? 0 : stash_take(&h->stash[cls], want, &list);
    while (got < want && (carve || !got)) {
        struct hm_span *sp = h->partial[cls];
        if (!sp) {
            hm_heap_collect_own(h);
            sp = h->partial[cls];
        }
        if (!sp) {
            if (got)
                break;
            sp = hm_heap_new_span(h, cls);
            if (!sp)
                return NULL;
            if (!sp->in_partial)
                hm_partial_push(h, sp);
        }
        uint32_t k = span_take(sp, want - got, draining ? want - got : whole_list_most(sp, want),
                               &list, &carve);
        got += k;
        if (!sp->free && !sp->holes && sp->bump >= sp->end)
            hm_partial_remove(h, sp);       /* full: back on a list when a block returns */
    }
    /* The bin was empty (room == cap) until now: cap and room change
     * together, only once there are blocks, so a failed refill leaves it
     * as it was.  A report on another thread may read one of the two
     * before this store and one after (cap now changes at most refills):
     * hm_bin_count keeps what it makes of them within [0, cap + 1]. */
    void *p = list;
    int32_t cap = draining ? HM_BIN_DRAINING : hm_bin_cap(cls, count, got);
    bin->head = *(void **)p;
    bin->cap = cap;
    bin->room = cap - (int32_t)(got - 1);
    ((uintptr_t *)p)[1] = 0;    /* every block leaves with word 1 clear: see hm_free_slow */

    s->flushes_since_refill = 0;
    s->last_refill = got;
    s->refills++;
    s->blocks_refilled += got;
    /* Over the same refills as the flushed blocks and remote frees.  Near
     * the top of 32 bits (millions of unreported refills: a class that
     * keeps draining) all three halve, which keeps their ratios. */
    if (s->blocks_since_report > UINT32_MAX - got) {
        s->blocks_since_report /= 2;
        s->flushed_since_refill /= 2;
        s->remote_since_refill /= 2;
    }
    s->blocks_since_report += got;
    HM_TRACE_REFILL(cls, want, got, h->id);
    hm_cache_bound_note(h, tc, cls);
    slow_path_ticks(h, tc, 1 + put);
    /* A draining class refills on every batch however well its count
     * fits (its frees never overflow): the learner would read that as
     * refills too frequent and grow the count of a shrinking class.  A
     * batch that HM_CARVE_BYTES cut short (while a span still had blocks
     * for it) is left out too: a bigger count would be cut the same.  The
     * learner's window runs on across it, so what it measures is the pace
     * of the refills a count can change. */
    bool cut = got < want && !carve && h->partial[cls];
    *report = hm_ace_on && !draining && want == count && !cut &&
              take_report(h, cls, want, ev);
    return p;
}

static void *refill_from(struct hm_heap *h, struct hm_tcache *tc, unsigned cls)
{
    struct hm_event ev;
    bool report = false;
    hm_heap_lock(h);
    void *p = refill(h, tc, cls, &ev, &report);
    hm_heap_unlock(h);
    if (report)
        send_report(h, &ev);
    return p;
}

/* The heap for exited threads (see hm_exited_tcache), taken with the
 * thread's signals blocked: every allocation of an exited thread comes
 * here, so a signal handler that allocates would otherwise often find
 * the heap halfway through one (a program whose handler did so while a
 * key destructor allocated aborted on a broken list in 2 runs of 3).
 * The two calls cost about 0.6 us an allocation, paid only after exit. */
static void exited_enter(sigset_t *saved)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, saved);
    hm_exited_lock();
}

static void exited_leave(const sigset_t *saved)
{
    hm_exited_unlock();
    pthread_sigmask(SIG_SETMASK, saved, NULL);
}

/* An allocation by a thread after its exit, from the heap for them all.
 * Not hm_ace_start, under the lock: starting the ACE thread allocates (its
 * TLS), on this thread, which would come back here. */
static void *exited_refill(unsigned cls)
{
    struct hm_tcache *tc = &hm_exited_tcache;
    sigset_t saved;
    exited_enter(&saved);
    struct hm_bin *bin = &tc->bins[cls];
    void *p = bin->head;
    if (p) {
        bin->head = *(void **)p;
        bin->room++;
        ((uintptr_t *)p)[1] = 0;        /* as bin_pop's */
    } else if (tc->heap || hm_heap_attach(tc)) {
        p = refill_from(tc->heap, tc, cls);
    }
    exited_leave(&saved);
    return p;
}

void *hm_refill(struct hm_tcache *tc, unsigned cls)
{
    if (__builtin_expect(tc->owner == HM_OWNER_EXITED, 0))
        return exited_refill(cls);
    struct hm_heap *h = tc->heap;
    if (__builtin_expect(!h, 0) && !(h = hm_heap_attach(tc)))
        return NULL;
    void *p = refill_from(h, tc, cls);
    hm_ace_start();
    return p;
}

static void *alloc_pages(struct hm_heap *h, struct hm_tcache *tc, size_t size)
{
    unsigned pages = (unsigned)((size + HM_PAGE_SIZE - 1) >> HM_PAGE_SHIFT);
    /* The drained batch first, as a refill does: a second free of a block
     * waiting there, by another thread, must meet the block at the put,
     * before a collection counts it free and a new span may cover it
     * (see put_checked). */
    uint32_t put = hm_drained_put(h);
    /* Page blocks freed by other threads may have left whole spans free. */
    hm_heap_collect_own(h);
    struct hm_span *sp = hm_heap_new_pages(h, pages);
    if (!sp)
        return NULL;
    sp->bump = sp->end;
    sp->used = 1;
    ((uintptr_t *)sp->start)[1] = 0;    /* handed out: not free (see hm_free_slow) */
    h->stats[HM_PAGES_CLASS].refills++;
    HM_TRACE_REFILL(HM_PAGES_CLASS, 1, 1, h->id);
    slow_path_ticks(h, tc, put + 1);
    return sp->start;
}

static void *alloc_pages_from(struct hm_tcache *tc, size_t size)
{
    struct hm_heap *h = tc->heap;
    if (!h && !(h = hm_heap_attach(tc)))
        return NULL;
    hm_heap_lock(h);
    void *p = alloc_pages(h, tc, size);
    hm_heap_unlock(h);
    return p;
}

void *hm_alloc_pages(struct hm_tcache *tc, size_t size)
{
    if (__builtin_expect(tc->owner == HM_OWNER_EXITED, 0)) {   /* see exited_refill */
        sigset_t saved;
        exited_enter(&saved);
        void *p = alloc_pages_from(&hm_exited_tcache, size);
        exited_leave(&saved);
        return p;
    }
    void *p = alloc_pages_from(tc, size);
    hm_ace_start();
    return p;
}

bool hm_realloc_pages(struct hm_tcache *tc, void *p, size_t size)
{
    uintptr_t u = (uintptr_t)p;
    struct hm_segment *seg = hm_segment_of(u);
    if (!seg || seg->kind != HM_SEGMENT_SPANS || size <= HM_MAX_CLASS_SIZE || size > HM_PAGES_MAX)
        return false;
    struct hm_span *sp = hm_span_of(seg, u);
    if (sp->size_class != HM_PAGES_CLASS || hm_span_owner(sp) != tc->owner || sp->start != p)
        return false;
    hm_heap_lock(tc->heap);     /* the owner's: its thread has a heap */
    unsigned room = hm_segment_room(seg);
    bool done = hm_span_resize(seg, sp, (unsigned)((size + HM_PAGE_SIZE - 1) >> HM_PAGE_SHIFT));
    hm_heap_segment_changed(tc->heap, seg, room);
    hm_heap_unlock(tc->heap);
    return done;
}

/* ---- compaction of nearly empty spans ----------------------------------- */

/* A span whose blocks were mostly freed keeps every page its free list
 * runs through resident, though a few live blocks hold it.  Compaction
 * gives back the OS pages that hold only free blocks: those blocks leave
 * the free list (their links would be lost with the pages) for the span's
 * hole bitmap, from which refills take them later.  Under the heap's
 * lock: its owner's slow path, or a tidier's.
 *
 * It runs with the periodic purge, for spans nearly empty for the purge
 * delay: a program that holds a few blocks of a size for long.  A live set
 * that shrinks is served by draining bins instead, which empty whole
 * spans; compacting at once when the heap grew cost phase_server 5k page
 * faults and 900 madvise calls for 1.5 MiB of peak RSS. */

/* Whether an OS page of the carved area holds nothing live and is still
 * resident: every block on it is free (listed or a hole), and one at
 * least is listed.  A page of holes alone went back with them already. */
static bool page_free_resident(const struct hm_span *sp, const uint64_t *holes,
                               const uint64_t *listb, uint32_t carved, uintptr_t page)
{
    size_t bs = sp->block_size;
    uint32_t i0 = (uint32_t)((page - (uintptr_t)sp->start) / bs);
    uint32_t i1 = (uint32_t)((page + HM_OS_PAGE - 1 - (uintptr_t)sp->start) / bs);
    bool listed = false;
    for (uint32_t i = i0; i <= i1 && i < carved; i++) {     /* past `carved`: never touched */
        if (!((holes[i >> 6] | listb[i >> 6]) >> (i & 63) & 1))
            return false;
        listed |= listb[i >> 6] >> (i & 63) & 1;
    }
    return listed;
}

static bool block_on_purged_page(const struct hm_span *sp, uint32_t i, const uint64_t *purged)
{
    size_t lo = (size_t)i * sp->block_size, hi = lo + sp->block_size - 1;
    for (size_t pg = lo / HM_OS_PAGE; pg <= hi / HM_OS_PAGE; pg++)
        if (purged[pg >> 6] >> (pg & 63) & 1)
            return true;
    return false;
}

static size_t span_compact(struct hm_span *sp)
{
    size_t bs = sp->block_size;
    uint32_t carved = span_carved(sp);
    uint64_t *holes = hm_span_holes(sp);
    uint64_t listb[HM_PAGE_SIZE / 16 / 64] = { 0 };
    for (void *b = sp->free; b; b = *(void **)b) {
        check_free_link(sp, b, "free");
        uint32_t i = (uint32_t)((size_t)((char *)b - sp->start) / bs);
        listb[i >> 6] |= (uint64_t)1 << (i & 63);
    }
    sp->freed_since_compact = 0;

    /* Pages of the carved area that hold nothing live go back. */
    uint64_t purged[(16 * HM_PAGE_SIZE / HM_OS_PAGE) / 64] = { 0 };
    uintptr_t start = (uintptr_t)sp->start;
    size_t npages = ((size_t)(sp->bump - sp->start) + HM_OS_PAGE - 1) / HM_OS_PAGE;
    size_t bytes = 0;
    for (size_t pg = 0; pg < npages;) {
        size_t run = 0;
        while (pg + run < npages &&
               page_free_resident(sp, holes, listb, carved, start + (pg + run) * HM_OS_PAGE)) {
            purged[(pg + run) >> 6] |= (uint64_t)1 << ((pg + run) & 63);
            run++;
        }
        if (run) {
            hm_segment_give_back(hm_segment_of_span(sp), (void *)(start + pg * HM_OS_PAGE),
                                 run * HM_OS_PAGE);
            bytes += run * HM_OS_PAGE;
        }
        pg += run + 1;
    }
    if (!bytes)
        return 0;
    atomic_fetch_add_explicit(&hm_segment_counters.bytes_purged, bytes, memory_order_relaxed);
    HM_TRACE_PURGE(bytes);

    /* Rebuild: listed blocks on kept pages are linked again, those on
     * pages that went back now join the holes.  The holes stay holes (a
     * page of theirs went back before).  Only kept pages are written. */
    void *list = NULL;
    uint32_t nholes = sp->holes;
    for (uint32_t w = 0; w < (carved + 63) / 64; w++) {
        for (uint64_t m = listb[w]; m; m &= m - 1) {
            uint32_t i = w * 64 + (uint32_t)__builtin_ctzll(m);
            if (block_on_purged_page(sp, i, purged)) {
                holes[w] |= (uint64_t)1 << (i & 63);
                nholes++;
            } else {
                void *b = sp->start + (size_t)i * bs;
                *(void **)b = list;
                list = b;
            }
        }
    }
    sp->free = list;
    sp->holes = nholes;
    return bytes;
}

/* What walking one link of a free list costs a step, in bytes of its
 * budget: a cold link is a cache miss, about a tenth of what giving back
 * an OS page costs per 64 bytes.  A span whose every page keeps a live
 * block gives nothing back but is walked whole: counted by bytes alone, a
 * 256 KiB step over an idle heap of a million 100 B blocks, one in 40
 * live, took 7-11 ms. */
#define COMPACT_LINK_COST 64

/* Compacts h's partial spans at most 1/2^fill_shift full (0: any) for
 * delay_ns, to which at least `freed` bytes' worth of blocks returned
 * since their last compaction; until the cost (bytes given back, links
 * walked) reaches `budget`. */
static size_t compact_pass(struct hm_heap *h, uint64_t now_ns, uint64_t delay_ns,
                           unsigned fill_shift, size_t freed, size_t budget,
                           struct hm_compact_cursor *at)
{
    size_t bytes = 0;
    uint32_t skip = at->span;
    for (unsigned c = at->cls; c < HM_NUM_CLASSES; c++, skip = 0) {
        /* By position: a span may have left the list meanwhile, and spans
         * put in front move the rest back (some are looked at again);
         * either way the pass moves on, however the owner frees. */
        uint32_t i = 0;
        struct hm_span *sp = h->partial[c];
        for (; sp && i < skip; sp = sp->next)
            i++;
        for (; sp && bytes < budget; sp = sp->next, i++) {
            if ((uint64_t)sp->used << fill_shift > sp->capacity)
                continue;
            /* With no delay (a tidier's), no stamp: a span up to half full
             * must not look nearly empty for long to its owner's pass. */
            if (delay_ns && !sp->sparse_since_ns) {
                sp->sparse_since_ns = now_ns;
                continue;
            }
            if (now_ns - sp->sparse_since_ns >= delay_ns &&
                (uint64_t)sp->freed_since_compact * sp->block_size >= freed) {
                uint64_t listed = free_listed(sp);
                bytes += span_compact(sp) + listed * COMPACT_LINK_COST;
            }
        }
        if (sp) {               /* out of budget: the next step goes on here */
            at->cls = c;
            at->span = i;
            return bytes;
        }
    }
    at->cls = HM_NUM_CLASSES;
    at->span = 0;
    return bytes;
}

/* Nearly empty spans, to which two OS pages' worth of blocks returned
 * since they were last compacted: fewer would seldom free a page, and the
 * walk of the free list would be for little. */
size_t hm_heap_compact_sparse(struct hm_heap *h, uint64_t now_ns, uint64_t delay_ns,
                              unsigned fill_shift, size_t budget)
{
    struct hm_compact_cursor at = { 0, 0 };
    return compact_pass(h, now_ns, delay_ns, fill_shift, 2 * HM_OS_PAGE, budget, &at);
}

static struct hm_span *span_of_block(void *b)
{
    uintptr_t u = (uintptr_t)b;
    struct hm_segment *seg = hm_segment_of(u);
    return seg ? hm_span_of(seg, u) : NULL;
}

/* A block of a span with holes may be one: a block whose page went back
 * while it was free (compaction) lost its free mark with the page, so a
 * second free of it passed the fast path; here, if it leaves the cache by
 * a flush before malloc hands it out again, it is caught. */
static bool is_hole(const struct hm_span *sp, const void *b)
{
    uint64_t i = ((uint64_t)((const char *)b - sp->start) * sp->block_recip) >> 44;
    return hm_span_holes(sp)[i / 64] >> (i % 64) & 1;
}

/* Whether b is the start of a block of sp, a span of h's. */
static inline __attribute__((always_inline)) bool block_of_ours(const struct hm_heap *h,
                                                                const struct hm_span *sp,
                                                                const void *b)
{
    return sp && hm_span_owner(sp) == h->id && hm_span_is_block(sp, (uintptr_t)b);
}

/* Whether b is a block of one of h's spans, not a hole: check_own's
 * conditions, for a caller that must not end the process. */
static inline __attribute__((always_inline)) bool own_block(const struct hm_heap *h,
                                                            const struct hm_span *sp, const void *b)
{
    return block_of_ours(h, sp, b) && !(sp->holes && is_hole(sp, b));
}

static struct hm_span *check_own(struct hm_heap *h, struct hm_span *sp, void *b,
                                 const char *what)
{
    if (!block_of_ours(h, sp, b))
        hm_fatal("free", what, b);
    if (sp->holes && is_hole(sp, b))
        hm_fatal("free", "double free detected", b);
    return sp;
}

/* A flush gives blocks back a chunk at a time.  The walk down the list
 * (older blocks are mostly cold: each link is fetched one block ahead)
 * finds each block's span and fetches the two lines of its header that
 * the put reads and writes; the puts follow once the chunk is known.  The
 * span headers' misses then overlap instead of following one another: a
 * medium class's blocks are in as many spans as blocks. */
#define FLUSH_CHUNK 16

/* Every block is checked before the first put: a put may empty a span and
 * its segment, which may then be unmapped, and a later block of the chunk
 * that is not what it seems (an invalid pointer freed into the bin) must
 * get its diagnostic, not a read of unmapped memory. */
static void check_blocks(struct hm_heap *h, void *const *blocks, struct hm_span *const *spans,
                         uint32_t k)
{
    for (uint32_t i = 0; i < k; i++)
        check_own(h, spans[i], blocks[i], "invalid pointer (found in a thread cache)");
}

static void put_blocks(struct hm_heap *h, void *const *blocks, struct hm_span *const *spans,
                       uint32_t k)
{
    check_blocks(h, blocks, spans, k);
    for (uint32_t i = 0; i < k; i++)
        hm_span_put(h, spans[i], blocks[i]);
}

/* b's span, its header's first line (the check's) fetched, and for a put
 * its free-list line too. */
static struct hm_span *span_fetched(void *b, bool for_put)
{
    struct hm_span *sp = span_of_block(b);
    if (sp) {
        __builtin_prefetch(sp, 0);
        if (for_put)
            hm_prefetch_write(&sp->free);
    }
    return sp;
}

/* Takes up to `most` blocks off the front of *list into blocks[], with
 * their spans (headers fetched, see span_fetched); each link is fetched
 * one block ahead.  Returns how many. */
static uint32_t gather(void **list, uint32_t most, void **blocks, struct hm_span **spans,
                       bool for_put)
{
    uint32_t k = 0;
    for (void *b = *list; b && k < most; k++) {
        void *next = *(void **)b;
        if (next)
            hm_prefetch_write(next);
        blocks[k] = b;
        spans[k] = span_fetched(b, for_put);
        b = next;
        *list = b;
    }
    return k;
}

static uint32_t put_chunk(struct hm_heap *h, void **list)
{
    void *blocks[FLUSH_CHUNK];
    struct hm_span *spans[FLUSH_CHUNK];
    uint32_t k = gather(list, FLUSH_CHUNK, blocks, spans, true);
    put_blocks(h, blocks, spans, k);
    return k;
}

/* Detaches and returns a bin's blocks after the first `keep`; the bin has
 * room for them again. */
static void *bin_cut(struct hm_bin *bin, uint32_t keep)
{
    void **link = &bin->head;
    for (uint32_t i = 0; i < keep; i++)
        link = (void **)*link;
    void *rest = *link;
    *link = NULL;
    bin->room = bin->cap - (int32_t)keep;
    return rest;
}

/* n blocks left cls's bin by a flush (to their spans or the stash). */
static void count_flushed(struct hm_heap *h, unsigned cls, uint32_t n)
{
    h->stats[cls].blocks_flushed += n;
    h->stats[cls].flushed_since_refill += n;
    HM_TRACE_FLUSH(cls, n);
}

/* ---- the stash ---------------------------------------------------------- */

/* A medium class refills 2 to 15 blocks: a class whose mallocs and frees
 * take turns at random walks its bin between empty and full, and with a
 * bin of twice the batch it hits an end every few calls.  Going to the
 * spans each time costs misses on the blocks and on a span header per
 * block.  So a medium class's bin is wider (hm_bin_cap), and a flush moves
 * its newest blocks (still in cache: no walk down the list to cut it) into
 * the stash instead, from which the next refill takes them back: neither
 * writes to a span.  Only a full stash gives its oldest blocks to their
 * spans, from the array, with the headers fetched ahead.  At most
 * HM_STASH_MAX blocks and 1 MiB a class (so 16 blocks up to 64 KiB, 8 of
 * 128 KiB): the cache stays bounded (and within HAKMEM_TCACHE_MAX_KB with
 * the bins), and every path that empties a bin (exit, trim, the budget,
 * draining) empties the stash with it.  With 256 KiB, the classes above
 * 16 KiB had too little room to widen their bins (below). */
#define HM_STASH_BYTES (1024u << 10)

/* The stashes' bytes and the bins' widening (below) in full while a
 * thread's share of HAKMEM_TCACHE_MAX_KB is at least HM_WIDE_SHARE (then
 * its bins at their caps and full stashes hold about 23 MiB), in
 * proportion to the share below it (at the default budget: 2/3 with two
 * threads, 1/3 with four), and never less than HM_STASH_BYTES_LEAST and
 * HM_BIN_WIDEN_LEAST.  The budget is enforced only every 64 slow paths,
 * and a free fills a bin to its cap without one: with the caches at full
 * width, three threads that filled their bins and blocked held 33.8 MiB
 * at the default budget of 32, and 32 threads 331 MiB. */
#define HM_WIDE_SHARE ((uint64_t)24 << 20)
#define HM_STASH_BYTES_LEAST (256u << 10)
#define HM_BIN_WIDEN_LEAST (64u << 10)

static uint32_t share_scaled(uint32_t full, uint32_t least)
{
    uint64_t share = cache_budget();
    if (share >= HM_WIDE_SHARE)
        return full;
    uint64_t bytes = full * share / HM_WIDE_SHARE;
    return bytes > least ? (uint32_t)bytes : least;
}

static uint32_t stash_room(unsigned cls)
{
    uint32_t n = share_scaled(HM_STASH_BYTES, HM_STASH_BYTES_LEAST) /
                 (uint32_t)hm_size_class_size(cls);
    return n < HM_STASH_MAX ? n : HM_STASH_MAX;
}

/* Twice the batch (after a whole free list: room for a batch of frees on
 * top of it), and for a class with a stash up to HM_BIN_WIDEN_BYTES more
 * (at most the stash's room), as long as a flush (the cap's newer half)
 * still fits in the stash.  A random walk reaches an end of a bin about
 * as rarely as the square of its width: tail_latency's p99 fell by a
 * quarter at 64 KiB.  At 512 KiB (16 more blocks up to 32 KiB, 8 of 64
 * KiB, 4 of 128 KiB) its slow paths fell from 2.7% of calls to 1.0%
 * (refills and flushes of the classes above 8 KiB, whose bins had held 4
 * or 5 blocks), p99 by 9% and p99.99 by half, and mid_large_mt ran 9-16%
 * faster; 1 MiB cut p99 by 6% more, but lets a thread's bins hold twice
 * as much.  The bins at their caps hold 12.4 MiB (6.5 before); an idle
 * thread keeps its bins: phase_server's idle RSS with ACE went from 17.2
 * to 18.6 MiB. */
#define HM_BIN_WIDEN_BYTES (512u << 10)

int32_t hm_bin_cap(unsigned cls, uint32_t want, uint32_t got)
{
    uint32_t base = want + (got > want ? got : want);
    if (cls >= HM_NUM_CLASSES)
        return (int32_t)base;
    uint32_t room = stash_room(cls), widest = 2 * room - 2;   /* ceil(cap / 2) + 1 <= room */
    uint32_t extra = share_scaled(HM_BIN_WIDEN_BYTES, HM_BIN_WIDEN_LEAST) /
                     (uint32_t)hm_size_class_size(cls);
    if (extra > room)
        extra = room;
    uint32_t wide = base + extra < widest ? base + extra : widest;
    return (int32_t)(wide > base ? wide : base);
}

static void stash_set_count(struct hm_stash *st, uint32_t n)
{
    __atomic_store_n(&st->count, n, __ATOMIC_RELAXED);
}

/* Gives the oldest m blocks of the stash back to their spans. */
static void stash_spill(struct hm_heap *h, struct hm_stash *st, uint32_t m)
{
    struct hm_span *spans[HM_STASH_MAX];
    for (uint32_t i = 0; i < m; i++)
        spans[i] = span_fetched(st->slot[i], true);
    put_blocks(h, st->slot, spans, m);
    memmove(st->slot, st->slot + m, (st->count - m) * sizeof st->slot[0]);
    stash_set_count(st, st->count - m);
}

static void stash_return_all(struct hm_heap *h, unsigned cls)
{
    if (cls < HM_NUM_CLASSES && h->stash[cls].count)
        stash_spill(h, &h->stash[cls], h->stash[cls].count);
}

/* Moves the bin's newest n blocks (all but its oldest `keep`) into the
 * stash, counted as flushed as bin_trim counts its own.  Each is checked
 * as a flush to the spans checks it, so that a free of an interior pointer
 * is caught at the bin's next overflow and never circulates between bin
 * and stash: the check reads the first line of each block's span header,
 * all fetched ahead. */
static void stash_put(struct hm_heap *h, struct hm_bin *bin, unsigned cls, uint32_t keep,
                      uint32_t n, uint32_t room)
{
    void *blocks[HM_STASH_MAX];
    struct hm_span *spans[HM_STASH_MAX];
    void *list = bin->head;
    n = gather(&list, n, blocks, spans, false);
    bin->head = list;
    bin->room = bin->cap - (int32_t)keep;
    check_blocks(h, blocks, spans, n);

    struct hm_stash *st = &h->stash[cls];
    if (st->count + n > room)
        stash_spill(h, st, st->count + n - room);
    for (uint32_t i = 0; i < n; i++)        /* oldest first: blocks[n - 1] */
        st->slot[st->count + n - 1 - i] = blocks[i];
    stash_set_count(st, st->count + n);
    count_flushed(h, cls, n);
}

/* Up to n of the stash's newest blocks, as a list, newest first. */
static uint32_t stash_take(struct hm_stash *st, uint32_t n, void **list)
{
    uint32_t k = n < st->count ? n : st->count;
    uint32_t base = st->count - k;
    for (uint32_t i = 0; i < k; i++) {
        *(void **)st->slot[base + i] = *list;
        *list = st->slot[base + i];
    }
    stash_set_count(st, base);
    return k;
}

static bool stash_holds(const struct hm_heap *h, unsigned cls, const void *p)
{
    if (cls >= HM_NUM_CLASSES)
        return false;
    const struct hm_stash *st = &h->stash[cls];
    for (uint32_t i = 0; i < st->count; i++)
        if (st->slot[i] == p)
            return true;
    return false;
}

uint32_t hm_stash_count(const struct hm_heap *h, unsigned cls)
{
    return cls < HM_NUM_CLASSES ? __atomic_load_n(&h->stash[cls].count, __ATOMIC_RELAXED) : 0;
}

/* Returns the blocks after the first `keep` of tc's bin to their spans. */
static void bin_trim(struct hm_heap *h, struct hm_tcache *tc, unsigned cls, uint32_t keep)
{
    struct hm_bin *bin = &tc->bins[cls];
    if (hm_bin_count(bin) <= keep)
        return;
    void *b = bin_cut(bin, keep);
    uint32_t n = 0;
    while (b)
        n += put_chunk(h, &b);
    if (bin->cap < 0) {         /* not handed out: the drain window must not count them */
        uint32_t *last = &h->stats[cls].last_refill;
        *last -= n < *last ? n : *last;
    }
    count_flushed(h, cls, n);
}

/* A bin with no cap was never refilled: the free that overflowed it is
 * into a span the heap took over with a segment (adopted from an exited
 * thread) in a class the thread has not allocated.  It gets the cap its
 * first refill would give it and keeps the block, as a bin set up at the
 * thread's start did; flushing every such free, it would soon count as a
 * class whose live set shrinks and start draining. */
static void bin_set_up(struct hm_heap *h, struct hm_tcache *tc, unsigned cls)
{
    struct hm_bin *bin = &tc->bins[cls];
    uint32_t count = hm_refill_count_load(cls);
    /* room was minus the blocks held (the one just freed).  A report on
     * another thread may pair an old and a new field, as during a refill:
     * hm_bin_count keeps what it makes of them within [0, cap + 1]. */
    bin->cap = hm_bin_cap(cls, count, count);
    bin->room += bin->cap;
    hm_cache_bound_note(h, tc, cls);
}

/* A free into a draining bin of a small class: the block never joins the
 * bin (no malloc of ours hands it out again) and waits, unread, with the
 * thread's other drained frees, so that their spans take them back
 * together under one lock, one tick of the periodic work, and their
 * headers and blocks fetched at once.  A program that frees most of what
 * it built (a cache dropped, a phase over) drains every class, and its
 * blocks are cold by then.  free() reads a block's second word (the
 * double-free key) before it takes it, so each such free waited on
 * memory, and the core overlapped few of them, each running a hundred
 * instructions more.  A draining bin's free skips that read (see
 * hakmem_free), and the put reads the whole batch's keys in one short
 * loop whose misses overlap: bench's teardown (64 MiB of blocks freed in
 * a random order) went from about 19M to 27M frees a second.  (Before
 * the batch, one put per free cost about 154 instructions and a lock.)
 *
 * Only this thread touches the batch, so it needs no lock; it holds fewer
 * than HM_DRAIN_BATCH blocks until the next put (the batch's last free, a
 * draining free of a bigger class, a refill, a page block's malloc, the
 * thread's exit or its malloc_trim, exit() for the thread that calls it,
 * or a tidier's exit of its heap for a thread gone).  The classes above
 * HM_DRAIN_DEFER_MAX go back at once, as a batch of their own: an idle
 * thread's batch pins its blocks' spans, at most 31 KiB of blocks.
 *
 * A block waiting in the batch does not carry the free key yet.  A
 * second free of it by this thread comes to the batch too (the bin
 * drains until a refill, which puts the batch first) and is found at the
 * put, by the key that the first one's check wrote.  One by another
 * thread finds no key, so it writes the key and sends the block to its
 * span as a remote free; the put finds that key.  Our slow paths that
 * collect remote frees or take new spans put the batch first (or, when a
 * handler's re-entry keeps them from it, do not collect: see
 * hm_heap_collect_own), so the block is still ours to meet there; only
 * another thread that tidies or trims this heap (an idle thread's
 * tidier, another thread's malloc_trim) may collect that remote free
 * first, and if the block's span then empties, the put reports an
 * invalid pointer instead.
 *
 * The allocator is no more async-signal-safe than malloc need be, but a
 * signal handler that frees or mallocs in the middle of a change to the
 * batch (or of a put, in a slow path it re-enters) leaves the batch
 * alone: a block may be lost then, never put twice by the batch. */
#define HM_DRAIN_DEFER_MAX 1024u

static bool drain_defers(unsigned cls)
{
    return hm_size_class_size(cls) <= HM_DRAIN_DEFER_MAX;
}

/* Adds p to the batch, unless the batch is full (a handler filled it
 * while a put could not run): then the caller sends p alone. */
static bool drain_defer(struct hm_heap *h, void *p)
{
    h->drained_busy++;
    atomic_signal_fence(memory_order_seq_cst);
    uint32_t n = h->drained_count;
    bool room = n < HM_DRAIN_BATCH;
    if (room) {
        h->drained[n] = p;
        h->drained_count = n + 1;
    }
    atomic_signal_fence(memory_order_seq_cst);
    h->drained_busy--;
    return room;
}

/* Drained frees back to their spans.  Their span headers and blocks are
 * fetched first, all of them, so that the misses overlap; then every
 * block is checked before the first put (see check_blocks): a block of
 * ours, whose second word must not hold the free key.  The key there is
 * a second free: of a block that was free already (a span's list, a
 * bin, another thread's remote free), or of one earlier in this batch,
 * since each block checked gets the key, as a free block carries it.
 * Unlike hm_free_slow, the lists are not asked (another thread's second
 * free may be in none yet), so a program's own value equal to the key
 * (one chance in 2^64) ends the process too.  A block that fails ends
 * the process, or with `fatal` false stays out, as it is.  Returns how
 * many went. */
static uint32_t put_checked(struct hm_heap *h, void *const *blocks, uint32_t n, bool fatal)
{
    struct hm_span *spans[HM_DRAIN_BATCH];
    for (uint32_t i = 0; i < n; i++) {
        spans[i] = span_fetched(blocks[i], true);
        hm_prefetch_write(blocks[i]);       /* the key's read, and both words' writes */
    }
    for (uint32_t i = 0; i < n; i++) {
        uintptr_t *words = blocks[i];
        if (__builtin_expect(!own_block(h, spans[i], words), 0)) {
            if (fatal)
                check_own(h, spans[i], words, "invalid pointer");   /* its diagnostic */
            spans[i] = NULL;
            continue;
        }
        if (__builtin_expect(words[1] == hm_free_key, 0)) {
            if (fatal)
                hm_fatal("free", "double free detected", words);
            spans[i] = NULL;
            continue;
        }
        words[1] = hm_free_key;
    }
    uint32_t put = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (spans[i]) {             /* held by its own block until this put */
            h->stats[spans[i]->size_class].blocks_drained++;     /* and the drain window's */
            span_put(h, spans[i], blocks[i]);
            put++;
        }
    }
    return put;
}

/* put_checked, marked as under way: until the blocks carry the free key
 * and are back in their spans, a handler that re-enters the allocator
 * must treat them as waiting (see hm_drained_waiting).  The mark comes
 * first, then the batch they were taken from (`taken`, or NULL) is
 * emptied, so that no instruction in between shows neither. */
static uint32_t put_marked(struct hm_heap *h, void *const *blocks, uint32_t n, bool fatal,
                           uint32_t *taken)
{
    h->drained_putting++;
    atomic_signal_fence(memory_order_seq_cst);
    if (taken)
        *taken = 0;
    uint32_t put = put_checked(h, blocks, n, fatal);
    atomic_signal_fence(memory_order_seq_cst);
    h->drained_putting--;
    return put;
}

/* Puts the batch back, taken whole first: a diagnostic's abort handler
 * that frees meanwhile fills a new batch (which no put takes while the
 * handler runs: its frees then go back alone) instead of adding to, or
 * putting again, this one.  Not in a slow path re-entered by a handler,
 * nor while a drain_defer is under way (see above).  Returns how many
 * went. */
static uint32_t drained_put(struct hm_heap *h, bool fatal)
{
    uint32_t n = h->drained_count;
    if (!n || h->drained_busy || h->lock_depth)
        return 0;
    void *blocks[HM_DRAIN_BATCH];
    for (uint32_t i = 0; i < n; i++)
        blocks[i] = h->drained[i];
    atomic_signal_fence(memory_order_seq_cst);
    return put_marked(h, blocks, n, fatal, &h->drained_count);
}

uint32_t hm_drained_put(struct hm_heap *h)
{
    return drained_put(h, true);
}

/* For the tidier that exits the heap of a thread gone: a diagnostic there
 * would end the process from another thread, holding the registry's lock,
 * about a thread that is no more; such a block stays out (it leaked with
 * its thread's bins before). */
uint32_t hm_drained_put_orphaned(struct hm_heap *h)
{
    return drained_put(h, false);
}

static bool drained_holds(const struct hm_heap *h, const void *p)
{
    for (uint32_t i = 0; i < h->drained_count; i++)
        if (h->drained[i] == p)
            return true;
    return false;
}

/* A draining bin's free: into the batch, which goes back when full; a
 * bigger block, or one that finds the batch full (a handler that freed in
 * the middle of a change to it), goes back alone, after the waiting
 * batch if that may go. */
static void flush_drained(struct hm_heap *h, struct hm_tcache *tc, unsigned cls, void *p)
{
    tc->bins[cls].room++;               /* p does not stay in the bin */
    bool deferred = drain_defers(cls) && drain_defer(h, p);
    uint32_t n = hm_drained_put(h);
    if (!deferred) {
        void *one[1] = { p };
        n += put_marked(h, one, 1, true, NULL);
    }
    slow_path_ticks(h, tc, n);
}

static void flush(struct hm_heap *h, struct hm_tcache *tc, unsigned cls, void *p)
{
    struct hm_bin *bin = &tc->bins[cls];
    struct hm_heap_class_stats *s = &h->stats[cls];
    if (bin->cap < 0) {
        flush_drained(h, tc, cls, p);
        return;
    }
    hm_bin_link(bin, p, hm_free_key);   /* counted already: one over the cap */
    if (bin->cap == 0 && cls < HM_NUM_CLASSES) {    /* page blocks: never cached */
        bin_set_up(h, tc, cls);
        return;
    }
    s->flushes++;
    if (cls < HM_NUM_CLASSES && ++s->flushes_since_refill >= DRAIN_AFTER_FLUSHES)
        drain_start(h, tc, cls);
    else {      /* keep half: a trim to the spans keeps the newest (the likeliest
                 * to be in cache); a stash takes the newest (no walk) */
        uint32_t keep = (uint32_t)bin->cap / 2, n = hm_bin_count(bin) - keep;
        /* Read once: it shrinks as threads start (see share_scaled), and
         * a spill sized by a smaller room than the check's would take
         * more than the stash holds. */
        uint32_t room = cls < HM_NUM_CLASSES ? stash_room(cls) : 0;   /* page blocks: none */
        if (n <= room)
            stash_put(h, bin, cls, keep, n, room);
        else
            bin_trim(h, tc, cls, keep);
    }
    hm_cache_bound_note(h, tc, cls);
    slow_path_tick(h, tc);
}

static __attribute__((noinline)) void flush_locked(struct hm_tcache *tc, unsigned cls, void *p)
{
    hm_heap_lock(tc->heap);
    flush(tc->heap, tc, cls, p);
    hm_heap_unlock(tc->heap);
}

/* A free that found p marked free already, after counting it in cls's
 * bin: the count goes back, and the slow path tells a double free from
 * a program's own value. */
static void free_uncounted(struct hm_tcache *tc, unsigned cls, void *p)
{
    tc->bins[cls].room++;
    hm_free_slow(tc, p, "free");
}

/* The deferred drain in a few instructions, the rest out of line.  A
 * full bin's block gets free()'s check here, which its fast path left
 * (hm_free_slow tells a double free from a program's own value). */
void hm_flush(struct hm_tcache *tc, unsigned cls, void *p)
{
    struct hm_heap *h = tc->heap;
    struct hm_bin *bin = &tc->bins[cls];
    if (bin->cap < 0) {
        /* The batch's last free puts them all, under the lock. */
        if (h->drained_count < HM_DRAIN_BATCH - 1 && drain_defers(cls) && drain_defer(h, p)) {
            bin->room++;                /* p does not stay in the bin */
            hm_prefetch_write(p);       /* for the put, while the next frees run */
            return;
        }
    } else if (((uintptr_t *)p)[1] == hm_free_key) {
        free_uncounted(tc, cls, p);
        return;
    }
    flush_locked(tc, cls, p);
}

void hm_free_counted(struct hm_tcache *tc, uintptr_t bin_offset, void *p)
{
    free_uncounted(tc, hm_bin_class(bin_offset), p);
}

void hm_bin_return_all(struct hm_heap *h, struct hm_tcache *tc, unsigned cls)
{
    bin_trim(h, tc, cls, 0);
    stash_return_all(h, cls);
    hm_cache_bound_note(h, tc, cls);
}

/* ---- tidying an idle heap ---------------------------------------------- */

/* Not its batches of remote frees (the owner's free path fills them
 * without the lock; they hold at most REMOTE_HELD_MAX) nor its bins (the
 * fast paths'). */
static void stashes_return(struct hm_heap *h)
{
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++) {
        uint32_t n = h->stash[c].count;
        if (n) {
            /* The bound counted the stash since the slow path that last
             * changed it (hm_cache_bound_note); the bin's part stays. */
            stash_return_all(h, c);
            uint32_t bound = h->cache_bound_blocks[c];
            cache_bound_set(h, c, bound > n ? bound - n : 0);
        }
    }
}

void hm_heap_tidy_caches(struct hm_heap *h)
{
    hm_heap_collect(h);
    stashes_return(h);
}

size_t hm_heap_tidy(struct hm_heap *h, size_t budget)
{
    hm_heap_tidy_caches(h);
    /* Its thread made no slow path for the delay: its empty segments go
     * back whole (a thread that wakes maps fresh ones), each counted in
     * the step's budget like a thread's exit (256 idle heaps of 4 such
     * segments held heaps_lock 20 ms in one step, uncounted). */
    size_t cost = (size_t)h->reserve_count * HM_SEGMENT_UNMAP_COST;
    hm_heap_release_reserve(h, true);
    /* Nothing changed since its owner went idle, the delay ago: its nearly
     * empty spans have been so that long. */
    if (cost >= budget)
        return cost;
    return cost + hm_heap_compact_sparse(h, hm_clock_ns(), 0, 1, budget - cost);
}

/* Each malloc_trim has a generation, newer ones greater (see trim_at). */
static _Atomic uint64_t trim_generations;

static uint64_t trim_generation(void)
{
    return atomic_fetch_add_explicit(&trim_generations, 1, memory_order_relaxed) + 1;
}

/* The caller's own heap, whole, whichever trim marked it last: a later
 * trim of another thread's may have begun it between this trim's start
 * and the lock, and it would not have seen the blocks the bins just gave
 * back.  A later trim's cursor is left for it (spans done are skipped). */
static void trim_own(struct hm_heap *h, uint64_t gen)
{
    hm_drained_put(h);
    hm_heap_collect_own(h);
    stashes_return(h);
    struct hm_compact_cursor at = { 0, 0 };
    compact_pass(h, hm_clock_ns(), 0, 0, 1, SIZE_MAX, &at);
    if (h->trim_gen < gen) {
        h->trim_gen = gen;
        h->trim_at = at;        /* done */
    }
}

/* Every page of a span that holds no live block, in every partial span
 * that a block returned to since its last compaction: a live block or a
 * few pin their spans, and waiting for a span to empty would keep the
 * rest of it resident however little is live. */
bool hm_heap_trim(struct hm_heap *h, uint64_t gen, size_t budget, size_t *cost)
{
    *cost = 0;
    if (h->trim_gen > gen)
        return true;            /* a later trim has it */
    if (h->trim_gen < gen) {
        h->trim_gen = gen;
        h->trim_at = (struct hm_compact_cursor){ 0, 0 };
        hm_heap_tidy_caches(h);
    }
    if (h->trim_at.cls < HM_NUM_CLASSES)
        *cost = compact_pass(h, hm_clock_ns(), 0, 0, 1, budget, &h->trim_at);
    return h->trim_at.cls >= HM_NUM_CLASSES;
}

/* ---- slow frees -------------------------------------------------------- */

static bool on_list(void *list, void *p)
{
    for (void *b = list; b; b = *(void **)b)
        if (b == p)
            return true;
    return false;
}

/* Whether p is already free: in this thread's cache, on its span's list,
 * or on the span's remote list.  That one is only read: other threads
 * push onto it meanwhile, but only a holder of the heap's lock (this
 * thread, here) ever takes blocks off it, so a walk from a snapshot of its
 * head is safe.  (A block still in another thread's unsent batch is not
 * seen.) */
static bool is_free_here(struct hm_tcache *tc, struct hm_span *sp, void *p)
{
    return on_list(tc->bins[sp->size_class].head, p) || stash_holds(tc->heap, sp->size_class, p) ||
           drained_holds(tc->heap, p) || on_list(sp->free, p) ||
           on_list(hm_remote_head(atomic_load_explicit(&sp->remote, memory_order_acquire)), p);
}

/* What p (not NULL) is: a block of a span (returned), a large block
 * (*large set) or a bootstrap block (both NULL).  Anything else ends the
 * process with a diagnostic naming `call`. */
static struct hm_span *block_of(void *p, const char *call, struct hm_segment **large)
{
    uintptr_t u = (uintptr_t)p;
    struct hm_segment *seg = hm_segment_of(u);
    *large = NULL;
    if (!seg) {
        if (hm_bootstrap_owns(p))
            return NULL;
        hm_fatal(call, "invalid pointer", p);
    }
    if (seg->kind == HM_SEGMENT_LARGE) {
        if (p != seg->user)
            hm_fatal(call, "invalid pointer", p);
        *large = seg;
        return NULL;
    }
    struct hm_span *sp = hm_span_of(seg, u);
    if (sp == &hm_sentinel_span || !hm_span_is_block(sp, u))
        hm_fatal(call, "invalid pointer", p);
    return sp;
}

/* A block of an exited thread's segment, freed by a thread with a live
 * heap: the segment may become ours (see hm_heap_reclaim).  Not by an
 * exited thread (it has no heap: nothing would give the segment back), nor for
 * a block that looks free already: the remote path's check below ends
 * that double free, where ours would miss the block in another thread's
 * remote batch. */
static bool reclaim(struct hm_tcache *tc, struct hm_span *sp, const uintptr_t *words)
{
    return words[1] != hm_free_key && tc->heap &&
           hm_heap_reclaim(tc->heap, hm_segment_of_span(sp));
}

/* A block of a segment this thread drains (see hm_heap_reclaim): straight
 * back to its span, not into a bin, so no malloc of ours hands it out
 * again and the segment empties.  Such a span hands out nothing, so a
 * block of it that carries the free key is free already, on its span's
 * list or in some thread's remote batch (which the lists do not show):
 * the key alone ends the call, as on the remote path. */
static bool drain_free(struct hm_tcache *tc, struct hm_span *sp, void *p, const char *call)
{
    uintptr_t *words = p;
    struct hm_heap *h = tc->heap;
    if (words[1] == hm_free_key)
        hm_fatal(call, "double free detected", p);
    hm_heap_lock(h);
    /* The tidier may have abandoned the segment again meanwhile (it does
     * so under our lock): then the block goes as into any abandoned one. */
    if (hm_span_owner(sp) != (tc->owner | HM_OWNER_DRAIN)) {
        hm_heap_unlock(h);
        return false;
    }
    if (sp->holes && is_hole(sp, p)) {
        hm_heap_unlock(h);
        hm_fatal(call, "double free detected", p);
    }
    words[1] = hm_free_key;
    hm_span_put(h, sp, p);
    hm_heap_unlock(h);
    return true;
}

void hm_free_slow(struct hm_tcache *tc, void *p, const char *call)
{
    if (!p)
        return;
    struct hm_segment *large;
    struct hm_span *sp = block_of(p, call, &large);
    if (!sp) {
        if (large && !hm_large_free(large))
            hm_fatal(call, "double free detected", p);
        return;                         /* a bootstrap block stays */
    }
    uintptr_t *words = p;
    uintptr_t owner = hm_span_owner(sp);
    if (owner == HM_OWNER_ABANDONED && reclaim(tc, sp, words))
        owner = tc->owner | HM_OWNER_DRAIN;     /* taken over, to drain */
    if (tc->heap && owner == (tc->owner | HM_OWNER_DRAIN)) {
        if (drain_free(tc, sp, p, call))
            return;
        owner = hm_span_owner(sp);
    }
    if (owner != tc->owner) {
        /* Every block is handed out with its second word cleared (bin_pop,
         * hm_refill, hm_alloc_pages: a new way out must clear it too), and
         * every free marks it: the key here means a block that is free
         * already (in its owner's cache or lists, or in a remote batch).
         * Best effort: two threads freeing one block at once can both
         * pass. */
        if (words[1] == hm_free_key)
            hm_fatal(call, "double free detected", p);
        words[1] = hm_free_key;
        remote_free(tc, sp, p);
        return;
    }
    /* Our own block whose second word holds the free key: a double free,
     * unless the program happened to store that value there (the lists
     * tell). */
    if (words[1] == hm_free_key) {
        hm_heap_lock(tc->heap);     /* a tidier may be rebuilding the lists */
        bool is_free = is_free_here(tc, sp, p);
        hm_heap_unlock(tc->heap);
        if (is_free)
            hm_fatal(call, "double free detected", p);
        words[1] = 0;       /* not for a drained put to take for a second free */
    }
    struct hm_bin *bin = &tc->bins[sp->size_class];
    if (--bin->room < 0)
        flush_locked(tc, sp->size_class, p);    /* checked: not through hm_flush's check */
    else
        hm_bin_link(bin, p, hm_free_key);
}

size_t hm_usable_size(void *p, const char *call)
{
    if (!p)
        return 0;
    struct hm_segment *large;
    struct hm_span *sp = block_of(p, call, &large);
    if (sp)
        return sp->block_size;
    return large ? hm_large_usable_size(large) : hm_bootstrap_usable_size(p);
}

/* ---- set-up ------------------------------------------------------------ */

/* A random key: a freed block's second word, so a double free costs one
 * compare to suspect.  getrandom never allocates; fall back to the clock. */
void hm_free_key_init(void)
{
    uintptr_t k = 0;
    if (getrandom(&k, sizeof k, GRND_NONBLOCK) != sizeof k)
        k = hm_clock_precise_ns() * 0x9e3779b97f4a7c15ull ^ (uintptr_t)&k;
    hm_free_key = k | 1;   /* never 0: fresh blocks hold 0 there */
}

/* ---- trim -------------------------------------------------------------- */

/* Every cached block of tc's, bins and stashes, back to its span. */
static void return_cache(struct hm_heap *h, struct hm_tcache *tc)
{
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
        hm_bin_return_all(h, tc, c);
}

/* The bins of the heap for exited threads, which are no thread's: a trim
 * empties them as the caller's own. */
static void trim_exited_bins(void)
{
    sigset_t saved;
    exited_enter(&saved);
    struct hm_heap *h = hm_exited_tcache.heap;
    if (h) {
        hm_heap_lock(h);
        return_cache(h, &hm_exited_tcache);
        hm_heap_unlock(h);
    }
    exited_leave(&saved);
}

void hm_drained_put_at_exit(struct hm_tcache *tc)
{
    struct hm_heap *h = tc->heap;
    if (!h || !h->drained_count || !hm_heap_lock_at_exit(h))
        return;                 /* the batch stays, as at any exit before */
    hm_drained_put(h);
    hm_heap_unlock(h);
}

/* malloc_trim: this thread's cached blocks go back (spans left empty go to
 * their segments), its empty segments are unmapped, and every free page of
 * every segment goes back to the OS now. */
bool hm_trim(struct hm_tcache *tc)
{
    struct hm_heap *h = tc->heap;
    uint64_t before = atomic_load_explicit(&hm_segment_counters.bytes_mapped,
                                           memory_order_relaxed);
    uint64_t gen = trim_generation();
    if (h) {
        hm_heap_lock(h);
        hm_remote_flush(h);
        return_cache(h, tc);
        trim_own(h, gen);
        hm_heap_release_reserve(h, true);
        hm_heap_unlock(h);
    }
    trim_exited_bins();
    hm_heaps_trim_others(h, gen);
    hm_abandoned_sweep(UINT_MAX, true);
    bool released = hm_heap_release_unused();
    size_t purged = hm_segment_purge_all(hm_clock_ns(), 0, HM_PURGE_ALL);
    return released || purged > 0 || atomic_load_explicit(&hm_segment_counters.bytes_mapped,
                                              memory_order_relaxed) < before;
}
