/* Memory goes back to the OS: free pages after the purge delay (run with
 * HAKMEM_PURGE_DELAY_MS=50), everything free at malloc_trim, empty
 * segments of exited threads at once. */
#include "test_util.h"

#include <errno.h>
#include <pthread.h>
#include <sys/mman.h>
#include <time.h>

#include "hakmem.h"
#include "hot/hot.h"
#include "refill/heap_internal.h"
#include "process/process.h"
#include "segment/segment.h"

enum { BLOCKS = 50 * 1024, BLOCK = 1000 };   /* about 50 MiB */
static void *blocks[BLOCKS];

static void fill_heap(void)
{
    for (int i = 0; i < BLOCKS; i++) {
        blocks[i] = hakmem_malloc(BLOCK);
        memset(blocks[i], 1, BLOCK);
    }
}

static void free_heap(void)
{
    for (int i = 0; i < BLOCKS; i++)
        hakmem_free(blocks[i]);
}

static void nap_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };
    nanosleep(&ts, NULL);
}

/* Refills and flushes of another class (about 100 KB live): the slow
 * paths that run the periodic purge and compaction.  More blocks a round
 * than the class's bin holds (20), so that every round has some. */
static void slow_path_activity(void)
{
    for (int round = 0; round < 200; round++) {
        void *p[24];
        for (int i = 0; i < 24; i++)
            p[i] = hakmem_malloc(5000);
        for (int i = 0; i < 24; i++)
            hakmem_free(p[i]);
    }
}

static void trim_returns_free_memory(void **state)
{
    (void)state;
    skip_unless_rss_meaningful();
    long base = rss_kb();
    fill_heap();
    long full = rss_kb();
    assert_true(full - base > 40 * 1024);
    free_heap();
    assert_int_equal(hakmem_trim(), 1);
    long trimmed = rss_kb();
    assert_true(trimmed < base + 4 * 1024);
    /* And the memory is usable again. */
    fill_heap();
    free_heap();
}

/* What an exited thread left, freed by a thread that only frees (it takes
 * no segment over): malloc_trim takes those frees in the segments nobody
 * adopted and returns the memory. */
static void *fill_heap_and_leave(void *arg)
{
    (void)arg;
    fill_heap();
    return NULL;
}

static void *free_heap_and_leave(void *arg)
{
    (void)arg;
    free_heap();
    return NULL;
}

static void trim_returns_what_exited_threads_left(void **state)
{
    (void)state;
    skip_unless_rss_meaningful();
    hakmem_trim();
    long base = rss_kb();
    run_thread(fill_heap_and_leave, NULL);
    run_thread(free_heap_and_leave, NULL);
    long freed = rss_kb();
    assert_true(freed - base > 40 * 1024);
    assert_int_equal(hakmem_trim(), 1);
    long trimmed = rss_kb();
    print_message("rss base %ld freed %ld trimmed %ld\n", base, freed, trimmed);
    assert_true(trimmed < base + 4 * 1024);
}

static void free_pages_decay_after_the_delay(void **state)
{
    (void)state;
    skip_unless_rss_meaningful();
    hakmem_trim();
    long base = rss_kb();
    struct hakmem_stats s0, s;
    hakmem_stats(&s0);
    fill_heap();
    free_heap();
    long freed = rss_kb();
    /* Not all at once: a few empty segments stay for reuse, resident
     * until the delay has passed. */
    assert_true(freed - base > 12 * 1024);
    /* But only those few: a thread that idles after a burst of frees runs
     * no purge, and without ACE nothing else does. */
    assert_true(freed - base < 32 * 1024);
    nap_ms(120);
    slow_path_activity();                       /* runs the purge */
    long later = rss_kb();
    assert_true(later < base + 8 * 1024);
    hakmem_stats(&s);
    assert_true(s.bytes_purged - s0.bytes_purged >= 12u << 20);
}

static void *alloc_free_exit(void *arg)
{
    (void)arg;
    fill_heap();
    free_heap();
    return NULL;
}

/* An exited thread's empty segments wait in a small pool for the next
 * thread (at most 2 mapped), and their pages decay like any free page. */
static void exited_threads_memory_decays(void **state)
{
    (void)state;
    skip_unless_rss_meaningful();
    hakmem_trim();
    long base = rss_kb();
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    run_thread(alloc_free_exit, NULL);
    hakmem_stats(&s1);
    assert_true(s1.bytes_mapped <= s0.bytes_mapped + (2u << 22));
    nap_ms(120);
    slow_path_activity();
    assert_true(rss_kb() < base + 4 * 1024);
}

/* A slow path gives memory back in steps of 256 KiB: 12 MiB of old free
 * pages do not all go in the one malloc that finds them (milliseconds),
 * but over the slow paths that follow. */
static void purge_goes_in_steps(void **state)
{
    (void)state;
    enum { PAGE_BLOCKS = 64, PAGE_BLOCK = 256 * 1024 };
    static char *pb[PAGE_BLOCKS];
    static void *small[64 * 64];
    hakmem_trim();
    for (int i = 0; i < PAGE_BLOCKS; i++) {
        pb[i] = hakmem_malloc(PAGE_BLOCK);
        memset(pb[i], 1, PAGE_BLOCK);
    }
    for (int i = 0; i < PAGE_BLOCKS; i++)       /* a quarter stays: segments stay */
        if (i % 4)
            hakmem_free(pb[i]);
    nap_ms(120);                                /* older than the delay */
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    /* 64 refills of 64 blocks: a step every 8 refills at most (the pace
     * while behind), each 256 KiB and a span compacted past it. */
    for (unsigned i = 0; i < sizeof small / sizeof small[0]; i++)
        small[i] = hakmem_malloc(16);
    hakmem_stats(&s1);
    uint64_t purged = s1.bytes_purged - s0.bytes_purged;
    print_message("purged in 64 refills: %llu KiB\n", (unsigned long long)purged >> 10);
    assert_true(purged > 0);
    assert_true(purged <= 9 * (512u << 10));
    for (int i = 0; i < 200 && s1.bytes_purged - s0.bytes_purged < (11u << 20); i++) {
        slow_path_activity();
        hakmem_stats(&s1);
    }
    assert_true(s1.bytes_purged - s0.bytes_purged >= (11u << 20));
    for (unsigned i = 0; i < sizeof small / sizeof small[0]; i++)
        hakmem_free(small[i]);
    for (int i = 0; i < PAGE_BLOCKS; i += 4)
        hakmem_free(pb[i]);
}

