/* Refill box: batches, caps, the refill-count table (Contract B), flushes,
 * remote frees and thread exit. */
#include "test_util.h"

#include <pthread.h>
#include <semaphore.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include "hakmem.h"
#include "ace/ace.h"
#include "hot/hot.h"
#include "refill/heap_internal.h"
#include "refill/refill.h"
#include "segment/segment.h"

#define CLS 3   /* 64-byte blocks */

static void empty_bin(struct hm_tcache *tc, unsigned cls, void **out, unsigned *n)
{
    while (hm_bin_count(&tc->bins[cls]))
        out[(*n)++] = hakmem_malloc(hm_size_class_size(cls));
}

/* Refills until the heap's next refill of cls carves the whole count;
 * leaves the bin empty. */
static void past_slow_start(struct hm_tcache *tc, unsigned cls, void **out, unsigned *n)
{
    do {
        out[(*n)++] = hakmem_malloc(hm_size_class_size(cls));
        empty_bin(tc, cls, out, n);
    } while (tc->heap->stats[cls].refills < HM_SLOW_START_REFILLS);
}

/* A new thread's first refills of a class carve an eighth, a quarter and a
 * half of the count, then all of it; its bin's cap is the full count's.
 * The bins of classes it never used have no cap (nothing set up for them). */
static void *first_refills(void *arg)
{
    (void)arg;
    struct hm_tcache *tc = hm_tcache_self();
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
        assert_true(tc->bins[c].cap == 0 && tc->bins[c].room == 0 && !tc->bins[c].head);
    uint32_t count = hm_refill_count_load(CLS);
    uint32_t expect[] = { count / 8, count / 4, count / 2, count, count };
    void *blocks[512];
    unsigned n = 0;
    for (unsigned i = 0; i < sizeof expect / sizeof expect[0]; i++) {
        blocks[n++] = hakmem_malloc(64);        /* a refill */
        assert_int_equal(tc->heap->stats[CLS].refills, i + 1);
        assert_int_equal(hm_bin_count(&tc->bins[CLS]), expect[i] - 1);
        assert_int_equal(tc->bins[CLS].cap, 2 * count);
        empty_bin(tc, CLS, blocks, &n);
    }
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
        if (c != CLS)
            assert_int_equal(tc->bins[c].cap, 0);
    for (unsigned i = 0; i < n; i++)
        hakmem_free(blocks[i]);
    return NULL;
}

static void first_refills_of_a_heap_start_small(void **state)
{
    (void)state;
    assert_int_equal(hm_refill_count_load(CLS), 64);    /* the default: 8 KiB */
    run_thread(first_refills, NULL);
}

/* A free into a bin that was never refilled (a block of a span the heap
 * took over, in a class the thread has not allocated) sets the bin up as
 * a refill would and keeps the block: no flush. */
static void *free_into_unused_bin(void *arg)
{
    (void)arg;
    struct hm_tcache *tc = hm_tcache_self();
    void *blocks[512];
    unsigned n = 0;
    void *p = hakmem_malloc(64);
    empty_bin(tc, CLS, blocks, &n);
    tc->bins[CLS].cap = tc->bins[CLS].room = 0;     /* as if never refilled */
    uint64_t flushes = tc->heap->stats[CLS].flushes;
    hakmem_free(p);
    uint32_t count = hm_refill_count_load(CLS);
    assert_int_equal(tc->bins[CLS].cap, hm_bin_cap(CLS, count, count));
    assert_int_equal(hm_bin_count(&tc->bins[CLS]), 1);
    assert_ptr_equal(tc->bins[CLS].head, p);
    assert_int_equal(tc->heap->stats[CLS].flushes, flushes);
    assert_ptr_equal(hakmem_malloc(64), p);         /* served from the bin */
    blocks[n++] = p;
    for (unsigned i = 0; i < n; i++)
        hakmem_free(blocks[i]);
    return NULL;
}

static void a_free_into_an_unused_bin_sets_it_up(void **state)
{
    (void)state;
    run_thread(free_into_unused_bin, NULL);
}

static void refill_carves_one_batch(void **state)
{
    (void)state;
    struct hm_tcache *tc = hm_tcache_self();
    void *blocks[512];
    unsigned n = 0;
    past_slow_start(tc, CLS, blocks, &n);
    assert_int_equal(hm_bin_count(&tc->bins[CLS]), 0);

    uint32_t want = hm_refill_count_load(CLS);
    void *p = hm_refill(tc, CLS);
    assert_non_null(p);
    assert_int_equal(hm_bin_count(&tc->bins[CLS]), want - 1);
    assert_int_equal(tc->bins[CLS].cap, 2 * want);
    /* A batch is contiguous blocks in address order when freshly carved. */
    blocks[n++] = p;
    empty_bin(tc, CLS, blocks, &n);
    for (unsigned i = 0; i < n; i++)
        hakmem_free(blocks[i]);
}

/* A refill carves at most HM_CARVE_BYTES of never-carved blocks (one at
 * least, and none that would pass the bound): 4 of a 1 KiB class's 8, 3 of
 * 1280 B's 6, 1 of 3 KiB's 2, 1 of 8 KiB's 2.  A span whose pages are
 * resident carves the whole batch, and blocks handed back come in whole
 * batches.  A batch cut short is left out of the
 * learner's batch of refills (HAKMEM_ACE; forced on here, below the
 * batch that would send an event). */
static void *carve_bound(void *arg)
{
    (void)arg;
    struct hm_tcache *tc = hm_tcache_self();
    void *blocks[512];
    unsigned n = 0;
    const size_t sizes[] = { 1024, 1280, 3072, 8192 };
    const uint32_t counts[] = { 8, 6, 2, 2 }, carved[] = { 4, 3, 1, 1 };
    for (unsigned i = 0; i < 4; i++) {
        unsigned cls = hm_size_class(sizes[i]);
        assert_int_equal(hm_size_class_size(cls), sizes[i]);
        assert_int_equal(hm_refill_count_load(cls), counts[i]);
        past_slow_start(tc, cls, blocks, &n);
        /* Uncapped, the span (with room for the whole count) would carve
         * all of it. */
        struct hm_span *sp = tc->heap->partial[cls];
        assert_non_null(sp);
        assert_true((size_t)(sp->end - sp->bump) >= counts[i] * sizes[i]);
        sp->resident_pages = 0;                         /* nothing resident */
        /* Cut short, it is not counted in the learner's batch. */
        hm_ace_on = true;
        blocks[n++] = hakmem_malloc(sizes[i]);
        hm_ace_on = false;
        assert_int_equal(hm_bin_count(&tc->bins[cls]), carved[i] - 1);
        assert_int_equal(tc->heap->stats[cls].batch_refills, 0);
    }
    /* Resident past the span's next block but short of the batch's 8 KiB:
     * bounded, 4 blocks.  Resident whole: the next refill carves all 8. */
    unsigned cls = hm_size_class(1024);
    empty_bin(tc, cls, blocks, &n);
    struct hm_span *sp = tc->heap->partial[cls];
    sp->resident_pages = (uint16_t)((size_t)(sp->bump - sp->start) / HM_OS_PAGE + 1);
    blocks[n++] = hakmem_malloc(1024);
    assert_int_equal(hm_bin_count(&tc->bins[cls]), 3);
    empty_bin(tc, cls, blocks, &n);
    sp->resident_pages = (uint16_t)(sp->pages * (HM_PAGE_SIZE / HM_OS_PAGE));
    hm_ace_on = true;
    blocks[n++] = hakmem_malloc(1024);
    hm_ace_on = false;
    assert_int_equal(hm_bin_count(&tc->bins[cls]), 7);
    assert_int_equal(tc->heap->stats[cls].batch_refills, 1);   /* a whole batch counts */
    /* Handed back (the first block keeps the span): the rest of the
     * 1 KiB blocks go back to it, and the next refill takes 8 of them. */
    sp->resident_pages = 0;
    for (unsigned i = 1; i < n; i++)
        hakmem_free(blocks[i]);
    hakmem_trim();
    assert_int_equal(hm_bin_count(&tc->bins[cls]), 0);
    void *p = hakmem_malloc(1024);
    assert_int_equal(hm_bin_count(&tc->bins[cls]), 7);
    hakmem_free(p);
    hakmem_free(blocks[0]);
    return NULL;
}

