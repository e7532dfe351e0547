/* The learning loop end to end, run with HAKMEM_ACE=1 (see meson.build):
 * a hot class's refill count moves away from its default, and a fork child
 * starts its own ACE thread.  test_ace_off runs the same program without
 * HAKMEM_ACE: no thread, no events. */
#include "test_util.h"

#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <time.h>

#include "hakmem.h"
#include "ace/ace.h"
#include "refill/refill.h"

#define HOT_SIZE 64

static bool ace_expected(void)
{
    const char *v = getenv("HAKMEM_ACE");
    return v && !strcmp(v, "1");
}

/* Bursts a little larger than a thread cache, so refills come often. */
static void churn(double seconds)
{
    enum { BURST = 400 };
    static void *held[BURST];
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        for (int k = 0; k < 50; k++) {
            for (int i = 0; i < BURST; i++)
                held[i] = hakmem_malloc(HOT_SIZE);
            for (int i = 0; i < BURST; i++)
                hakmem_free(held[i]);
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9 < seconds);
}

static int threads_named(const char *name)
{
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        char path[300], comm[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        if (fgets(comm, sizeof comm, f) && !strncmp(comm, name, strlen(name)))
            n++;
        fclose(f);
    }
    if (d)
        closedir(d);
    return n;
}

/* Before this program's first allocation: with ACE on, the thread runs
 * from load, with no event seen yet (it purges for every thread, however
 * few refills make a report). */
static void ace_thread_runs_from_load(void **state)
{
    (void)state;
    struct hm_ace_counters ac;
    hm_ace_counters(&ac);
    assert_int_equal(ac.events, 0);
    assert_int_equal(ac.running, ace_expected());
    /* Created, it names itself when it first runs. */
    struct timespec nap = { 0, 10000000 };
    for (int i = 0; i < 100 && ace_expected() && threads_named("hakmem-ace") == 0; i++)
        nanosleep(&nap, NULL);
    assert_int_equal(threads_named("hakmem-ace"), ace_expected() ? 1 : 0);
}

/* Short-lived threads that make a few refills each (a class's first
 * refills carve part of a batch, and only full ones count toward a
 * report) free all they allocated and exit; the program sleeps.  No event
 * reached the ACE thread, and yet, with ACE on, it gives their pages back;
 * without, nobody does while the program sleeps. */
static void *few_refills(void *arg)
{
    enum { N = 40 };
    static const size_t sizes[] = { 64, 128, 256, 512 };
    void *p[N];
    (void)arg;
    for (unsigned k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        for (int i = 0; i < N; i++) {
            p[i] = hakmem_malloc(sizes[k]);
            memset(p[i], 1, sizes[k]);
        }
        for (int i = 0; i < N; i++)
            hakmem_free(p[i]);
    }
    return NULL;
}

static void ace_thread_purges_after_threads_with_no_reports(void **state)
{
    (void)state;
    for (int t = 0; t < 50; t++)
        run_thread(few_refills, NULL);
    struct hm_ace_counters ac;
    hm_ace_counters(&ac);
    assert_int_equal(ac.events, 0);
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    s1 = s0;
    /* Given back: their free pages purged, or their empty segments (in
     * the process pool) unmapped whole. */
    struct timespec nap = { 0, 20000000 };
    for (int i = 0; i < (ace_expected() ? 50 : 20) && s1.bytes_purged == s0.bytes_purged &&
                    s1.bytes_mapped == s0.bytes_mapped;
         i++) {
        nanosleep(&nap, NULL);
        hakmem_stats(&s1);
    }
    print_message("purged %llu, after sleeping %llu; mapped %llu, then %llu\n",
                  (unsigned long long)s0.bytes_purged, (unsigned long long)s1.bytes_purged,
                  (unsigned long long)s0.bytes_mapped, (unsigned long long)s1.bytes_mapped);
    if (ace_expected()) {
        assert_true(s1.bytes_purged > s0.bytes_purged || s1.bytes_mapped < s0.bytes_mapped);
    } else {
        assert_true(s1.bytes_purged == s0.bytes_purged);
        assert_true(s1.bytes_mapped == s0.bytes_mapped);
    }
}