/* A program whose only slow paths are page blocks purges too: their
 * allocations pace the steps like refills. */
static void page_blocks_alone_pace_the_purge(void **state)
{
    (void)state;
    enum { PAGE_BLOCKS = 64, PAGE_BLOCK = 256 * 1024 };
    static char *pb[PAGE_BLOCKS];
    hakmem_trim();
    for (int i = 0; i < PAGE_BLOCKS; i++) {
        pb[i] = hakmem_malloc(PAGE_BLOCK);
        memset(pb[i], 1, PAGE_BLOCK);
    }
    for (int i = 0; i < PAGE_BLOCKS; i++)
        if (i % 4)
            hakmem_free(pb[i]);
    nap_ms(120);
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    for (int i = 0; i < 256; i++)               /* 32 steps at least */
        hakmem_free(hakmem_malloc(192 * 1024));
    hakmem_stats(&s1);
    uint64_t purged = s1.bytes_purged - s0.bytes_purged;
    print_message("purged in 256 page blocks: %llu KiB\n", (unsigned long long)purged >> 10);
    assert_true(purged >= (4u << 20));
    for (int i = 0; i < PAGE_BLOCKS; i += 4)
        hakmem_free(pb[i]);
}

/* A thread whose slow paths are only flushes (it frees more than it
 * allocates) purges too. */
static void flushes_alone_pace_the_purge(void **state)
{
    (void)state;
    enum { KEPT = 4096 };
    static void *kept[KEPT];
    hakmem_trim();
    for (int i = 0; i < KEPT; i++)
        kept[i] = hakmem_malloc(BLOCK);
    fill_heap();
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    /* From here on, flushes and no refill.  In a slow (sanitizer) build
     * the purge may already run during these: */
    free_heap();                                /* 50 MiB of free pages */
    nap_ms(120);
    for (int i = 0; i < KEPT; i++)              /* ... else during these */
        hakmem_free(kept[i]);
    hakmem_stats(&s1);
    uint64_t purged = s1.bytes_purged - s0.bytes_purged;
    print_message("purged in %d frees: %llu KiB\n", BLOCKS + KEPT, (unsigned long long)purged >> 10);
    assert_true(purged >= (4u << 20));
}

/* Blocks tagged with their index: all of them, then all but one in 100. */
static void alloc_tagged(unsigned char **b, int n, size_t size)
{
    for (int i = 0; i < n; i++) {
        b[i] = hakmem_malloc(size);
        memset(b[i], (unsigned char)i, size);
    }
}

static void keep_one_in_100(unsigned char **b, int n)
{
    for (int i = 0; i < n; i++)
        if (i % 100) {
            hakmem_free(b[i]);
            b[i] = NULL;
        }
}

/* The live blocks are intact, and the freed ones' room is handed out
 * again without overlapping them; then all go. */
static void check_reuse_free(unsigned char **b, int n, size_t size)
{
    for (int i = 0; i < n; i++)
        if (b[i])
            for (size_t k = 0; k < size; k++)
                assert_int_equal(b[i][k], (unsigned char)i);
    for (int i = 0; i < n; i++)
        if (!b[i]) {
            b[i] = hakmem_malloc(size);
            memset(b[i], (unsigned char)i, size);
        }
    for (int i = 0; i < n; i++) {
        for (size_t k = 0; k < size; k += 33)
            assert_int_equal(b[i][k], (unsigned char)i);
        hakmem_free(b[i]);
    }
}

/* A live set shrunk to 1% keeps its spans, but not the pages that hold
 * only free blocks: those go back, and the blocks are reused later. */
static void sparse_spans_give_back_their_free_pages(void **state)
{
    (void)state;
    skip_unless_rss_meaningful();
    enum { N = 400000, SIZE = 100 };            /* about 45 MiB in 112 B blocks */
    static unsigned char *b[N];
    hakmem_trim();
    long base = rss_kb();
    alloc_tagged(b, N, SIZE);
    keep_one_in_100(b, N);
    long sparse = rss_kb();
    assert_true(sparse - base > 30 * 1024);     /* every span still has live blocks */
    /* The pass over nearly empty spans runs at most four times per delay
     * (50 ms): one marks the spans, one after the delay compacts them, in
     * steps of 256 KiB every 64 slow paths. */
    for (int i = 0; i < 60 && rss_kb() > sparse - 24 * 1024; i++) {
        slow_path_activity();
        nap_ms(20);
    }
    long compacted = rss_kb();
    /* A live 112 B block every 11 KiB pins one 4 KiB page in three: about
     * 16 MiB of the 45 stay. */
    print_message("rss: base %ld KiB, sparse %ld, compacted %ld\n", base, sparse, compacted);
    assert_true(sparse - compacted > 24 * 1024);
    check_reuse_free(b, N, SIZE);               /* holes are handed out again */
}