/* In a child: forcing hm_ace_on starts the ACE thread (hm_refill does),
 * which would go on tidying and purging under the tests that follow. */
static void carve_bound_in_a_thread(void)
{
    run_thread(carve_bound, NULL);
}

static void refills_carve_a_page_at_most(void **state)
{
    (void)state;
    char buf[4096];
    expect_exit(carve_bound_in_a_thread, 0, buf, sizeof buf);
}

/* Contract B: a new count changes nothing already handed out; the next
 * refill uses it. */
static void refill_count_next_refill_only(void **state)
{
    (void)state;
    struct hm_tcache *tc = hm_tcache_self();
    void *blocks[1024];
    unsigned n = 0;
    past_slow_start(tc, CLS, blocks, &n);
    blocks[n++] = hakmem_malloc(64);            /* refill with the default */
    struct hm_refill_bounds b = hm_refill_bounds(CLS);
    assert_int_equal(hm_bin_count(&tc->bins[CLS]), b.def - 1);
    uint32_t cap_before = tc->bins[CLS].cap;

    hm_refill_count_store(CLS, 5);
    assert_int_equal(hm_refill_count_load(CLS), 5);
    assert_int_equal(hm_bin_count(&tc->bins[CLS]), b.def - 1);   /* untouched */
    assert_int_equal(tc->bins[CLS].cap, cap_before);

    empty_bin(tc, CLS, blocks, &n);
    blocks[n++] = hakmem_malloc(64);            /* next refill: 5 */
    assert_int_equal(hm_bin_count(&tc->bins[CLS]), 4);
    assert_int_equal(tc->bins[CLS].cap, hm_bin_cap(CLS, 5, 5));

    hm_refill_count_store(CLS, 100000);         /* clamped to the bound */
    assert_int_equal(hm_refill_count_load(CLS), b.max);
    hm_refill_count_store(CLS, 0);
    assert_int_equal(hm_refill_count_load(CLS), b.min);
    hm_refill_count_store(CLS, b.def);
    for (unsigned i = 0; i < n; i++)
        hakmem_free(blocks[i]);
}

/* Twice the batch, widened by up to 512 KiB of blocks (at most the
 * stash's room: 16 blocks up to 64 KiB, 1 MiB above) while a flush (the
 * cap's newer half and one) still fits in the stash. */
