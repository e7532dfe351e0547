/* mid_large_mt: medium blocks (8..32 KiB) from several threads at once.
 *
 * T threads (default 2), each with its own array of slots; each op picks a
 * random slot, verifies and frees its block and puts a new random-size
 * block there.  Nothing crosses threads, so this measures how well the
 * allocator scales for blocks too big for the tiny caches but too small to
 * be worth an mmap each: contention, page reuse and the cost of giving
 * pages back to the OS.  Blocks are touched on every page (see common.h).
 * --ops = total replacements over all threads. */
#include "common.h"

#include <stdio.h>

struct slot {
    void *p;
    size_t size;
    uint64_t tag;
};

struct worker {
    unsigned id;
    uint64_t ops;
    uint64_t seed;
    pthread_barrier_t *start;
};

static size_t g_min = 8 * 1024;
static size_t g_max = 32 * 1024;
static long g_slots = 256;

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    size_t nslots = (size_t)g_slots;
    struct slot *slots = harness_alloc(nslots * sizeof *slots);
    rng_t rng;
    rng_seed(&rng, w->seed, w->id + 1);
    uint64_t tag_base = w->seed + ((uint64_t)w->id << 40);

    pthread_barrier_wait(w->start);
    for (uint64_t i = 0; i < w->ops; i++) {
        struct slot *s = &slots[rng_range(&rng, 0, nslots - 1)];
        if (s->p) {
            pat_check(s->p, s->size, s->tag, "mid_large_mt");
            free(s->p);
        }
        s->size = (size_t)rng_range(&rng, g_min, g_max);
        s->tag = tag_base + i;
        s->p = bmalloc(s->size);
        pat_fill(s->p, s->size, s->tag);
    }
    for (size_t i = 0; i < nslots; i++) {
        if (slots[i].p) {
            pat_check(slots[i].p, slots[i].size, slots[i].tag, "mid_large_mt (final)");
            free(slots[i].p);
        }
    }
    harness_free(slots, nslots * sizeof *slots);
    return NULL;
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 4000000, .threads = 2, .max_threads = 256, .seed = 42};
    const struct bench_opt opts[] = {
        {"min", OPT_SIZE, &g_min, "smallest block (default 8K)"},
        {"max", OPT_SIZE, &g_max, "largest block (default 32K)"},
        {"slots", OPT_LONG, &g_slots, "slots per thread (default 256)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "mid_large_mt",
                "Per-thread random replace of 8..32 KiB blocks.\n"
                "--ops = total replacements over all threads.",
                &a, opts);
    bench_quick_ops(&a, 40000);
    if (g_min < 1 || g_max < g_min || g_slots < 1)
        bench_fail("need 1 <= --min <= --max and --slots >= 1");

    unsigned nt = (unsigned)a.threads;
    struct worker *w = harness_alloc(nt * sizeof *w);
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, nt + 1);
    for (unsigned i = 0; i < nt; i++)
        w[i] = (struct worker){.id = i, .ops = (uint64_t)a.ops / nt, .seed = a.seed, .start = &start};
    double secs = run_workers(worker_main, w, sizeof *w, nt, &start);
    uint64_t ops = 0;
    for (unsigned i = 0; i < nt; i++)
        ops += w[i].ops;
    pthread_barrier_destroy(&start);
    harness_free(w, nt * sizeof *w);

    struct bench_result r = {.threads = nt, .ops = ops, .seconds = secs};
    result_print(&r, " min=%zu max=%zu slots=%ld", g_min, g_max, g_slots);
    return 0;
}
