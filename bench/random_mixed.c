/* random_mixed: a single-threaded mix of sizes with a steady live set.
 *
 * A ring of 8192 slots; each op picks a random slot, verifies and frees the
 * block in it (if any) and puts a new block of a random size there.  Sizes
 * are log-uniform in [16, --max] (default 1024), so small ones dominate by
 * count as in typical programs; blocks die in random order, which is what
 * fragments free lists.  One op = one malloc (+ the free of the block it
 * replaces). */
#include "common.h"

#include <stdio.h>

struct slot {
    void *p;
    size_t size;
    uint64_t tag;
};

static size_t g_min = 16;
static size_t g_max = 1024;
static long g_slots = 8192;

static void replace(struct slot *s, rng_t *rng, uint64_t tag)
{
    if (s->p) {
        pat_check(s->p, s->size, s->tag, "random_mixed");
        free(s->p);
    }
    s->size = (size_t)rng_log_range(rng, g_min, g_max);
    s->tag = tag;
    s->p = bmalloc(s->size);
    pat_fill(s->p, s->size, tag);
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 10000000, .threads = 1, .max_threads = 1, .seed = 42};
    const struct bench_opt opts[] = {
        {"min", OPT_SIZE, &g_min, "smallest block size (default 16)"},
        {"max", OPT_SIZE, &g_max, "largest block size (default 1024; e.g. 32K)"},
        {"slots", OPT_LONG, &g_slots, "ring size (default 8192)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "random_mixed",
                "Random replace in a ring of slots, log-uniform sizes.\n"
                "--ops = number of replacements (malloc+free pairs).",
                &a, opts);
    bench_quick_ops(&a, 200000);
    if (g_min < 1 || g_max < g_min || g_slots < 1)
        bench_fail("need 1 <= --min <= --max and --slots >= 1");

    size_t nslots = (size_t)g_slots;
    struct slot *ring = harness_alloc(nslots * sizeof *ring);
    rng_t rng;
    rng_seed(&rng, a.seed, 0);

    double t0 = now_sec();
    for (uint64_t i = 0; i < (uint64_t)a.ops; i++)
        replace(&ring[rng_range(&rng, 0, nslots - 1)], &rng, a.seed + i);
    for (size_t i = 0; i < nslots; i++) {
        if (ring[i].p) {
            pat_check(ring[i].p, ring[i].size, ring[i].tag, "random_mixed (final)");
            free(ring[i].p);
        }
    }
    double secs = now_sec() - t0;

    harness_free(ring, nslots * sizeof *ring);
    struct bench_result r = {.threads = 1, .ops = (uint64_t)a.ops, .seconds = secs};
    result_print(&r, " min=%zu max=%zu slots=%zu", g_min, g_max, nslots);
    return 0;
}
