/* teardown: a server drops a big structure at once: a cache emptied, the
 * objects of a finished request or session freed, a process winding down.
 *
 * Each round allocates --live bytes (default 64 MiB) of log-uniform
 * 16..256 B blocks, each filled with its tag, verifies them all (untimed),
 * and then frees them all, timed: in a random order by default (an LRU
 * cache's evictions follow no order its allocations had), or in
 * allocation order with --in-order.  64 MiB is more than this machine's
 * last-level cache, so the blocks are cold when freed: an allocator
 * whose free reads the block (a header, a check) waits on memory at each
 * one; stores to cold lines overlap better.  Only the frees are timed:
 * work an allocator defers to later mallocs or to a background thread
 * (memory going back after a delay) falls in the next round's build,
 * whose time the extra key build_seconds gives.  --ops = total frees over
 * all rounds (as many rounds as reach it, at least one); ops_per_sec is
 * frees per second. */
#include "common.h"

static size_t g_live = (size_t)64 << 20;
static bool g_in_order = false;

struct live {
    void **p;
    uint16_t *size;
    size_t n;
};

static void build(struct live *l, rng_t *rng, uint64_t seed)
{
    size_t bytes = 0;
    l->n = 0;
    while (bytes < g_live) {
        size_t size = (size_t)rng_log_range(rng, 16, 256);
        l->p[l->n] = bmalloc(size);
        l->size[l->n] = (uint16_t)size;
        pat_fill(l->p[l->n], size, pat_tag(seed, l->n));
        bytes += size;
        l->n++;
    }
}

static void verify(const struct live *l, uint64_t seed)
{
    for (size_t i = 0; i < l->n; i++)
        pat_check(l->p[i], l->size[i], pat_tag(seed, i), "teardown");
}

static void shuffle(void **p, size_t n, rng_t *rng)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)rng_range(rng, 0, i - 1);
        void *t = p[i - 1];
        p[i - 1] = p[j];
        p[j] = t;
    }
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 2000000, .threads = 1, .max_threads = 1, .seed = 42};
    const struct bench_opt opts[] = {
        {"live", OPT_SIZE, &g_live, "bytes of blocks built and freed each round (default 64M)"},
        {"in-order", OPT_FLAG, &g_in_order, "free in allocation order (default: random)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "teardown",
                "Builds --live bytes of 16..256 B blocks, then frees them all, timed\n"
                "(random order unless --in-order).  --ops = total frees.",
                &a, opts);
    if (a.quick && !a.ops_given) {
        a.ops = 20000;
        g_live = 1 << 20;
    }
    if (g_live < 4096)
        bench_fail("need --live >= 4K");

    size_t most = g_live / 16 + 1;
    struct live l = {harness_alloc(most * sizeof *l.p), harness_alloc(most * sizeof *l.size), 0};
    rng_t rng;
    rng_seed(&rng, a.seed, 0);
    uint64_t frees = 0, rounds = 0;
    double secs = 0, build_secs = 0;
    long peak_kb = 0;
    do {
        uint64_t seed = a.seed + rounds;
        double b0 = now_sec();
        build(&l, &rng, seed);
        build_secs += now_sec() - b0;
        verify(&l, seed);
        long hwm;                       /* VmHWM may fall as memory goes back */
        rss_read(NULL, &hwm);
        if (hwm > peak_kb)
            peak_kb = hwm;
        if (!g_in_order)
            shuffle(l.p, l.n, &rng);
        double t0 = now_sec();
        for (size_t i = 0; i < l.n; i++)
            free(l.p[i]);
        secs += now_sec() - t0;
        frees += l.n;
        rounds++;
    } while (frees < (uint64_t)a.ops);

    harness_free(l.p, most * sizeof *l.p);      /* before the reading: not the allocator's */
    harness_free(l.size, most * sizeof *l.size);
    struct bench_result r = {.threads = 1, .ops = frees, .seconds = secs};
    rss_read(&r.final_rss_kb, NULL);
    r.peak_rss_kb = peak_kb;
    result_print(&r, " live=%zu rounds=%" PRIu64 " order=%s build_seconds=%.6f", g_live, rounds,
                 g_in_order ? "allocation" : "random", build_secs);
    return 0;
}
