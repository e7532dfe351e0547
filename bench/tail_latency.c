/* tail_latency: how long single malloc and free calls take, not how many
 * fit in a second.  A server's slowest requests are made of its slowest
 * calls: a page fault, an madvise, an mmap, a lock, a pass over a heap's
 * spans, each paid by whichever call triggers it.
 *
 * A ring of slots (default 4096) with log-uniform sizes from 16 B to
 * --max (default 64 KiB); each op frees a random slot's block and mallocs a
 * new one there, each call timed on its own with the TSC.  Every --cycle
 * ops (default 200000) three slots in four are freed at once (untimed),
 * and the live set grows back through the ops that follow: spans empty and
 * fill again, memory goes back to the OS and comes back, so the calls that
 * pay for an allocator's periodic work are among those measured.
 *
 * Times go into a histogram with 16 buckets per power of two (at most 6%
 * above the true value); the RESULT line gives percentiles over all timed
 * calls, in nanoseconds, less the cost of reading the TSC twice (measured
 * at start).  One op = one malloc (+ the free of the block it replaces). */
#include "common.h"

#include <stdio.h>
#include <string.h>
#include <x86intrin.h>

static size_t g_max = 64 * 1024;
static long g_slots = 4096;
static long g_cycle = 200000;

static struct lat_hist hist;

static void replace(struct lat_slot *s, rng_t *rng, uint64_t tag)
{
    lat_replace(&hist, s, (size_t)rng_log_range(rng, 16, g_max), tag, "tail_latency");
}

/* Three slots in four let go at once: the live set falls to a quarter. */
static void shrink(struct lat_slot *ring, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (i % 4 != 0 && ring[i].p) {
            pat_check(ring[i].p, ring[i].size, ring[i].tag, "tail_latency (shrink)");
            free(ring[i].p);
            ring[i].p = NULL;
        }
    }
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 4000000, .threads = 1, .max_threads = 1, .seed = 42};
    const struct bench_opt opts[] = {
        {"max", OPT_SIZE, &g_max, "largest block size (default 64K)"},
        {"slots", OPT_LONG, &g_slots, "ring size (default 4096)"},
        {"cycle", OPT_LONG, &g_cycle, "ops between shrinks to a quarter (default 200000)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "tail_latency",
                "Random replace with periodic shrinks; every malloc and free timed.\n"
                "--ops = number of replacements (malloc+free pairs).",
                &a, opts);
    bench_quick_ops(&a, 200000);
    if (g_max < 16 || g_slots < 4 || g_cycle < 1)
        bench_fail("need --max >= 16, --slots >= 4 and --cycle >= 1");

    size_t nslots = (size_t)g_slots;
    struct lat_slot *ring = harness_alloc(nslots * sizeof *ring);
    rng_t rng;
    rng_seed(&rng, a.seed, 0);
    lat_init(&hist);

    double t0 = now_sec();
    uint64_t tsc0 = __rdtsc();
    for (uint64_t i = 0; i < (uint64_t)a.ops; i++) {
        if (i && i % (uint64_t)g_cycle == 0)
            shrink(ring, nslots);
        replace(&ring[rng_range(&rng, 0, nslots - 1)], &rng, a.seed + i);
    }
    double secs = now_sec() - t0;
    double ns_per_tick = secs * 1e9 / (double)(__rdtsc() - tsc0);
    for (size_t i = 0; i < nslots; i++) {
        if (ring[i].p) {
            pat_check(ring[i].p, ring[i].size, ring[i].tag, "tail_latency (final)");
            free(ring[i].p);
        }
    }
    harness_free(ring, nslots * sizeof *ring);

#define NS(x) ((double)(x) * ns_per_tick)
    struct bench_result r = {.threads = 1, .ops = (uint64_t)a.ops, .seconds = secs};
    result_print(&r,
                 " max=%zu slots=%zu cycle=%ld calls=%" PRIu64
                 " p50_ns=%.0f p99_ns=%.0f p999_ns=%.0f p9999_ns=%.0f max_ns=%.0f"
                 " tsc_overhead_ns=%.1f",
                 g_max, nslots, g_cycle, hist.samples, NS(lat_percentile(&hist, 0.5)),
                 NS(lat_percentile(&hist, 0.99)), NS(lat_percentile(&hist, 0.999)),
                 NS(lat_percentile(&hist, 0.9999)), NS(hist.slowest), NS(hist.overhead));
    return 0;
}