/* malloc_trim gives back every free page at once, also in spans that a
 * few live blocks pin: neither the delay's compaction (of nearly empty
 * spans only) nor the spans emptying would bring those back. */
static void trim_gives_back_free_pages_of_pinned_spans(void **state)
{
    (void)state;
    enum { N = 400000, SIZE = 100 };            /* about 45 MiB in 112 B blocks */
    static unsigned char *b[N];
    hakmem_trim();
    alloc_tagged(b, N, SIZE);
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    keep_one_in_100(b, N);
    long sparse = rss_kb();
    hakmem_trim();
    hakmem_stats(&s1);
    long trimmed = rss_kb();
    /* Counted from before the frees: in a slow (sanitizer) build the
     * delay's compaction may give back part of it while they go on. */
    uint64_t purged = s1.bytes_purged - s0.bytes_purged;
    print_message("rss: sparse %ld KiB, trimmed %ld; purged %llu KiB\n", sparse, trimmed,
                  (unsigned long long)(purged >> 10));
    /* One page in three keeps a live block (see above): about 27 MiB of
     * the 45 go back. */
    assert_true(purged > 22u << 20);
    if (HM_RSS_MEANINGFUL)
        assert_true(sparse - trimmed > 22 * 1024);

    /* A second trim gives back only what the frees since made free: the
     * pages of holes went back already, and are neither counted again nor
     * touched (relinking a hole would fault its page back in). */
    int freed = 0;
    for (int i = 0; i < N; i += 1000) {         /* one live block in ten */
        hakmem_free(b[i]);
        b[i] = NULL;
        freed++;
    }
    hakmem_trim();
    struct hakmem_stats s2;
    hakmem_stats(&s2);
    long retrimmed = rss_kb();
    print_message("second trim: %d blocks freed, purged %llu KiB, rss %ld KiB\n", freed,
                  (unsigned long long)((s2.bytes_purged - s1.bytes_purged) >> 10), retrimmed);
    assert_true(s2.bytes_purged - s1.bytes_purged <= (uint64_t)freed * 2 * 4096);
    if (HM_RSS_MEANINGFUL)
        assert_true(retrimmed <= trimmed);
    check_reuse_free(b, N, SIZE);               /* holes are handed out again */
}

/* A block whose page went back while it was free (compaction) lost its
 * free mark with the page, so its second free passes the fast path; it is
 * caught if it leaves the bin by a flush (here at trim).  (Not if malloc
 * pops it first: the README says so.) */
static void free_twice_after_compaction(void)
{
    enum { N = 40000, SIZE = 100 };
    static unsigned char *b[N];
    alloc_tagged(b, N, SIZE);
    unsigned char *freed[N];
    for (int i = 0; i < N; i++)
        freed[i] = b[i];
    keep_one_in_100(b, N);
    long page = sysconf(_SC_PAGESIZE);
    for (int round = 0; round < 100; round++) {
        slow_path_activity();
        nap_ms(20);
        for (int i = 0; i < N; i++) {
            unsigned char vec;
            uintptr_t pg = (uintptr_t)freed[i] & ~(uintptr_t)(page - 1);
            if (b[i] || (uintptr_t)freed[i] + SIZE > pg + (uintptr_t)page ||
                mincore((void *)pg, (size_t)page, &vec) != 0 || (vec & 1))
                continue;
            hakmem_free(freed[i]);          /* its page went back: a hole */
            hakmem_trim();
            return;
        }
    }
}

static void double_free_of_a_hole_aborts(void **state)
{
    (void)state;
    expect_abort(free_twice_after_compaction, "hakmem: free(): double free detected 0x");
}

static uint64_t cached_bytes(void)
{
    uint64_t bytes = 0;
    for (unsigned c = 0; c < hakmem_class_count(); c++) {
        struct hakmem_class_info ci;
        hakmem_class_info(c, &ci);
        bytes += ci.blocks_cached * ci.block_size;
    }
    return bytes;
}

/* Blocks that fill each class's bin past its cap (a stash class's
 * overflow then fills its stash too), read before any thread fills:
 * reports read other threads' counters racily. */
static unsigned fill_count[256], fill_size[256];

static void plan_fill(void)
{
    for (unsigned c = 0; c < hakmem_class_count(); c++) {
        struct hakmem_class_info ci;
        hakmem_class_info(c, &ci);
        unsigned n = (unsigned)hm_bin_cap(c, ci.refill_count, ci.refill_count) + 2;
        fill_count[c] = n < 256 ? n : 256;
        fill_size[c] = ci.block_size;
    }
}

static void fill_every_bin(void)
{
    static __thread void *p[256];
    for (unsigned c = 0; c < hakmem_class_count(); c++) {
        for (unsigned i = 0; i < fill_count[c]; i++)
            p[i] = hakmem_malloc(fill_size[c]);
        for (unsigned i = 0; i < fill_count[c]; i++)
            hakmem_free(p[i]);
    }
}

/* The budget is enforced every 64 slow paths: make refills (16-byte class). */
static void make_refills(void)
{
    static __thread void *small[64 * 70];
    for (unsigned i = 0; i < 64 * 70; i++)
        small[i] = hakmem_malloc(16);
    for (unsigned i = 0; i < 64 * 70; i++)
        hakmem_free(small[i]);
}

/* Run with HAKMEM_TCACHE_MAX_KB=256: one thread's cache stays near that. */
static void thread_cache_stays_within_budget(void **state)
{
    (void)state;
    plan_fill();
    fill_every_bin();
    assert_true(cached_bytes() > 512u << 10);   /* full bins: over budget */
    make_refills();
    assert_true(cached_bytes() <= 256u << 10);
}