static void learns_a_hot_class(void **state)
{
    (void)state;
    unsigned hot = 3;   /* the 64-byte class */
    struct hakmem_class_info ci;
    hakmem_class_info(hot, &ci);
    assert_int_equal(ci.block_size, HOT_SIZE);
    churn(1.5);
    hakmem_class_info(hot, &ci);
    struct hm_ace_counters ac;
    hm_ace_counters(&ac);
    if (ace_expected()) {
        assert_true(ac.running);
        assert_int_equal(threads_named("hakmem-ace"), 1);
        assert_true(ci.ace_events > 0);
        assert_true(ac.events > 0);
        assert_int_not_equal(ci.refill_count, ci.refill_default);
        assert_true(ci.refill_count >= ci.refill_min && ci.refill_count <= ci.refill_max);
    } else {
        assert_false(ac.running);
        assert_int_equal(threads_named("hakmem-ace"), 0);
        assert_int_equal(ac.events, 0);
        assert_int_equal(ci.ace_events, 0);
        assert_int_equal(ci.refill_count, ci.refill_default);
    }
}

/* A producer hands `share` percent of its blocks (bursts of 2000 of
 * `size` bytes) to a consumer thread, which frees them, and frees the
 * rest itself, for `seconds`. */
enum { HANDOFF_RING = 4096 };  /* a consumer never lags far */
static void *handoff_ring[HANDOFF_RING];
static _Atomic unsigned handoff_head, handoff_tail;
static _Atomic int handoff_stop;

static void *consume(void *arg)
{
    (void)arg;
    for (;;) {
        unsigned h = atomic_load(&handoff_head), t = atomic_load(&handoff_tail);
        if (h == t) {
            if (atomic_load(&handoff_stop))
                return NULL;
            sched_yield();
            continue;
        }
        hakmem_free(handoff_ring[h % HANDOFF_RING]);
        atomic_store(&handoff_head, h + 1);
    }
}

static void produce(size_t size, unsigned share, double seconds)
{
    enum { BURST = 2000 };
    static void *v[BURST];
    pthread_t c;
    atomic_store(&handoff_stop, 0);
    pthread_create(&c, NULL, consume, NULL);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        for (int i = 0; i < BURST; i++)
            v[i] = hakmem_malloc(size);
        for (int i = 0; i < BURST; i++) {
            if ((unsigned)(i % 100) >= share) {
                hakmem_free(v[i]);
                continue;
            }
            unsigned tail = atomic_load(&handoff_tail);
            while (tail - atomic_load(&handoff_head) >= HANDOFF_RING)
                sched_yield();
            handoff_ring[tail % HANDOFF_RING] = v[i];
            atomic_store(&handoff_tail, tail + 1);
        }
        /* The consumer catches up before the next burst: on a loaded
         * machine it lagged, and the producer's refills carved fresh
         * blocks instead of taking back freed ones (its class grew). */
        while (atomic_load(&handoff_head) != atomic_load(&handoff_tail))
            sched_yield();
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9 < seconds);
    atomic_store(&handoff_stop, 1);
    pthread_join(c, NULL);
}

/* A class whose refills mostly take back other threads' frees keeps its
 * count (a bigger batch would only hold more blocks in flight); one that
 * hands on two blocks in five still grows.  The rule weighs the real
 * blocks refilled: a refill takes a span's whole free list, often several
 * times the count, and counted as count x refills the first class grew
 * and the second did not. */
static void keeps_a_producers_count(void **state)
{
    (void)state;
#ifdef __SANITIZE_THREAD__
    /* Ten times slower, the consumer lags: the producer's refills carve
     * fresh blocks more than they take back freed ones (its class grew to
     * 112 in 311 events), which is what the rule should see then. */
    skip();
#endif
    const size_t producer = 96, mixed = 128;      /* classes 5 and 7 */
    produce(producer, 100, 1.0);
    produce(mixed, 40, 1.0);
    struct hakmem_class_info p, m;
    hakmem_class_info(hm_size_class(producer), &p);
    hakmem_class_info(hm_size_class(mixed), &m);
    print_message("producer: count %u (default %u), %llu events; mixed: count %u (default %u)\n",
                  p.refill_count, p.refill_default, (unsigned long long)p.ace_events,
                  m.refill_count, m.refill_default);
    assert_int_equal(p.refill_count, p.refill_default);
    if (ace_expected()) {
        assert_true(p.ace_events > 0);
        assert_true(m.refill_count > m.refill_default);
    } else {
        assert_int_equal(m.refill_count, m.refill_default);
    }
}