static void bin_caps_widen_by_the_stash(void **state)
{
    (void)state;
    struct { size_t size; uint32_t want, got; int32_t cap; } cases[] = {
        { 4096, 2, 2, 4 + 16 },         /* room 16: up to 30 */
        { 8192, 2, 2, 4 + 16 },
        { 8192, 2, 5, 7 + 16 },         /* after a whole free list */
        { 2048, 8, 8, 30 },             /* a flush of 16 fills the stash */
        { 32768, 2, 2, 4 + 16 },        /* 512 KiB more */
        { 65536, 2, 2, 4 + 8 },
        { 131072, 2, 2, 4 + 4 },        /* room 8: up to 14 */
        { 512, 16, 16, 32 },            /* 32 is already wider than 30 */
        { 64, 64, 64, 128 },
        { 64, 5, 5, 26 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        assert_int_equal(hm_bin_cap(hm_size_class(cases[i].size), cases[i].want, cases[i].got),
                         cases[i].cap);
    assert_int_equal(hm_bin_cap(HM_PAGES_CLASS, 1, 1), 2);
}

/* The widening and the stash's room shrink with the thread's share of
 * HAKMEM_TCACHE_MAX_KB (32 MiB here), below 24 MiB a thread, down to 64
 * KiB and 256 KiB. */
static pthread_barrier_t sharers_ready, sharers_done;

static void *share_the_budget(void *arg)
{
    (void)arg;
    hakmem_free(hakmem_malloc(16));         /* a heap: it counts as live */
    pthread_barrier_wait(&sharers_ready);
    pthread_barrier_wait(&sharers_done);
    return NULL;
}

static void caps_with_live_threads(unsigned others, int32_t cap64k, int32_t cap128k, int32_t cap32k)
{
    pthread_t t[8];
    pthread_barrier_init(&sharers_ready, NULL, others + 1);
    pthread_barrier_init(&sharers_done, NULL, others + 1);
    for (unsigned i = 0; i < others; i++)
        pthread_create(&t[i], NULL, share_the_budget, NULL);
    pthread_barrier_wait(&sharers_ready);
    assert_int_equal(hm_bin_cap(hm_size_class(65536), 2, 2), cap64k);
    assert_int_equal(hm_bin_cap(hm_size_class(131072), 2, 2), cap128k);
    assert_int_equal(hm_bin_cap(hm_size_class(32768), 2, 2), cap32k);
    pthread_barrier_wait(&sharers_done);
    for (unsigned i = 0; i < others; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&sharers_ready);
    pthread_barrier_destroy(&sharers_done);
}

static void bin_caps_shrink_with_the_share(void **state)
{
    (void)state;
    hakmem_free(hakmem_malloc(16));
    assert_int_equal(hm_heap_live_count(), 1);
    caps_with_live_threads(0, 4 + 8, 4 + 4, 4 + 16);
    /* 16 MiB each: a 683 KiB stash (10 blocks of 64 KiB, 5 of 128 KiB),
     * 341 KiB more in a bin. */
    caps_with_live_threads(1, 4 + 5, 4 + 2, 4 + 10);
    /* 6.4 MiB each: 273 KiB and 137 KiB. */
    caps_with_live_threads(4, 6, 4, 4 + 4);
    /* 4 MiB each: the stash at its least, 256 KiB; 85 KiB more in a bin. */
    caps_with_live_threads(7, 5, 4, 6);
}

static void bins_flush_past_their_cap(void **state)
{
    (void)state;
    struct hm_tcache *tc = hm_tcache_self();
    struct hakmem_class_info before, after;
    hakmem_class_info(CLS, &before);
    /* A few overflows: fewer than would start the bin draining. */
    enum { N = 300 };
    void *blocks[N];
    for (int i = 0; i < N; i++)
        blocks[i] = hakmem_malloc(64);
    int32_t cap = tc->bins[CLS].cap;
    assert_int_equal(cap, 2 * hm_refill_count_load(CLS));
    for (int i = 0; i < N; i++) {
        hakmem_free(blocks[i]);
        assert_true(hm_bin_count(&tc->bins[CLS]) <= (uint32_t)cap);
    }
    hakmem_class_info(CLS, &after);
    assert_int_equal(tc->bins[CLS].cap, cap);
    assert_true(after.flushes > before.flushes);
    assert_true(after.blocks_flushed - before.blocks_flushed >= (uint64_t)(N - cap));
    assert_int_equal(after.blocks_drained, before.blocks_drained);
}

/* The fewest spans (64 KiB pages: the class's spans are one page) that
 * hold 80% of the blocks of a[0..n), and in *total the spans holding any. */
static int by_count_desc(const void *x, const void *y)
{
    return (int)*(const unsigned *)y - (int)*(const unsigned *)x;
}

static unsigned spans_holding_most(void **a, size_t n, unsigned *total)
{
    static uintptr_t page[4096];
    static unsigned count[4096];
    unsigned k = 0;
    for (size_t i = 0; i < n; i++) {
        uintptr_t pg = (uintptr_t)a[i] >> 16;
        unsigned j = 0;
        while (j < k && page[j] != pg)
            j++;
        if (j == k) {
            assert_true(k < 4096);
            page[k] = pg;
            count[k++] = 0;
        }
        count[j]++;
    }
    qsort(count, k, sizeof count[0], by_count_desc);
    size_t held = 0;
    unsigned m = 0;
    while (held * 5 < n * 4)
        held += count[m++];
    *total = k;
    return m;
}

/* A class whose live set shrinks (three frees for each malloc) starts
 * draining: frees go back to their spans and mallocs are served
 * by refills, so the blocks that survive the shrink gather in few spans
 * and the others empty.  A cache that reused the last freed blocks would
 * scatter them over every span.  Back in balance, the bin caches again. */
static void shrinking_class_drains_and_gathers_survivors(void **state)
{
    (void)state;
    enum { DCLS = 2, SIZE = 48, N = 100000 };  /* 1365 blocks per span */
    struct hm_tcache *tc = hm_tcache_self();
    static void *a[N + 1024];   /* the shrink may allocate before it frees */
    size_t n = 0;
    uint64_t rng = 7;
    struct hakmem_class_info before, after;
    hakmem_class_info(DCLS, &before);
    for (; n < N; n++)
        a[n] = hakmem_malloc(SIZE);
    unsigned spans_at_peak;
    spans_holding_most(a, n, &spans_at_peak);
    bool drained = false;
    while (n > N / 100) {
        if (next_rand(&rng) % 4) {
            size_t i = next_rand(&rng) % n;
            hakmem_free(a[i]);
            a[i] = a[--n];
        } else {
            a[n++] = hakmem_malloc(SIZE);
        }
        drained |= tc->bins[DCLS].cap == HM_BIN_DRAINING;
    }
    assert_true(drained);
    hakmem_class_info(DCLS, &after);
    assert_true(after.blocks_drained - before.blocks_drained > N / 2);
    /* ~1000 survivors: ~100 from before the shrink, scattered over the
     * spans; most of the rest in the few spans the last refills used.
     * Scattered evenly, 80% of them would need 80% of the spans. */
    unsigned spans_left;
    unsigned most = spans_holding_most(a, n, &spans_left);
    assert_true(spans_at_peak >= 70);
    assert_true(most * 4 <= spans_at_peak);

    /* Balance: one malloc per free.  The bin stops draining: its cap is a
     * refill's again (twice the count, or more after a whole free list). */
    for (int i = 0; i < 2000; i++) {
        size_t j = next_rand(&rng) % n;
        hakmem_free(a[j]);
        a[j] = hakmem_malloc(SIZE);
    }
    int32_t want = (int32_t)hm_refill_count_load(DCLS);
    assert_true(tc->bins[DCLS].cap >= 2 * want && tc->bins[DCLS].cap <= 9 * want);
    while (n)
        hakmem_free(a[--n]);
}

/* Fills a[0..n) with blocks of `size`, then frees them in order until the
 * class's bin drains and `waiting` frees wait in the batch.  Returns how
 * many it freed (a[0..that) are gone). */
static int start_draining(void **a, int n, size_t size, uint32_t waiting)
{
    struct hm_tcache *tc = hm_tcache_self();
    unsigned cls = hm_size_class(size);
    for (int i = 0; i < n; i++)
        a[i] = hakmem_malloc(size);
    int i = 0;
    while (tc->bins[cls].cap != HM_BIN_DRAINING || tc->heap->drained_count != waiting) {
        assert_true(i < n / 2);
        hakmem_free(a[i++]);
    }
    return i;
}

/* A draining bin's frees wait off the bin, fewer than HM_DRAIN_BATCH, and
 * go back to their spans together: at the batch's last free, or first
 * thing in a refill.  No malloc hands out a waiting block. */
static void drained_frees_go_back_a_batch_at_a_time(void **state)
{
    (void)state;
    enum { DCLS = 2, SIZE = 48, N = 4000 };
    struct hm_tcache *tc = hm_tcache_self();
    struct hm_heap *h = tc->heap;
    static void *a[N];
    int i = start_draining(a, N, SIZE, 0);  /* at a batch's start */

    struct hakmem_class_info before, after;
    hakmem_class_info(DCLS, &before);
    for (int k = 0; k < HM_DRAIN_BATCH - 1; k++) {
        hakmem_free(a[i++]);
        assert_int_equal(h->drained_count, k + 1);
        assert_ptr_equal(h->drained[k], a[i - 1]);
    }
    hakmem_class_info(DCLS, &after);
    assert_int_equal(after.blocks_drained, before.blocks_drained);
    hakmem_free(a[i++]);                    /* the batch's last */
    assert_int_equal(h->drained_count, 0);
    hakmem_class_info(DCLS, &after);
    assert_int_equal(after.blocks_drained, before.blocks_drained + HM_DRAIN_BATCH);

    /* Three wait; mallocs empty the bin, the refill puts them back. */
    void *waiting[3];
    for (int k = 0; k < 3; k++) {
        waiting[k] = a[i];
        hakmem_free(a[i++]);
    }
    assert_int_equal(h->drained_count, 3);
    hakmem_class_info(DCLS, &before);
    uint64_t refills = h->stats[DCLS].refills;
    int j = 0;
    while (h->stats[DCLS].refills == refills) {
        assert_true(j < i);
        a[j] = hakmem_malloc(SIZE);
        if (h->stats[DCLS].refills == refills)
            for (int k = 0; k < 3; k++)
                assert_ptr_not_equal(a[j], waiting[k]);
        j++;
    }
    assert_int_equal(h->drained_count, 0);
    hakmem_class_info(DCLS, &after);
    assert_int_equal(after.blocks_drained, before.blocks_drained + 3);
    for (int k = 0; k < j; k++)
        hakmem_free(a[k]);
    for (int k = i; k < N; k++)
        hakmem_free(a[k]);
    hakmem_trim();
}

/* A signal handler that frees in the middle of a drain_defer (here
 * played by marking the batch busy) must leave the batch alone, or the
 * interrupted change would later bring back blocks already put: its
 * frees fill the batch, then go back one at a time. */
static void busy_batch_is_left_alone(void **state)
{
    (void)state;
    enum { DCLS = 2, SIZE = 48, N = 4000 };
    struct hm_tcache *tc = hm_tcache_self();
    struct hm_heap *h = tc->heap;
    static void *a[N];
    int i = start_draining(a, N, SIZE, 3);
    struct hakmem_class_info before, after;
    hakmem_class_info(DCLS, &before);
    enum { FREES = HM_DRAIN_BATCH + 4 };
    h->drained_busy = 1;
    for (int k = 0; k < FREES; k++)
        hakmem_free(a[i++]);
    uint32_t waiting = h->drained_count;
    hakmem_class_info(DCLS, &after);
    h->drained_busy = 0;                /* before the checks: the next tests need it */
    assert_int_equal(waiting, HM_DRAIN_BATCH);
    assert_int_equal(after.blocks_drained, before.blocks_drained + FREES - (HM_DRAIN_BATCH - 3));
    hakmem_trim();
    assert_int_equal(h->drained_count, 0);
    hakmem_class_info(DCLS, &after);
    assert_int_equal(after.blocks_drained, before.blocks_drained + FREES + 3);
    while (i < N)
        hakmem_free(a[i++]);
    hakmem_trim();
}

/* A refill whose put must leave the batch (a handler's, in the middle of
 * a drain_defer: played by the busy mark) keeps the bin draining even
 * when the window says the shrink is over: the waiting blocks carry no
 * free key, so a second free of one must come to the batch, not into a
 * bin that caches it and hands it out. */
static void refill_keeps_draining(bool in_a_put)
{
    enum { DCLS = 2, SIZE = 48, N = 4000 };
    struct hm_tcache *tc = hm_tcache_self();
    struct hm_heap *h = tc->heap;
    static void *a[N];
    int i = start_draining(a, N, SIZE, 3);
    struct hm_heap_class_stats *s = &h->stats[DCLS];
    s->drain_allocs = 1000;                     /* a window of mallocs only */
    s->drain_frees_at = (uint32_t)s->blocks_drained;
    uint64_t refills = s->refills;
    if (in_a_put) {                             /* the batch taken, its put under way */
        h->drained_putting = 1;
        h->drained_count = 0;
    } else {
        h->drained_busy = 1;                    /* a drain_defer under way */
    }
    int j = 0;
    while (s->refills == refills && j < i)
        a[j++] = hakmem_malloc(SIZE);
    int32_t cap = tc->bins[DCLS].cap;
    uint32_t waiting = h->drained_count;
    h->drained_busy = 0;                        /* before the checks */
    h->drained_putting = 0;
    if (in_a_put)
        h->drained_count = 3;
    assert_true(s->refills > refills);
    assert_int_equal(waiting, in_a_put ? 0 : 3);
    assert_int_equal(cap, HM_BIN_DRAINING);
    while (j)
        hakmem_free(a[--j]);
    while (i < N)
        hakmem_free(a[i++]);
    hakmem_trim();
}

static void refill_leaving_the_batch_keeps_draining(void **state)
{
    (void)state;
    refill_keeps_draining(false);
}

static void refill_inside_a_put_keeps_draining(void **state)
{
    (void)state;
    refill_keeps_draining(true);
}

/* At the process's exit the exiting thread's batch goes back, but not at
 * the price of waiting for ever on its heap's lock: here a tidier's hold
 * that nobody will let go (a child forked without the fork handlers
 * inherits such a word).  The child must exit, leaving the batch. */
static void exit_does_not_wait_for_a_stuck_tidier(void **state)
{
    (void)state;
    pid_t pid = fork();
    if (pid == 0) {
        static void *a[4000];
        start_draining(a, 4000, 48, 3);
        if (!hm_heap_trylock(hm_tcache_self()->heap))
            _exit(3);
        alarm(10);                      /* a hang dies of SIGALRM */
        exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

/* A draining bin of a class above HM_DRAIN_DEFER_MAX hands each free back
 * at once, as before the batches: nothing waits. */
static void drained_big_blocks_go_back_at_once(void **state)
{
    (void)state;
    enum { SIZE = 2048, N = 3000 };
    unsigned cls = hm_size_class(SIZE);
    struct hm_tcache *tc = hm_tcache_self();
    struct hm_heap *h = tc->heap;
    static void *a[N];
    int i = start_draining(a, N, SIZE, h->drained_count);
    uint32_t waiting = h->drained_count;
    struct hakmem_class_info before, after;
    for (int k = 0; k < 10; k++) {
        hakmem_class_info(cls, &before);
        hakmem_free(a[i++]);
        hakmem_class_info(cls, &after);
        assert_int_equal(after.blocks_drained, before.blocks_drained + 1);
        assert_int_equal(h->drained_count, waiting);
    }
    while (i < N)
        hakmem_free(a[i++]);
    hakmem_trim();
}

/* The budget's check counts the caches only when h->cache_bound, noted
 * at the slow paths, exceeds the budget: each class's term must bound what
 * its bin and stash hold at every moment, and the bound be their sum.
 * Random mallocs and frees over small and stashed medium classes, with
 * whole free lists, overflows and drains among them. */
static void expect_bound_holds(struct hm_heap *h, struct hm_tcache *tc)
{
    uint64_t sum = 0;
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++) {
        uint32_t held = hm_bin_count(&tc->bins[c]) + hm_stash_count(h, c);
        assert_true(held <= h->cache_bound_blocks[c]);
        sum += (uint64_t)h->cache_bound_blocks[c] * hm_size_class_size(c);
    }
    assert_int_equal(sum, h->cache_bound);
}

static void cache_bound_covers_the_caches(void **state)
{
    (void)state;
    enum { N = 4096 };
    static void *a[N];
    static const size_t sizes[] = { 16, 48, 200, 1000, 3000, 9000, 20000, 70000 };
    struct hm_tcache *tc = hm_tcache_self();
    uint64_t rng = 11;
    size_t n = 0;
    for (int i = 0; i < 100000; i++) {
        bool grow = n < N / 8 || (n < N && next_rand(&rng) % 2);
        if (grow) {
            a[n++] = hakmem_malloc(sizes[next_rand(&rng) % 8]);
        } else {
            size_t j = next_rand(&rng) % n;
            hakmem_free(a[j]);
            a[j] = a[--n];
        }
        expect_bound_holds(tc->heap, tc);
    }
    while (n) {
        hakmem_free(a[--n]);
        expect_bound_holds(tc->heap, tc);
    }
    hakmem_trim();
    expect_bound_holds(tc->heap, tc);
}

struct handoff {
    void **blocks;
    int n;
};

static void *free_all(void *arg)
{
    struct handoff *h = arg;
    for (int i = 0; i < h->n; i++)
        hakmem_free(h->blocks[i]);
    return NULL;
}

static void remote_frees_come_back_to_the_owner(void **state)
{
    (void)state;
    enum { N = 20000 };
    static void *blocks[N];
    struct hakmem_class_info before, after;
    hakmem_class_info(CLS, &before);
    for (int i = 0; i < N; i++) {
        blocks[i] = hakmem_malloc(64);
        fill(blocks[i], 64, (unsigned)i);
    }
    struct handoff h = { blocks, N };
    pthread_t t;
    pthread_create(&t, NULL, free_all, &h);
    pthread_join(t, NULL);
    /* The owner collects them when its spans run dry. */
    for (int i = 0; i < N; i++)
        blocks[i] = hakmem_malloc(64);
    hakmem_class_info(CLS, &after);
    assert_true(after.remote_frees - before.remote_frees >= N / 2);
    for (int i = 0; i < N; i++)
        hakmem_free(blocks[i]);
}

/* Remote frees are batched per class: a thread that frees another's
 * blocks of several classes in turn sends each class's blocks 32 at a
 * time, not one CAS per block as a single batch (sent at every change of
 * span) would. */
/* An owner thread that allocates and then waits, a freer thread that
 * frees its blocks in steps, and the test thread looking in between: each
 * step is two waits on `step` (freed, looked at). */
struct trio {
    pthread_barrier_t ready, step, done;
    pthread_t owner, freer;
};

static void trio_start(struct trio *t, void *(*owner)(void *), void *(*freer)(void *),
                       void *arg)
{
    pthread_barrier_init(&t->ready, NULL, 3);
    pthread_barrier_init(&t->step, NULL, 2);
    pthread_barrier_init(&t->done, NULL, 2);
    pthread_create(&t->owner, NULL, owner, arg);
    pthread_create(&t->freer, NULL, freer, arg);
    pthread_barrier_wait(&t->ready);
}

/* After the freer has exited (joined): the owner goes. */
static void trio_finish(struct trio *t)
{
    pthread_barrier_wait(&t->done);
    pthread_join(t->owner, NULL);
    pthread_barrier_destroy(&t->ready);
    pthread_barrier_destroy(&t->step);
    pthread_barrier_destroy(&t->done);
}

static struct hm_span *span_at(void *p)
{
    return hm_span_of(hm_segment_of((uintptr_t)p), (uintptr_t)p);
}

static uint32_t list_length(void *b)
{
    uint32_t n = 0;
    for (; b; b = *(void **)b)
        n++;
    return n;
}

/* The count the refill relies on: carved blocks, less those out and the
 * holes, are exactly the span's free list. */
static void expect_listed(struct hm_span *sp)
{
    uint32_t carved = (uint32_t)((size_t)(sp->bump - sp->start) / sp->block_size);
    assert_int_equal(carved - sp->used - sp->holes, list_length(sp->free));
}

/* Gives back the bin (and stash) of the span's class and returns the
 * span's free list head.  Not by a trim: a trim also gives back the pages
 * of the span's free blocks, which leaves no list. */
static void *to_span_list(struct hm_span *sp)
{
    struct hm_tcache *tc = hm_tcache_self();
    hm_heap_lock(tc->heap);
    hm_bin_return_all(tc->heap, tc, sp->size_class);
    hm_heap_unlock(tc->heap);
    expect_listed(sp);
    return sp->free;
}

/* Eight blocks of cls from one span, with the bin emptied after them (into
 * rest) so that frees start from an empty bin. */
static struct hm_span *eight_blocks_of_a_span(struct hm_tcache *tc, unsigned cls, void **b,
                                              void **rest, unsigned *nrest)
{
    for (int i = 0; i < 8; i++)
        b[i] = hakmem_malloc(hm_size_class_size(cls));
    empty_bin(tc, cls, rest, nrest);
    struct hm_span *sp = span_at(b[0]);
    for (int i = 1; i < 8; i++)
        assert_ptr_equal(span_at(b[i]), sp);
    return sp;
}

/* A span's free list of at most 8 batches and 32 KiB (or no longer than
 * the bin holds) goes into the bin whole, in its order: no walk through its
 * (mostly cold) blocks, and the bin's cap leaves room for a batch of frees
 * on top.  A longer one gives the batch, taken one by one.  8 KiB blocks
 * with batches of 2: lists of up to 5 (the bin's 4 and the block returned;
 * 32 KiB is only 4 of them) go whole; the span holds 8. */
static void short_free_lists_go_whole(void **state)
{
    (void)state;
    struct hm_tcache *tc = hm_tcache_self();
    unsigned cls = hm_size_class(8192);
    hm_refill_count_store(cls, 2);
    void *b[8], *rest[8];
    unsigned nrest = 0;
    struct hm_span *sp = eight_blocks_of_a_span(tc, cls, b, rest, &nrest);
    assert_int_equal(sp->capacity, 8);

    hakmem_free(b[2]);
    hakmem_free(b[3]);
    void *head = to_span_list(sp);
    assert_int_equal(list_length(head), 2);
    void *p = hakmem_malloc(8192);              /* the whole list: a batch */
    assert_ptr_equal(p, head);
    assert_null(sp->free);
    assert_int_equal(hm_bin_count(&tc->bins[cls]), 1);
    assert_int_equal(tc->bins[cls].cap, hm_bin_cap(cls, 2, 2));
    expect_listed(sp);

    hakmem_free(p);
    for (int i = 4; i < 7; i++)
        hakmem_free(b[i]);
    head = to_span_list(sp);
    assert_int_equal(list_length(head), 5);
    p = hakmem_malloc(8192);                    /* the whole list: more than a batch */
    assert_ptr_equal(p, head);
    assert_null(sp->free);
    assert_int_equal(hm_bin_count(&tc->bins[cls]), 4);
    assert_int_equal(tc->bins[cls].cap, hm_bin_cap(cls, 2, 5));
    assert_int_equal(hm_bin_cap(cls, 2, 5), hm_bin_cap(cls, 2, 2) + 3);
    expect_listed(sp);

    hakmem_free(p);
    hakmem_free(b[7]);
    head = to_span_list(sp);
    assert_int_equal(list_length(head), 6);
    p = hakmem_malloc(8192);                    /* two of six */
    assert_ptr_not_equal(p, head);
    assert_int_equal(list_length(sp->free), 4);
    assert_int_equal(hm_bin_count(&tc->bins[cls]), 1);
    assert_int_equal(tc->bins[cls].cap, hm_bin_cap(cls, 2, 2));
    expect_listed(sp);

    hakmem_free(p);
    for (int i = 0; i < 2; i++)
        hakmem_free(b[i]);
    for (unsigned i = 0; i < nrest; i++)
        hakmem_free(rest[i]);
    hakmem_trim();
    hm_refill_count_store(cls, hm_refill_bounds(cls).def);
}

/* A medium class's flush moves the bin's newest blocks into the stash (no
 * walk to the bin's older end) and the next refill takes them back, newest
 * first, without touching a span; a trim gives the stash back to the
 * spans. */
static uint32_t used_in_spans(void **b, unsigned n)
{
    struct hm_span *seen[64];
    unsigned nseen = 0;
    uint32_t used = 0;
    for (unsigned i = 0; i < n; i++) {
        struct hm_span *sp = span_at(b[i]);
        unsigned j = 0;
        while (j < nseen && seen[j] != sp)
            j++;
        if (j == nseen) {
            seen[nseen++] = sp;
            used += sp->used;
        }
    }
    return used;
}

static void medium_flushes_go_to_the_stash(void **state)
{
    (void)state;
    struct hm_tcache *tc = hm_tcache_self();
    unsigned cls = hm_size_class(4096);         /* batches of 2, a bin of 20 */
    assert_int_equal(hm_refill_count_load(cls), 2);
    void *b[32];
    for (int i = 0; i < 32; i++)
        b[i] = hakmem_malloc(4096);
    hakmem_trim();                              /* empty bin and stash */
    /* The last refill's cap: 20, or more after a whole free list. */
    int32_t cap = tc->bins[cls].cap;
    assert_true(cap >= 20 && cap <= 30);
    int n = cap + 1, keep = cap / 2, moved = n - keep;
    uint32_t used = used_in_spans(b, 32);

    struct hakmem_class_info before, after;
    hakmem_class_info(cls, &before);
    for (int i = 0; i < n; i++)                 /* the last overflows */
        hakmem_free(b[i]);
    hakmem_class_info(cls, &after);
    assert_int_equal(after.flushes, before.flushes + 1);
    assert_int_equal(after.blocks_flushed, before.blocks_flushed + (uint64_t)moved);
    assert_int_equal(after.blocks_cached, (uint64_t)n);     /* bin and stash */
    assert_int_equal(hm_bin_count(&tc->bins[cls]), (uint32_t)keep);
    assert_int_equal(used_in_spans(b, 32), used);   /* no block reached a span */

    for (int i = keep - 1; i >= 0; i--)         /* the bin kept the oldest */
        assert_ptr_equal(hakmem_malloc(4096), b[i]);
    assert_ptr_equal(hakmem_malloc(4096), b[n - 1]);    /* a refill: the stash's newest */
    assert_ptr_equal(hakmem_malloc(4096), b[n - 2]);
    hakmem_class_info(cls, &after);
    assert_int_equal(after.refills, before.refills + 1);
    assert_int_equal(after.blocks_cached, (uint64_t)(moved - 2));
    assert_int_equal(used_in_spans(b, 32), used);

    hakmem_trim();                              /* the stash goes back too */
    hakmem_class_info(cls, &after);
    assert_int_equal(after.blocks_cached, 0);
    assert_int_equal(used_in_spans(b, 32), used - (uint32_t)(moved - 2));

    for (int i = 0; i < keep; i++)
        hakmem_free(b[i]);
    hakmem_free(b[n - 1]);
    hakmem_free(b[n - 2]);
    for (int i = n; i < 32; i++)
        hakmem_free(b[i]);
}

enum { MIXED_CLASSES = 8, MIXED_BLOCKS = 40 };
struct mixed {
    struct trio t;
    void *b[MIXED_CLASSES][MIXED_BLOCKS];
};

static void *mixed_owner(void *arg)
{
    struct mixed *m = arg;
    for (int i = 0; i < MIXED_BLOCKS; i++)
        for (int c = 0; c < MIXED_CLASSES; c++)
            m->b[c][i] = hakmem_malloc(16 * (size_t)(c + 1));
    pthread_barrier_wait(&m->t.ready);
    pthread_barrier_wait(&m->t.done);         /* no refill meanwhile: nothing collected */
    return NULL;
}

static void mixed_free(struct mixed *m, int from, int to)
{
    for (int i = from; i < to; i++)
        for (int c = 0; c < MIXED_CLASSES; c++)
            hakmem_free(m->b[c][i]);
}

static void *mixed_freer(void *arg)
{
    struct mixed *m = arg;
    pthread_barrier_wait(&m->t.ready);
    mixed_free(m, 0, 31);
    pthread_barrier_wait(&m->t.step);         /* freed */
    pthread_barrier_wait(&m->t.step);         /* looked at */
    mixed_free(m, 31, 32);
    pthread_barrier_wait(&m->t.step);
    pthread_barrier_wait(&m->t.step);
    mixed_free(m, 32, MIXED_BLOCKS);        /* the rest go at exit */
    return NULL;
}

/* A span's remote list, walked.  The owner splices it without a walk, from
 * the length in its word and the tail its first pusher left: both must be
 * the walk's. */
static unsigned remote_length(struct hm_span *sp)
{
    uintptr_t w = atomic_load(&sp->remote);
    unsigned n = 0;
    void *last = NULL;
    for (void *b = hm_remote_head(w); b; b = *(void **)b) {
        last = b;
        n++;
    }
    assert_int_equal(hm_remote_count(w), n);
    if (n)
        assert_ptr_equal(sp->remote_tail, last);
    return n;
}

static void expect_remote_lengths(struct hm_span **sp, unsigned n)
{
    for (int c = 0; c < MIXED_CLASSES; c++)
        assert_int_equal(remote_length(sp[c]), n);
}

static void remote_frees_are_batched_per_class(void **state)
{
    (void)state;
    static struct mixed m;
    trio_start(&m.t, mixed_owner, mixed_freer, &m);
    struct hm_span *sp[MIXED_CLASSES];
    for (int c = 0; c < MIXED_CLASSES; c++) {   /* a fresh heap: one span a class */
        sp[c] = span_at(m.b[c][0]);
        for (int i = 1; i < MIXED_BLOCKS; i++)
            assert_ptr_equal(span_at(m.b[c][i]), sp[c]);
    }
    pthread_barrier_wait(&m.t.step);
    expect_remote_lengths(sp, 0);           /* 31 a class: all still batched */
    pthread_barrier_wait(&m.t.step);
    pthread_barrier_wait(&m.t.step);
    expect_remote_lengths(sp, 32);          /* the 32nd sent each batch whole */
    pthread_barrier_wait(&m.t.step);
    pthread_join(m.t.freer, NULL);
    expect_remote_lengths(sp, MIXED_BLOCKS);    /* exit sent the rest */
    trio_finish(&m.t);
}

/* Batches of big blocks go when they hold all their span's blocks: a
 * page block (its span's one block) at once, five 12 KiB blocks (a 64 KiB
 * span's five) with the fifth, so a thread that stops freeing does not
 * keep them from their owner. */
struct big_frees {
    struct trio t;
    char *page_block, *b12k[5];
};

static void *big_owner(void *arg)
{
    struct big_frees *m = arg;
    m->page_block = hakmem_malloc(1u << 20);
    for (int i = 0; i < 5; i++)
        m->b12k[i] = hakmem_malloc(12 * 1024);
    pthread_barrier_wait(&m->t.ready);
    pthread_barrier_wait(&m->t.done);
    return NULL;
}

static void *big_freer(void *arg)
{
    struct big_frees *m = arg;
    pthread_barrier_wait(&m->t.ready);
    hakmem_free(m->page_block);
    for (int i = 0; i < 4; i++)
        hakmem_free(m->b12k[i]);
    pthread_barrier_wait(&m->t.step);         /* freed */
    pthread_barrier_wait(&m->t.step);         /* looked at */
    hakmem_free(m->b12k[4]);
    pthread_barrier_wait(&m->t.step);
    pthread_barrier_wait(&m->t.step);
    return NULL;
}

static void big_batches_go_when_their_span_is_covered(void **state)
{
    (void)state;
    static struct big_frees m;
    trio_start(&m.t, big_owner, big_freer, &m);
    struct hm_span *pages = span_at(m.page_block), *small = span_at(m.b12k[0]);
    for (int i = 1; i < 5; i++)             /* a fresh heap: one span */
        assert_ptr_equal(span_at(m.b12k[i]), small);
    assert_int_equal(small->capacity, 5);
    pthread_barrier_wait(&m.t.step);
    assert_int_equal(remote_length(pages), 1);  /* its span's one block: sent */
    assert_int_equal(remote_length(small), 0);  /* 4 of 5: still batched */
    pthread_barrier_wait(&m.t.step);
    pthread_barrier_wait(&m.t.step);
    assert_int_equal(remote_length(small), 5);
    pthread_barrier_wait(&m.t.step);
    pthread_join(m.t.freer, NULL);
    trio_finish(&m.t);
}

static void *alloc_and_exit(void *arg)
{
    void **out = arg;
    for (int i = 0; i < 1000; i++)
        out[i] = hakmem_malloc(100 + (size_t)i);
    for (int i = 0; i < 1000; i += 2)
        hakmem_free(out[i]);                   /* some go back before exit */
    return NULL;
}

static void exited_threads_segments_are_adopted(void **state)
{
    (void)state;
    static void *out[1000];
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    pthread_t t;
    pthread_create(&t, NULL, alloc_and_exit, out);
    pthread_join(t, NULL);
    hakmem_stats(&s1);
    assert_int_equal(s1.threads_exited, s0.threads_exited + 1);
    assert_true(s1.segments_abandoned > s0.segments_abandoned);
    /* The blocks the dead thread left are still ours and intact. */
    for (int i = 1; i < 1000; i += 2) {
        assert_true(hakmem_malloc_usable_size(out[i]) >= 100 + (size_t)i);
        hakmem_free(out[i]);
    }
    /* A new thread needing memory takes the abandoned segment over. */
    pthread_create(&t, NULL, alloc_and_exit, out);
    pthread_join(t, NULL);
    hakmem_stats(&s1);
    assert_true(s1.segments_adopted > s0.segments_adopted);
    for (int i = 1; i < 1000; i += 2)
        hakmem_free(out[i]);
}

static void *free_one(void *p)
{
    hakmem_free(p);
    return NULL;
}

/* Blocks above the classes up to 2 MiB are spans of pages: freed, their
 * pages are reused at once, by the owner or after a remote free. */
static void page_blocks_reuse_their_pages(void **state)
{
    (void)state;
    char *p = hakmem_malloc(300000);
    assert_int_equal((uintptr_t)p % 65536, 0);
    assert_int_equal(hakmem_malloc_usable_size(p), 5 * 65536);
    memset(p, 1, 300000);
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    hakmem_free(p);
    char *q = hakmem_malloc(290000);
    assert_ptr_equal(q, p);                     /* same pages, no syscall */
    pthread_t t;
    pthread_create(&t, NULL, free_one, q);
    pthread_join(t, NULL);
    char *r = hakmem_malloc(300000);            /* collects the remote free */
    assert_ptr_equal(r, p);
    char *big = hakmem_malloc(2u << 20);
    assert_non_null(big);
    memset(big, 2, 2u << 20);
    hakmem_stats(&s1);
    assert_int_equal(s1.large_blocks, s0.large_blocks);
    hakmem_free(big);

    /* realloc resizes a page block in place: it shrinks always, and grows
     * when the pages after it are free (here: the ones `big` left). */
    memset(r, 3, 300000);
    char *g = hakmem_realloc(r, 200000);
    assert_ptr_equal(g, r);
    assert_int_equal(hakmem_malloc_usable_size(g), 4 * 65536);
    g = hakmem_realloc(g, 900000);
    assert_int_equal(hakmem_malloc_usable_size(g), 14 * 65536);
    for (int i = 0; i < 200000; i += 4096)
        assert_int_equal(g[i], 3);
    memset(g, 4, 900000);
    hakmem_free(g);
}

/* A heap's segments are listed by room: two free pages or more, then one,
 * then full.  A walk for room stops at the first segment with too little,
 * one for pages to purge at the first full one.  A segment moves when a
 * span alloc or release changes its room. */
static bool listed_by_room(const struct hm_heap *h)
{
    unsigned last_room = 2;
    const struct hm_segment *last = NULL, *first_full = NULL;
    for (const struct hm_segment *seg = h->segments; seg; last = seg, seg = seg->next) {
        unsigned room = hm_segment_room(seg);
        if (room > last_room)
            return false;
        if (room == 0 && !first_full)
            first_full = seg;
        last_room = room;
    }
    return last == h->segments_last && first_full == h->segments_full;
}

static void *fill_segments(void *arg)
{
    (void)arg;
    /* 4 blocks a span of one page: 6 segments full, and a seventh begun */
    enum { SIZE = 16384, N = 6 * 63 * 4 + 8 };
    static void *blocks[N], *more[256];
    struct hm_heap *h = NULL;
    for (int i = 0; i < N; i++) {
        blocks[i] = hakmem_malloc(SIZE);
        h = hm_tcache_self()->heap;
        assert_true(listed_by_room(h));
    }
    /* A span in the middle of the full ones: its blocks go back (through
     * the bin and the stash, then a trim to the spans).  One free page:
     * it moves to the segments with one. */
    struct hm_segment *seg = hm_segment_of((uintptr_t)blocks[N / 2]);
    assert_true(hm_segment_is_full(seg));
    assert_int_equal(hm_segment_room(h->segments), 2);
    struct hm_span *sp = span_at(blocks[N / 2]);
    for (int i = 0; i < N; i++)
        if (blocks[i] && span_at(blocks[i]) == sp) {
            hakmem_free(blocks[i]);
            blocks[i] = NULL;
        }
    hakmem_trim();
    assert_int_equal(hm_segment_room(seg), 1);
    assert_ptr_equal(seg->next, h->segments_full);
    assert_true(listed_by_room(h));
    /* Spans of two pages never look at it (it has one); spans of one page
     * fill it again, after the segments with more room: back to the full. */
    void *two_pages = hakmem_malloc(32768);
    assert_ptr_not_equal(hm_segment_of((uintptr_t)two_pages), seg);
    int n = 0;
    while (!hm_segment_is_full(seg) && n < 256)
        more[n++] = hakmem_malloc(SIZE);
    assert_true(hm_segment_is_full(seg));
    assert_true(listed_by_room(h));
    hakmem_free(two_pages);
    for (int i = 0; i < n; i++)
        hakmem_free(more[i]);
    for (int i = 0; i < N; i++)
        hakmem_free(blocks[i]);
    return NULL;
}

static void segments_with_room_come_first(void **state)
{
    (void)state;
    run_thread(fill_segments, NULL);
}

/* A heap walks its segments for remote frees only when hinted: a free by
 * another thread that announces a span sets the owner's hint, a collect
 * clears it (and takes the frees). */
struct hinted {
    void *blocks[64];
    struct hm_heap *owner;
};

static void *free_hinted(void *arg)
{
    struct hinted *x = arg;
    for (int i = 0; i < 64; i++)
        hakmem_free(x->blocks[i]);      /* two batches of 32 */
    return NULL;
}

static void *hint_owner_thread(void *arg)
{
    (void)arg;
    static struct hinted x;
    for (int i = 0; i < 64; i++)
        x.blocks[i] = hakmem_malloc(64);
    struct hm_heap *h = hm_tcache_self()->heap;
    hm_heap_lock(h);
    hm_heap_collect(h);                 /* a segment joined: hinted */
    assert_false(atomic_load(&h->remote_hint));
    hm_heap_unlock(h);
    uint64_t collected = h->stats[CLS].remote_frees;
    run_thread(free_hinted, &x);
    assert_true(atomic_load(&h->remote_hint));
    hm_heap_lock(h);
    hm_heap_collect(h);
    hm_heap_unlock(h);
    assert_false(atomic_load(&h->remote_hint));
    assert_int_equal(h->stats[CLS].remote_frees - collected, 64);
    return NULL;
}

static void remote_frees_hint_their_owner(void **state)
{
    (void)state;
    run_thread(hint_owner_thread, NULL);
}

/* A remote free that announced a span may still read its segment when
 * the owner has collected the span and freed the segment (a trim): the
 * segment stays mapped until the announcer is done.  The hook stands for
 * the announcer's thread being preempted right after its push. */
static sem_t pushed, resume;
static void *announced;

static void pause_after_push(struct hm_segment *seg)
{
    (void)seg;
    hm_remote_push_test_hook = NULL;
    sem_post(&pushed);
    sem_wait(&resume);
}

static void *announce_and_pause(void *arg)
{
    (void)arg;
    void *own = hakmem_malloc(64);          /* a heap of its own: remote frees batch */
    hm_remote_push_test_hook = pause_after_push;
    hakmem_free(announced);                 /* a page block: its batch goes at once */
    hakmem_free(own);
    return NULL;
}

static bool mapped(const void *p)
{
    return msync((void *)((uintptr_t)p & ~(uintptr_t)4095), 4096, MS_ASYNC) == 0;
}

static void *owner_trims_meanwhile(void *arg)
{
    (void)arg;
    announced = hakmem_malloc(200 << 10);
    memset(announced, 1, 200 << 10);
    struct hm_segment *seg = hm_segment_of((uintptr_t)announced);
    pthread_t t;
    pthread_create(&t, NULL, announce_and_pause, NULL);
    sem_wait(&pushed);
    hakmem_trim();                          /* collects the block: the segment empties */
    assert_null(hm_segment_of((uintptr_t)announced));      /* freed, */
    assert_true(mapped(seg));                               /* not unmapped, */
    unsigned char in_core = 1;                              /* its pages given back */
    assert_int_equal(mincore(announced, 4096, &in_core), 0);
    assert_int_equal(in_core & 1, 0);
    sem_post(&resume);
    pthread_join(t, NULL);
    hakmem_trim();
    assert_false(mapped(seg));
    return NULL;
}

/* Runs an owner thread whose announcer pauses after its push. */
static void run_with_paused_announcer(void *(*owner)(void *))
{
    sem_init(&pushed, 0, 0);
    sem_init(&resume, 0, 0);
    run_thread(owner, NULL);
}

static void segments_stay_mapped_while_announced(void **state)
{
    (void)state;
    run_with_paused_announcer(owner_trims_meanwhile);
}

/* A fork while another thread is between its push and its hint: the
 * child, which does not have that thread, still collects the frees. */
static void *owner_forks_meanwhile(void *arg)
{
    (void)arg;
    announced = hakmem_malloc(200 << 10);
    void *other = hakmem_malloc(200 << 10);     /* keeps the segment */
    struct hm_heap *h = hm_tcache_self()->heap;
    struct hm_segment *seg = hm_segment_of((uintptr_t)announced);
    hm_heap_lock(h);
    hm_heap_collect(h);                         /* the hint cleared, as after a refill */
    hm_heap_unlock(h);
    pthread_t t;
    pthread_create(&t, NULL, announce_and_pause, NULL);
    sem_wait(&pushed);
    pid_t pid = fork();
    if (pid == 0) {
        hakmem_trim();
        _exit(atomic_load(&seg->pending) ? 1 : 0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    sem_post(&resume);
    pthread_join(t, NULL);
    hakmem_free(other);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    return NULL;
}

static void fork_child_collects_frees_announced_at_fork(void **state)
{
    (void)state;
    run_with_paused_announcer(owner_forks_meanwhile);
}

/* A heap's own purge step reads at most 16 of its segments with free
 * pages, going on from where the last one stopped: segments of 31 spans
 * of two pages each keep a page free, and a step that read them all cost
 * a miss a segment every 64 slow paths in a big heap. */
static void *purge_steps_resume(void *arg)
{
    (void)arg;
    enum { SEGMENTS = 20, N = SEGMENTS * 31 * 4 };  /* 32 KiB blocks, four a span */
    static void *blocks[N];
    for (int i = 0; i < N; i++)
        blocks[i] = hakmem_malloc(32768);
    struct hm_heap *h = hm_tcache_self()->heap;
    unsigned with_room = 0;
    for (struct hm_segment *seg = h->segments; seg && !hm_segment_is_full(seg); seg = seg->next)
        with_room++;
    assert_true(with_room >= SEGMENTS);
    hm_heap_lock(h);
    h->purge_at = NULL;
    hm_heap_purge(h, UINT64_MAX / 2);           /* nothing old enough: reads only */
    struct hm_segment *at = h->segments;
    for (int i = 0; i < 16; i++)
        at = at->next;
    assert_ptr_equal(h->purge_at, at);          /* the 17th: where the next step starts */
    unsigned steps = 1;
    while (h->purge_at && steps < 100) {
        hm_heap_purge(h, UINT64_MAX / 2);
        steps++;
    }
    assert_int_equal(steps, (with_room + 15) / 16);
    hm_heap_unlock(h);
    for (int i = 0; i < N; i++)
        hakmem_free(blocks[i]);
    return NULL;
}

/* A step that runs out of its bytes inside a segment goes on there next
 * time, not at the segment after it. */
static void *purge_step_runs_out_in_a_segment(void *arg)
{
    (void)arg;
    enum { SEGMENTS = 4, PER = 15, N = SEGMENTS * PER };  /* 4-page blocks, 15 a segment */
    static void *blocks[N];
    for (int i = 0; i < N; i++) {
        blocks[i] = hakmem_malloc(200 << 10);
        memset(blocks[i], 1, 200 << 10);
    }
    for (int i = 0; i < N; i++)
        if (i % PER)
            hakmem_free(blocks[i]);         /* 14 of 15: 3.5 MiB of free pages a segment */
    struct hm_heap *h = hm_tcache_self()->heap;
    hm_heap_lock(h);
    h->purge_at = NULL;
    struct hm_segment *first = h->segments;
    hm_heap_purge(h, 0);                    /* everything old enough: 256 KiB a step */
    assert_ptr_equal(h->purge_at, first);
    assert_true(hm_segment_has_dirty_run(first, 1));
    hm_heap_unlock(h);
    for (int i = 0; i < N; i += PER)
        hakmem_free(blocks[i]);
    return NULL;
}

static void purge_steps_go_on_where_they_ran_out(void **state)
{
    (void)state;
    run_thread(purge_step_runs_out_in_a_segment, NULL);
}

/* The process-wide pass of the slow paths' purge reads at most 64
 * segments a step, going on where the last step stopped, until it has
 * been through the registry. */
static void process_purge_steps_read_a_few_segments_each(void **state)
{
    (void)state;
    enum { N = 2 * 80 };                    /* page blocks of 2 MiB: 80 segments */
    static void *blocks[N];
    for (int i = 0; i < N; i++)
        blocks[i] = hakmem_malloc(2 << 20);
    uint64_t later = UINT64_MAX / 2;        /* nothing old enough: reads only */
    while (hm_segment_purge_step(hm_clock_ns(), later, SIZE_MAX))
        ;                                   /* to the end of any pass under way */
    unsigned steps = 1;
    while (hm_segment_purge_step(hm_clock_ns(), later, SIZE_MAX) && steps < 100)
        steps++;
    assert_true(steps >= 2);                /* 80 segments and more: two steps or more */
    assert_true(steps < 100);
    for (int i = 0; i < N; i++)
        hakmem_free(blocks[i]);
}

static void purge_steps_read_a_few_segments_each(void **state)
{
    (void)state;
    run_thread(purge_steps_resume, NULL);
}

/* A fork child's ACE starts afresh (hm_ace_fork_child zeroes its queue's
 * drops and its counters), so the per-class drops it reports start at 0
 * too, not at its parent's (acectl showed the parent's 430 drops in a
 * child whose ACE line said 0). */
static void fork_child_reports_no_parent_drops(void **state)
{
    (void)state;
    struct hm_tcache *tc = hm_tcache_self();
    hakmem_free(hakmem_malloc(64));          /* the heap exists */
    unsigned cls = hm_size_class(64);
    tc->heap->stats[cls].ace_drops += 7;
    struct hakmem_class_info ci;
    assert_int_equal(hakmem_class_info(cls, &ci), 0);
    assert_true(ci.ace_drops >= 7);
    pid_t pid = fork();
    if (pid == 0) {
        struct hakmem_class_info child;
        _exit(hakmem_class_info(cls, &child) == 0 && child.ace_drops == 0 ? 0 : 1);
    }
    int status;
    waitpid(pid, &status, 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    tc->heap->stats[cls].ace_drops -= 7;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(first_refills_of_a_heap_start_small),
        cmocka_unit_test(refill_carves_one_batch),
        cmocka_unit_test(refills_carve_a_page_at_most),
        cmocka_unit_test(refill_count_next_refill_only),
        cmocka_unit_test(bin_caps_widen_by_the_stash),
        cmocka_unit_test(bin_caps_shrink_with_the_share),
        cmocka_unit_test(bins_flush_past_their_cap),
        cmocka_unit_test(short_free_lists_go_whole),
        cmocka_unit_test(medium_flushes_go_to_the_stash),
        cmocka_unit_test(remote_frees_come_back_to_the_owner),
        cmocka_unit_test(remote_frees_are_batched_per_class),
        cmocka_unit_test(big_batches_go_when_their_span_is_covered),
        cmocka_unit_test(exited_threads_segments_are_adopted),
        cmocka_unit_test(page_blocks_reuse_their_pages),
        cmocka_unit_test(shrinking_class_drains_and_gathers_survivors),
        cmocka_unit_test(drained_frees_go_back_a_batch_at_a_time),
        cmocka_unit_test(drained_big_blocks_go_back_at_once),
        cmocka_unit_test(busy_batch_is_left_alone),
        cmocka_unit_test(refill_leaving_the_batch_keeps_draining),
        cmocka_unit_test(refill_inside_a_put_keeps_draining),
        cmocka_unit_test(exit_does_not_wait_for_a_stuck_tidier),
        cmocka_unit_test(cache_bound_covers_the_caches),
        cmocka_unit_test(a_free_into_an_unused_bin_sets_it_up),
        cmocka_unit_test(segments_with_room_come_first),
        cmocka_unit_test(remote_frees_hint_their_owner),
        cmocka_unit_test(segments_stay_mapped_while_announced),
        cmocka_unit_test(fork_child_collects_frees_announced_at_fork),
        cmocka_unit_test(purge_steps_read_a_few_segments_each),
        cmocka_unit_test(purge_steps_go_on_where_they_ran_out),
        cmocka_unit_test(process_purge_steps_read_a_few_segments_each),
        cmocka_unit_test(fork_child_reports_no_parent_drops),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