/* All caches together: with HAKMEM_TCACHE_MAX_KB=256, this thread and
 * three more that each fill every bin share the 256 KiB. */
enum { FILLERS = 3 };
static pthread_barrier_t filled, checked;

static void *filler(void *arg)
{
    (void)arg;
    pthread_barrier_wait(&filled);          /* all alive: the share is a quarter */
    fill_every_bin();
    make_refills();
    pthread_barrier_wait(&filled);
    pthread_barrier_wait(&checked);
    return NULL;
}

static void all_caches_together_stay_within_budget(void **state)
{
    (void)state;
    pthread_t t[FILLERS];
    plan_fill();
    pthread_barrier_init(&filled, NULL, FILLERS + 1);
    pthread_barrier_init(&checked, NULL, FILLERS + 1);
    for (int i = 0; i < FILLERS; i++)
        pthread_create(&t[i], NULL, filler, NULL);
    pthread_barrier_wait(&filled);
    fill_every_bin();
    make_refills();
    pthread_barrier_wait(&filled);
    assert_true(cached_bytes() <= 256u << 10);
    pthread_barrier_wait(&checked);
    for (int i = 0; i < FILLERS; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&filled);
    pthread_barrier_destroy(&checked);
}

/* Threads that exit while their blocks live abandon their segments; when
 * another thread frees those blocks, the segments empty, but only whoever
 * collects those frees can see that, and no thread adopts a segment while
 * it needs no room.  The purge pass sweeps the abandoned segments and
 * gives back those that emptied, without adopting them. */
enum { ABANDONERS = 8, LEFT = 4000 };     /* 64 B blocks: 250 KiB a thread */
static void *left[ABANDONERS][LEFT];
static pthread_barrier_t all_alive;

static void *allocate_and_leave(void *arg)
{
    void **mine = arg;
    for (int i = 0; i < LEFT; i++)
        mine[i] = hakmem_malloc(64);
    pthread_barrier_wait(&all_alive);       /* one segment each */
    return NULL;
}

/* A thread with no segment of its own frees remotely: it does not take
 * the segments over (it would never reuse them). */
static void *free_all_left(void *arg)
{
    (void)arg;
    for (int i = 0; i < ABANDONERS; i++)
        for (int k = 0; k < LEFT; k++)
            hakmem_free(left[i][k]);        /* remote: into abandoned segments */
    return NULL;
}

/* ABANDONERS segments of exited threads, their blocks all freed by a
 * thread that only frees. */
static void leave_and_free_remotely(struct hakmem_stats *before, struct hakmem_stats *left_behind)
{
    hakmem_trim();
    slow_path_activity();       /* this thread has spans: it needs no room later */
    hakmem_stats(before);
    pthread_barrier_init(&all_alive, NULL, ABANDONERS);
    pthread_t t[ABANDONERS];
    for (int i = 0; i < ABANDONERS; i++)
        pthread_create(&t[i], NULL, allocate_and_leave, left[i]);
    for (int i = 0; i < ABANDONERS; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&all_alive);
    hakmem_stats(left_behind);
    assert_true(left_behind->segments >= before->segments + ABANDONERS);
    run_thread(free_all_left, NULL);
}

static void abandoned_segments_emptied_elsewhere_go_back(void **state)
{
    (void)state;
    struct hakmem_stats s0, s1, s2;
    leave_and_free_remotely(&s0, &s1);
    for (int i = 0; i < 40; i++) {
        slow_path_activity();
        nap_ms(20);
        hakmem_stats(&s2);
        if (s2.segments <= s0.segments + 2)
            break;
    }
    print_message("segments: before %llu, abandoned %llu, after %llu (adopted %llu more)\n",
                  (unsigned long long)s0.segments, (unsigned long long)s1.segments,
                  (unsigned long long)s2.segments,
                  (unsigned long long)(s2.segments_adopted - s1.segments_adopted));
    /* Empty now: beyond the process pool of 2, unmapped; none adopted. */
    assert_true(s2.segments <= s0.segments + 2);
    assert_int_equal(s2.segments_adopted, s1.segments_adopted);
}

static uint64_t remote_frees_of(size_t size)
{
    struct hakmem_class_info ci = { 0 };
    for (unsigned c = 0; c < hakmem_class_count(); c++) {
        hakmem_class_info(c, &ci);
        if (ci.block_size == size)
            break;
    }
    return ci.remote_frees;
}

/* A thread that allocates and frees blocks of an exited thread's segment
 * takes the segment over at its first free, to drain it: the frees are
 * local from then on, and the spans stay off its lists (tagged to drain).
 * The freeing thread gets its own segment before the other exits (else its
 * first malloc would adopt the exited thread's segment, as a thread out of
 * room does). */
static pthread_barrier_t has_segment, others_left;
static uintptr_t drained_span_owner;

static uintptr_t owner_of_block(void *p)
{
    struct hm_segment *seg = hm_segment_of((uintptr_t)p);
    return hm_span_owner(hm_span_of(seg, (uintptr_t)p));
}

static void *free_left_into_own_heap(void *arg)
{
    struct hakmem_stats *s = arg;
    void *mine = hakmem_malloc(64);
    pthread_barrier_wait(&has_segment);
    pthread_barrier_wait(&others_left);
    hakmem_stats(&s[0]);
    hakmem_free(left[0][0]);
    drained_span_owner = owner_of_block(left[0][LEFT - 1]);
    for (int k = 1; k < LEFT; k++)
        hakmem_free(left[0][k]);
    hakmem_stats(&s[1]);
    hakmem_free(mine);
    return NULL;
}

