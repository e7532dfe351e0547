/* big_heap: a server whose heap is mostly long-lived small objects (a
 * cache, a session table) while its requests churn short-lived blocks.
 *
 * First --live bytes (default 512 MiB) of 32-64 B blocks are allocated and
 * kept to the end.  Then a ring of --slots (default 4096) slots is
 * replaced at random with blocks of 16 B..--max (default 64 KiB, uniform:
 * mostly medium blocks, whose spans come and go), every malloc and free
 * of the churn timed on its own as in tail_latency.  An allocator whose
 * slow paths look at its whole heap (every segment, every span) pays for
 * the long-lived half gigabyte at every refill, and shows it in the churn's
 * p999 and rate, which the RESULT line reports (ops = churn
 * replacements).  The long-lived blocks are verified at the end. */
#include "common.h"

#include <stdio.h>
#include <x86intrin.h>

static size_t g_live = (size_t)512 << 20;
static size_t g_max = 64 * 1024;
static long g_slots = 4096;
static struct lat_hist hist;

/* The long-lived blocks, 32..64 B, each tagged by its index. */
static void **build(size_t n, uint64_t seed)
{
    void **keep = harness_alloc(n * sizeof *keep);
    for (size_t i = 0; i < n; i++) {
        size_t size = 32 + (i % 3) * 16;
        keep[i] = bmalloc(size);
        pat_fill(keep[i], size, pat_tag(seed, i));
    }
    return keep;
}

static void verify_and_free(void **keep, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++) {
        pat_check(keep[i], 32 + (i % 3) * 16, pat_tag(seed, i), "big_heap (long-lived)");
        free(keep[i]);
    }
    harness_free(keep, n * sizeof *keep);
}

static void replace(struct lat_slot *s, rng_t *rng, uint64_t tag)
{
    lat_replace(&hist, s, (size_t)rng_range(rng, 16, g_max), tag, "big_heap");
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 1000000, .threads = 1, .max_threads = 1, .seed = 42};
    const struct bench_opt opts[] = {
        {"live", OPT_SIZE, &g_live, "long-lived bytes of 32-64 B blocks (default 512M)"},
        {"max", OPT_SIZE, &g_max, "largest churned block (default 64K)"},
        {"slots", OPT_LONG, &g_slots, "churn ring size (default 4096)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "big_heap",
                "Half a gigabyte of long-lived small blocks, then a timed churn of\n"
                "16 B..64 KiB blocks.  --ops = churn replacements.",
                &a, opts);
    if (a.quick && !a.ops_given) {
        a.ops = 20000;
        g_live = 16 << 20;
    }
    if (g_max < 16 || g_slots < 1)
        bench_fail("need --max >= 16 and --slots >= 1");

    size_t n_live = g_live / 48;
    void **keep = build(n_live, a.seed);
    size_t nslots = (size_t)g_slots;
    struct lat_slot *ring = harness_alloc(nslots * sizeof *ring);
    rng_t rng;
    rng_seed(&rng, a.seed, 1);
    lat_init(&hist);

    double t0 = now_sec();
    uint64_t tsc0 = __rdtsc();
    for (uint64_t i = 0; i < (uint64_t)a.ops; i++)
        replace(&ring[rng_range(&rng, 0, nslots - 1)], &rng, a.seed + i);
    double secs = now_sec() - t0;
    double ns_per_tick = secs * 1e9 / (double)(__rdtsc() - tsc0);
    struct bench_result r = {.threads = 1, .ops = (uint64_t)a.ops, .seconds = secs};
    rss_read(&r.final_rss_kb, &r.peak_rss_kb);

    for (size_t i = 0; i < nslots; i++) {
        if (ring[i].p) {
            pat_check(ring[i].p, ring[i].size, ring[i].tag, "big_heap (final)");
            free(ring[i].p);
        }
    }
    harness_free(ring, nslots * sizeof *ring);
    verify_and_free(keep, n_live, a.seed);

#define NS(x) ((double)(x) * ns_per_tick)
    result_print(&r,
                 " live=%zu max=%zu slots=%zu p50_ns=%.0f p99_ns=%.0f p999_ns=%.0f"
                 " p9999_ns=%.0f max_ns=%.0f",
                 g_live, g_max, nslots, NS(lat_percentile(&hist, 0.5)),
                 NS(lat_percentile(&hist, 0.99)), NS(lat_percentile(&hist, 0.999)),
                 NS(lat_percentile(&hist, 0.9999)), NS(hist.slowest));
    return 0;
}