static void fork_child_runs_its_own_ace(void **state)
{
    (void)state;
    pid_t pid = fork();
    if (pid == 0) {
        /* The bins the child inherited are warm: use a fresh class so that
         * the child refills (the ACE thread starts at a refill). */
        static void *held[5000];
        for (int i = 0; i < 5000; i++)
            held[i] = hakmem_malloc(100);
        for (int i = 0; i < 5000; i++)
            hakmem_free(held[i]);
        struct timespec nap = { 0, 50000000 };
        nanosleep(&nap, NULL);
        struct hm_ace_counters ac;
        hm_ace_counters(&ac);
        int ok = ace_expected() ? ac.running && threads_named("hakmem-ace") == 1
                                : !ac.running && threads_named("hakmem-ace") == 0;
        _exit(ok ? 0 : 1);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    /* The parent's thread is unaffected. */
    struct hm_ace_counters ac;
    hm_ace_counters(&ac);
    assert_int_equal(ac.running, ace_expected());
}

/* With ACE on, the ACE thread gives free pages back while the application
 * sleeps; with it off, only the application's own slow paths do. */
static void ace_thread_purges_while_the_program_sleeps(void **state)
{
    (void)state;
    skip_unless_rss_meaningful();
    enum { N = 20000, SIZE = 1000 };
    static void *blocks[N];
    hakmem_trim();
    long base = rss_kb();
    for (int i = 0; i < N; i++) {
        blocks[i] = hakmem_malloc(SIZE);
        memset(blocks[i], 1, SIZE);
    }
    for (int i = 0; i < N; i++)
        hakmem_free(blocks[i]);
    long freed = rss_kb();
    assert_true(freed - base > 8 * 1024);   /* empty segments kept for reuse */
    struct timespec nap = { 0, 400000000 };
    nanosleep(&nap, NULL);
    long later = rss_kb();
    struct hakmem_stats st;
    hakmem_stats(&st);
    print_message("rss base %ld freed %ld later %ld purged %llu mapped %llu\n", base, freed, later,
                  (unsigned long long)st.bytes_purged, (unsigned long long)st.bytes_mapped);
    if (ace_expected())
        assert_true(later < base + 2 * 1024);
    else
        assert_true(later > base + 8 * 1024);
}

static uint64_t cached_of_class(size_t size)
{
    struct hakmem_class_info ci = { 0 };
    for (unsigned c = 0; c < hakmem_class_count(); c++) {
        hakmem_class_info(c, &ci);
        if (ci.block_size >= size)
            break;
    }
    return ci.blocks_cached;
}

/* A thread that sleeps keeps the blocks its last frees stashed; with ACE
 * on, the ACE thread sends them back to their spans once the thread has
 * entered no slow path for the purge delay (100 ms here).  Without ACE,
 * nobody else runs a slow path here, so they stay. */
static void ace_thread_tidies_a_sleeping_thread(void **state)
{
    (void)state;
    enum { N = 64, SIZE = 2000 };   /* not 1000: the test before left that class draining */
    void *p[N];
    for (int i = 0; i < N; i++)
        p[i] = hakmem_malloc(SIZE);
    for (int i = 0; i < N; i++)
        hakmem_free(p[i]);      /* the bin overflows: its newer half goes to the stash */
    uint64_t before = cached_of_class(SIZE), after = before;
    struct timespec nap = { 0, 20000000 };
    for (int i = 0; i < (ace_expected() ? 150 : 20) && after == before; i++) {
        nanosleep(&nap, NULL);
        after = cached_of_class(SIZE);
    }
    print_message("%d B blocks cached: %llu, after sleeping %llu\n", SIZE,
                  (unsigned long long)before, (unsigned long long)after);
    if (ace_expected())
        assert_true(after < before);
    else
        assert_true(after == before);
    /* Tidied once, an idle heap is left alone until other threads free
     * into it: 40 more passes of the ACE thread find nothing to do. */
    struct hm_heap_counters c0, c1;
    hm_heap_counters(&c0);
    struct timespec wait = { 0, 400000000 };
    nanosleep(&wait, NULL);
    hm_heap_counters(&c1);
    print_message("heaps tidied: %llu, 400 ms later %llu\n", (unsigned long long)c0.heaps_tidied,
                  (unsigned long long)c1.heaps_tidied);
    assert_int_equal(c1.heaps_tidied, c0.heaps_tidied);
}

/* A thread allocates and exits; another frees its blocks and exits (a
 * thread that only frees takes no segment over), and the program sleeps.
 * Those frees wait in the exited thread's segments, which no thread adopts
 * while none needs room: with ACE on, the ACE thread sweeps them and the
 * memory goes back; without, it stays until a slow path's purge or
 * malloc_trim. */
enum { LEFT_BLOCKS = 20000, LEFT_SIZE = 1000 };
static void *left_blocks[LEFT_BLOCKS];

static void *allocate_and_leave(void *arg)
{
    (void)arg;
    for (int i = 0; i < LEFT_BLOCKS; i++) {
        left_blocks[i] = hakmem_malloc(LEFT_SIZE);
        memset(left_blocks[i], 1, LEFT_SIZE);
    }
    return NULL;
}

static void *free_left_blocks(void *arg)
{
    (void)arg;
    for (int i = 0; i < LEFT_BLOCKS; i++)
        hakmem_free(left_blocks[i]);
    return NULL;
}

static void ace_thread_sweeps_exited_threads_segments(void **state)
{
    (void)state;
    skip_unless_rss_meaningful();
    hakmem_trim();
    long base = rss_kb();
    run_thread(allocate_and_leave, NULL);
    run_thread(free_left_blocks, NULL);
    long freed = rss_kb();
    assert_true(freed - base > 16 * 1024);
    struct timespec nap = { 0, 400000000 };
    nanosleep(&nap, NULL);
    long later = rss_kb();
    print_message("rss base %ld freed %ld later %ld\n", base, freed, later);
    if (ace_expected())
        assert_true(later < base + 4 * 1024);
    else
        assert_true(later > base + 16 * 1024);
    hakmem_trim();
}

/* The main thread frees most of what an exited thread left, taking its
 * segments over to drain them, and sleeps.  One block in 200 stays, so no
 * span empties: the segments stop draining.  With ACE on, the ACE thread
 * finds the heap idle and abandons them again (for threads out of room to
 * adopt); without, they stay with the sleeping thread. */
static void ace_thread_abandons_a_sleeping_threads_drained_segments(void **state)
{
    (void)state;
    hakmem_trim();
    void *mine = hakmem_malloc(64);         /* a segment of its own */
    run_thread(allocate_and_leave, NULL);
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    for (int i = 0; i < LEFT_BLOCKS; i++)
        if (i % 200)
            hakmem_free(left_blocks[i]);
    hakmem_stats(&s1);
    uint64_t drained = s1.segments_adopted - s0.segments_adopted, again = 0;
    struct timespec nap = { 0, 20000000 };
    for (int i = 0; i < (ace_expected() ? 75 : 25) && again < drained; i++) {
        nanosleep(&nap, NULL);
        hakmem_stats(&s1);
        again = s1.segments_abandoned - s0.segments_abandoned;
    }
    print_message("segments drained %llu, abandoned again %llu\n", (unsigned long long)drained,
                  (unsigned long long)again);
    assert_true(drained >= 1);
    assert_int_equal(again, ace_expected() ? drained : 0);
    for (int i = 0; i < LEFT_BLOCKS; i += 200)
        hakmem_free(left_blocks[i]);
    hakmem_free(mine);
    hakmem_trim();
}

/* The same, racing: the main thread sleeps just about as long as makes
 * its heap idle, then frees the blocks it kept, while the ACE thread may
 * be abandoning their segments again.  Either way each block must go back
 * once: the last trim finds every segment empty. */
static void frees_race_the_tidier_abandoning_drained_segments(void **state)
{
    (void)state;
    enum { ROUNDS = 12 };
    struct hakmem_stats s0, s1;
    hakmem_trim();
    hakmem_stats(&s0);
    void *mine = hakmem_malloc(64);
    for (int r = 0; r < ROUNDS; r++) {
        run_thread(allocate_and_leave, NULL);
        for (int i = 0; i < LEFT_BLOCKS; i++)
            if (i % 200)
                hakmem_free(left_blocks[i]);
        struct timespec nap = { 0, (95 + 2 * r) * 1000000L };  /* about the delay */
        nanosleep(&nap, NULL);
        for (int i = 0; i < LEFT_BLOCKS; i += 200) {
            unsigned char *b = left_blocks[i];
            assert_int_equal(b[0], 1);
            assert_int_equal(b[LEFT_SIZE - 1], 1);
            hakmem_free(b);
        }
    }
    hakmem_free(mine);
    hakmem_trim();
    hakmem_stats(&s1);
    print_message("segments before %llu, after %llu\n", (unsigned long long)s0.segments,
                  (unsigned long long)s1.segments);
    assert_true(s1.segments <= s0.segments + 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ace_thread_runs_from_load),
        cmocka_unit_test(ace_thread_purges_after_threads_with_no_reports),
        cmocka_unit_test(learns_a_hot_class),
        cmocka_unit_test(keeps_a_producers_count),
        cmocka_unit_test(fork_child_runs_its_own_ace),
        cmocka_unit_test(ace_thread_purges_while_the_program_sleeps),
        cmocka_unit_test(ace_thread_tidies_a_sleeping_thread),
        cmocka_unit_test(ace_thread_sweeps_exited_threads_segments),
        cmocka_unit_test(ace_thread_abandons_a_sleeping_threads_drained_segments),
        cmocka_unit_test(frees_race_the_tidier_abandoning_drained_segments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