/* Runs `freer` in a thread that has a segment of its own by the time
 * another thread has allocated left[0] and exited. */
static void free_what_an_exited_thread_left(void *(*freer)(void *), void *arg)
{
    pthread_barrier_init(&has_segment, NULL, 2);
    pthread_barrier_init(&others_left, NULL, 2);
    pthread_barrier_init(&all_alive, NULL, 1);
    pthread_t t;
    pthread_create(&t, NULL, freer, arg);
    pthread_barrier_wait(&has_segment);
    run_thread(allocate_and_leave, left[0]);
    pthread_barrier_wait(&others_left);
    pthread_join(t, NULL);
    pthread_barrier_destroy(&all_alive);
    pthread_barrier_destroy(&has_segment);
    pthread_barrier_destroy(&others_left);
}

static void frees_into_an_exited_threads_segment_take_it_over(void **state)
{
    (void)state;
    hakmem_trim();
    uint64_t r0 = remote_frees_of(64);
    struct hakmem_stats s[2];
    free_what_an_exited_thread_left(free_left_into_own_heap, s);
    hakmem_trim();              /* collects what may be waiting */
    print_message("adopted %llu, remote frees %llu\n",
                  (unsigned long long)(s[1].segments_adopted - s[0].segments_adopted),
                  (unsigned long long)(remote_frees_of(64) - r0));
    assert_int_equal(s[1].segments_adopted, s[0].segments_adopted + 1);
    assert_int_equal(remote_frees_of(64), r0);
    assert_int_equal(drained_span_owner & (HM_HEAP_ALIGN - 1), HM_OWNER_DRAIN);
}

/* A drained segment whose spans a few live blocks pin stops draining: once
 * it gave back no span for a quarter of the purge delay, the thread's
 * purge abandons it again, for a thread out of room to adopt. */
static uint64_t abandoned_by_the_drainer;
static uintptr_t pinned_owner;

static void *pin_and_wait(void *arg)
{
    (void)arg;
    void *mine = hakmem_malloc(64);
    pthread_barrier_wait(&has_segment);
    pthread_barrier_wait(&others_left);
    for (int k = 0; k < LEFT; k++)
        if (k % 500)
            hakmem_free(left[0][k]);    /* one block in 500 stays */
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    nap_ms(40);                         /* the delay is 50 ms: a quarter passed */
    slow_path_activity();
    hakmem_stats(&s1);
    abandoned_by_the_drainer = s1.segments_abandoned - s0.segments_abandoned;
    pinned_owner = owner_of_block(left[0][0]);
    hakmem_free(mine);
    return NULL;
}

static void a_segment_that_stops_draining_is_abandoned_again(void **state)
{
    (void)state;
    hakmem_trim();
    free_what_an_exited_thread_left(pin_and_wait, NULL);
    print_message("abandoned again: %llu\n", (unsigned long long)abandoned_by_the_drainer);
    assert_int_equal(abandoned_by_the_drainer, 1);
    assert_int_equal(pinned_owner, HM_OWNER_ABANDONED);
    for (int k = 0; k < LEFT; k += 500)
        hakmem_free(left[0][k]);
    hakmem_trim();
}

/* A block of a segment being drained, freed twice: its first free put it
 * on its span's list, where the second finds it. */
static void *free_one_twice(void *arg)
{
    (void)arg;
    void *mine = hakmem_malloc(64);
    pthread_barrier_wait(&has_segment);
    pthread_barrier_wait(&others_left);
    hakmem_free(left[0][0]);            /* takes the segment over */
    hakmem_free(left[0][1]);
    hakmem_free(left[0][1]);
    hakmem_free(mine);
    return NULL;
}

static void free_twice_into_a_drained_segment(void)
{
    free_what_an_exited_thread_left(free_one_twice, NULL);
}

/* The first free by a thread that only frees: the block waits in its
 * remote batch, which no list shows; the second, by the drainer. */
static pthread_barrier_t batch_held;

static void *free_into_a_batch(void *arg)
{
    (void)arg;
    hakmem_free(left[0][5]);
    pthread_barrier_wait(&batch_held);
    pthread_barrier_wait(&batch_held);  /* the batch stays unsent till then */
    return NULL;
}

static void *free_after_a_batch(void *arg)
{
    (void)arg;
    void *mine = hakmem_malloc(64);
    pthread_barrier_wait(&has_segment);
    pthread_barrier_wait(&others_left);
    pthread_barrier_init(&batch_held, NULL, 2);
    pthread_t t;
    pthread_create(&t, NULL, free_into_a_batch, NULL);
    pthread_barrier_wait(&batch_held);
    hakmem_free(left[0][0]);            /* takes the segment over */
    hakmem_free(left[0][5]);
    pthread_barrier_wait(&batch_held);
    pthread_join(t, NULL);
    hakmem_free(mine);
    return NULL;
}

static void free_across_threads_into_a_drained_segment(void)
{
    free_what_an_exited_thread_left(free_after_a_batch, NULL);
}

static void double_free_into_a_drained_segment_aborts(void **state)
{
    (void)state;
#ifdef __SANITIZE_THREAD__      /* TSan cannot start threads in a forked child */
    skip();
#endif
    expect_abort(free_twice_into_a_drained_segment, "hakmem: free(): double free detected 0x");
    expect_abort(free_across_threads_into_a_drained_segment,
                 "hakmem: free(): double free detected 0x");
}

/* A slow path's sweep takes the frees of two segments at most (it runs in
 * some malloc), and unmaps none whose pages the purge has not given back
 * yet; malloc_trim takes everything at once. */
static void a_slow_paths_sweep_is_bounded(void **state)
{
    (void)state;
    struct hakmem_stats s0, s1;
    leave_and_free_remotely(&s0, &s1);
    struct hm_heap_counters h0, h1, h2;
    hm_heap_counters(&h0);
    uint64_t r0 = remote_frees_of(64);
    hm_abandoned_sweep(2, false);
    hm_heap_counters(&h1);
    uint64_t took = remote_frees_of(64) - r0;
    print_message("one sweep took %llu blocks\n", (unsigned long long)took);
    assert_true(took >= LEFT && took <= 2 * LEFT);
    assert_int_equal(h1.segments_swept, h0.segments_swept);
    hakmem_trim();
    hm_heap_counters(&h2);
    assert_int_equal(remote_frees_of(64) - r0, (uint64_t)ABANDONERS * LEFT);
    assert_int_equal(h2.segments_swept, h0.segments_swept + ABANDONERS);
}

/* A thread that goes idle (blocked: no slow path) after its live set
 * shrank would keep what only its slow paths give back.  The purge pass of
 * another thread tidies its heap for it: collects the frees other threads
 * made of its blocks, sends its stashed blocks back to their spans, and
 * gives back the pages of its sparse spans that hold only free blocks. */
enum { IDLE_N = 200000, IDLE_SIZE = 100, STASHED = 64, STASH_SIZE = 1000 };
static unsigned char *idle_b[IDLE_N];
static pthread_barrier_t idle_ready, idle_wake;

static void *idle_owner(void *arg)
{
    (void)arg;
    alloc_tagged(idle_b, IDLE_N, IDLE_SIZE);
    keep_one_in_100(idle_b, IDLE_N);
    void *s[STASHED];
    for (int i = 0; i < STASHED; i++)
        s[i] = hakmem_malloc(STASH_SIZE);
    for (int i = 0; i < STASHED; i++)
        hakmem_free(s[i]);      /* the bin overflows: its newer half goes to the stash */
    pthread_barrier_wait(&idle_ready);
    pthread_barrier_wait(&idle_wake);
    check_reuse_free(idle_b, IDLE_N, IDLE_SIZE);    /* awake: its heap works on */
    return NULL;
}

/* Runs fn on a thread of its own, returning once it waits at idle_ready;
 * end_owner lets it go on past idle_wake and joins it. */
static pthread_t start_owner(void *(*fn)(void *))
{
    pthread_barrier_init(&idle_ready, NULL, 2);
    pthread_barrier_init(&idle_wake, NULL, 2);
    pthread_t t;
    pthread_create(&t, NULL, fn, NULL);
    pthread_barrier_wait(&idle_ready);
    return t;
}

static void end_owner(pthread_t t)
{
    pthread_barrier_wait(&idle_wake);
    pthread_join(t, NULL);
    pthread_barrier_destroy(&idle_ready);
    pthread_barrier_destroy(&idle_wake);
}

static struct hakmem_class_info class_info_of(size_t size)
{
    struct hakmem_class_info ci = { 0 };
    for (unsigned c = 0; c < hakmem_class_count(); c++) {
        hakmem_class_info(c, &ci);
        if (ci.block_size >= size)
            break;
    }
    return ci;
}

static void idle_threads_heaps_are_tidied(void **state)
{
    (void)state;
    hakmem_trim();
    pthread_t t = start_owner(idle_owner);
    long sparse = rss_kb();
    struct hakmem_class_info small0 = class_info_of(IDLE_SIZE);
    struct hakmem_class_info stash0 = class_info_of(STASH_SIZE);
    int remote = 0;
    for (int i = 0; i < IDLE_N; i += 200) {
        hakmem_free(idle_b[i]);             /* remote frees to the idle thread */
        idle_b[i] = NULL;
        remote++;
    }
    struct hakmem_class_info small1, stash1;
    for (int i = 0; i < 100; i++) {
        slow_path_activity();
        nap_ms(20);
        small1 = class_info_of(IDLE_SIZE);
        stash1 = class_info_of(STASH_SIZE);
        if (small1.remote_frees >= small0.remote_frees + (uint64_t)remote &&
            stash1.blocks_cached < stash0.blocks_cached &&
            (!HM_RSS_MEANINGFUL || sparse - rss_kb() > 8 * 1024))
            break;
    }
    long tidied = rss_kb();
    print_message("idle heap: rss %ld -> %ld KiB, remote frees collected %llu of %d, "
                  "%u B blocks cached %llu -> %llu\n", sparse, tidied,
                  (unsigned long long)(small1.remote_frees - small0.remote_frees), remote,
                  (unsigned)STASH_SIZE, (unsigned long long)stash0.blocks_cached,
                  (unsigned long long)stash1.blocks_cached);
    assert_true(small1.remote_frees >= small0.remote_frees + (uint64_t)remote);
    assert_true(stash1.blocks_cached < stash0.blocks_cached);
    if (HM_RSS_MEANINGFUL)
        assert_true(sparse - tidied > 8 * 1024);    /* of 22 MiB in 112 B blocks */
    end_owner(t);
}

/* Empty segments go back whole, header and all, once empty for the purge
 * delay: those in an idle thread's reserve when its heap is tidied, and
 * those in the process pool, by the tidying pass (the ACE thread's) or a
 * slow path's purge.  Before, only their free pages went. */
enum { RESERVE_N = 24, RESERVE_BLOCK = 512u << 10 };   /* 12 MiB of page blocks */

static void *reserve_owner(void *arg)
{
    (void)arg;
    void *p[RESERVE_N];
    for (int i = 0; i < RESERVE_N; i++) {
        p[i] = hakmem_malloc(RESERVE_BLOCK);
        memset(p[i], 1, 4096);
    }
    for (int i = 0; i < RESERVE_N; i++)
        hakmem_free(p[i]);
    pthread_barrier_wait(&idle_ready);      /* idle, alive, its empty segments kept */
    pthread_barrier_wait(&idle_wake);
    return NULL;
}

static uint64_t segments_now(void)
{
    return atomic_load(&hm_segment_counters.segments);
}

static void empty_segments_go_back_whole_after_the_delay(void **state)
{
    (void)state;
    hakmem_trim();
    hm_heaps_tidy_idle(0);
    hm_heaps_tidy_idle(0);
    slow_path_activity();   /* this thread's spans for the loop below, kept in its cache */
    uint64_t before = segments_now();
    pthread_t t = start_owner(reserve_owner);
    uint64_t held = segments_now();
    assert_true(held > before);
    hm_heaps_tidy_idle(UINT64_MAX);         /* not empty that long */
    hm_heaps_tidy_idle(UINT64_MAX);
    assert_int_equal(segments_now(), held);
    hm_heaps_tidy_idle(0);                  /* sees the heap idle */
    hm_heaps_tidy_idle(0);                  /* tidies it: its reserve goes */
    assert_int_equal(segments_now(), before);
    end_owner(t);

    /* An exited thread's empty segments wait in the pool, then go. */
    end_owner(start_owner(reserve_owner));
    assert_true(segments_now() > before);   /* the pool's */
    hm_heaps_tidy_idle(UINT64_MAX);
    assert_true(segments_now() > before);
    /* Without the ACE thread, this thread's slow paths decay the pool
     * (HAKMEM_PURGE_DELAY_MS=50 here). */
    for (int i = 0; i < 100 && segments_now() > before; i++) {
        slow_path_activity();
        nap_ms(20);
    }
    assert_int_equal(segments_now(), before);
}

/* Exited threads' heaps: kept resident for the next threads for the
 * purge delay, then their pages go back (a server whose 500 threads
 * ended kept 10 MiB of them), and a later thread reuses one, zero as a
 * new heap. */
enum { EXITING = 8 };
static struct hm_heap *exited_heaps[EXITING];

static pthread_barrier_t all_started;

/* Blocks of many classes, freed: the heap's counters and a stash or two
 * get touched, as a real thread's would. */
static void use_heap(void)
{
    void *p[64];
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 64; i++)
            p[i] = hakmem_malloc(16 + 200 * (size_t)i);
        for (int i = 0; i < 64; i++)
            hakmem_free(p[i]);
    }
}

static void *use_heap_and_exit(void *arg)
{
    use_heap();
    *(struct hm_heap **)arg = hm_tcache_self()->heap;
    pthread_barrier_wait(&all_started);     /* all alive at once: a heap each */
    return NULL;
}

static void exit_threads(void)
{
    pthread_t t[EXITING];
    pthread_barrier_init(&all_started, NULL, EXITING);
    for (int i = 0; i < EXITING; i++)
        pthread_create(&t[i], NULL, use_heap_and_exit, &exited_heaps[i]);
    for (int i = 0; i < EXITING; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&all_started);
}

static void *reuse_heap(void *arg)
{
    use_heap();
    *(struct hm_heap **)arg = hm_tcache_self()->heap;
    return NULL;
}

static size_t heap_bytes(void)
{
    return hm_round_up(sizeof(struct hm_heap), HM_HEAP_ALIGN);
}

static unsigned heap_pages_resident(const struct hm_heap *h)
{
    unsigned char vec[64];
    size_t pages = heap_bytes() / 4096;
    assert_true(pages <= sizeof vec);
    assert_int_equal(mincore((void *)h, heap_bytes(), vec), 0);
    unsigned n = 0;
    for (size_t i = 0; i < pages; i++)
        n += vec[i] & 1;
    return n;
}

static struct hm_heap_counters heap_counters(void)
{
    struct hm_heap_counters c;
    hm_heap_counters(&c);
    return c;
}

static void exited_threads_heaps_go_back_after_the_delay(void **state)
{
    (void)state;
    hakmem_trim();                          /* earlier tests' free heaps */
    assert_int_equal(heap_counters().heaps_free, 0);
    exit_threads();
    struct hm_heap_counters c = heap_counters();
    assert_int_equal(c.heaps_free, EXITING);
    for (int i = 0; i < EXITING; i++)
        assert_true(heap_pages_resident(exited_heaps[i]) > 0);
    hm_heaps_tidy_idle(UINT64_MAX);         /* not free that long */
    assert_int_equal(heap_counters().heaps_free, EXITING);
    assert_true(heap_pages_resident(exited_heaps[0]) > 0);
    hm_heaps_tidy_idle(0);
    assert_int_equal(heap_counters().heaps_free, 0);
    assert_int_equal(heap_counters().heaps_released, c.heaps_released + EXITING);
    for (int i = 0; i < EXITING; i++)
        assert_int_equal(heap_pages_resident(exited_heaps[i]), 0);

    /* The next thread reuses a released heap, zero as a new one (its
     * stash counts read as zero: it works). */
    struct hm_heap *reused = NULL;
    pthread_t t;
    pthread_create(&t, NULL, reuse_heap, &reused);
    pthread_join(t, NULL);
    c = heap_counters();
    assert_int_equal(c.heaps_free, 1);
    bool among = false;
    for (int i = 0; i < EXITING; i++)
        among |= reused == exited_heaps[i];
    assert_true(among);
    assert_true(heap_pages_resident(reused) > 0);
    /* A free heap still resident goes before a released one. */
    struct hm_heap *again = NULL;
    pthread_create(&t, NULL, reuse_heap, &again);
    pthread_join(t, NULL);
    assert_ptr_equal(again, reused);
    assert_int_equal(heap_counters().heaps_released, c.heaps_released);

    /* Without the ACE thread, this thread's slow paths release them
     * (HAKMEM_PURGE_DELAY_MS=50 here). */
    exit_threads();
    assert_int_equal(heap_counters().heaps_free, EXITING);
    for (int i = 0; i < 100 && heap_counters().heaps_free; i++) {
        slow_path_activity();
        nap_ms(20);
    }
    assert_int_equal(heap_counters().heaps_free, 0);
    for (int i = 0; i < EXITING; i++)
        assert_int_equal(heap_pages_resident(exited_heaps[i]), 0);

    /* malloc_trim releases them at once, and says it gave memory back. */
    exit_threads();
    c = heap_counters();
    assert_int_equal(c.heaps_free, EXITING);
    assert_int_equal(hakmem_trim(), 1);
    assert_int_equal(heap_counters().heaps_free, 0);
    assert_int_equal(heap_counters().heaps_released, c.heaps_released + EXITING);
    for (int i = 0; i < EXITING; i++)
        assert_int_equal(heap_pages_resident(exited_heaps[i]), 0);
}

/* malloc_trim reaches the heaps of the other threads too (those not in a
 * slow path at that moment): their stashes and the free pages of their
 * spans go back as its own do. */
static void trim_reaches_other_threads_heaps(void **state)
{
    (void)state;
    hakmem_trim();
    /* Counted from before the owner's frees, as in the test above. */
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    pthread_t t = start_owner(idle_owner);
    long sparse = rss_kb();
    unsigned long long cached0 = class_info_of(STASH_SIZE).blocks_cached;
    hakmem_trim();
    hakmem_stats(&s1);
    unsigned long long cached1 = class_info_of(STASH_SIZE).blocks_cached;
    long trimmed = rss_kb();
    uint64_t purged = s1.bytes_purged - s0.bytes_purged;
    print_message("other thread's heap: rss %ld -> %ld KiB, purged %llu KiB, "
                  "%u B blocks cached %llu -> %llu\n", sparse, trimmed,
                  (unsigned long long)(purged >> 10), (unsigned)STASH_SIZE, cached0, cached1);
    assert_true(purged > 11u << 20);            /* about 14 of 22 MiB in 112 B blocks */
    assert_true(cached1 < cached0);             /* the stash went back; the bin stays */
    if (HM_RSS_MEANINGFUL)
        assert_true(sparse - trimmed > 11 * 1024);
    end_owner(t);
}

/* malloc, free and realloc keep errno when they succeed, though the
 * calls they make to give memory back may fail: in a process that locked
 * its memory (mlockall) every MADV_DONTNEED fails with EINVAL, and a
 * malloc whose slow path purged left it in errno.  In a child, with no
 * purge delay, so that the slow paths give pages back all the time. */
static void locked_process_keeps_errno(void)
{
    if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0)
        _exit(3);                           /* not allowed here: nothing to test */
    hm_options.purge_delay_ns = 0;
    void *p[64] = { 0 };
    for (int round = 0; round < 200; round++) {
        for (int i = 0; i < 64; i++) {
            errno = 0;
            hakmem_free(p[i]);
            p[i] = hakmem_malloc(i % 2 ? 200u << 10 : 20u << 10);
            if (!p[i] || errno != 0)
                _exit(1);
        }
    }
    for (int i = 0; i < 64; i++) {
        errno = 0;
        hakmem_free(p[i]);
        if (errno != 0)
            _exit(2);
    }
    _exit(0);
}

static void successful_calls_keep_errno_when_giving_back_fails(void **state)
{
    (void)state;
    char buf[512];
    int status = run_child(locked_process_keeps_errno, buf, sizeof buf);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 3)
        skip();
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("child status %#x: %s", status, buf);
    char word[8];
    errno = 0;
    assert_false(hm_os_advise(word + 1, 4096, MADV_DONTNEED));     /* misaligned: EINVAL */
    assert_int_equal(errno, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(trim_returns_free_memory),
        cmocka_unit_test(trim_returns_what_exited_threads_left),
        cmocka_unit_test(free_pages_decay_after_the_delay),
        cmocka_unit_test(exited_threads_memory_decays),
        cmocka_unit_test(thread_cache_stays_within_budget),
        cmocka_unit_test(all_caches_together_stay_within_budget),
        cmocka_unit_test(purge_goes_in_steps),
        cmocka_unit_test(page_blocks_alone_pace_the_purge),
        cmocka_unit_test(flushes_alone_pace_the_purge),
        cmocka_unit_test(sparse_spans_give_back_their_free_pages),
        cmocka_unit_test(abandoned_segments_emptied_elsewhere_go_back),
        cmocka_unit_test(frees_into_an_exited_threads_segment_take_it_over),
        cmocka_unit_test(double_free_into_a_drained_segment_aborts),
        cmocka_unit_test(a_segment_that_stops_draining_is_abandoned_again),
        cmocka_unit_test(a_slow_paths_sweep_is_bounded),
        cmocka_unit_test(idle_threads_heaps_are_tidied),
        cmocka_unit_test(empty_segments_go_back_whole_after_the_delay),
        cmocka_unit_test(exited_threads_heaps_go_back_after_the_delay),
        cmocka_unit_test(trim_gives_back_free_pages_of_pinned_spans),
        cmocka_unit_test(trim_reaches_other_threads_heaps),
        cmocka_unit_test(double_free_of_a_hole_aborts),
        cmocka_unit_test(successful_calls_keep_errno_when_giving_back_fails),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
