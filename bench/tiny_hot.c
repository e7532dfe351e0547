/* tiny_hot: the allocator's fastest path.
 *
 * Default: one thread mallocs one small size (32 B), writes it, verifies it
 * and frees it, in a loop: every malloc is served by the block the previous
 * free returned, so this measures the per-thread cache hit path.
 *
 * --lifo N: keeps a LIFO working set instead: N blocks of 16..128 B are
 * allocated, then verified and freed newest-first, round after round, which
 * exercises the free list with several live blocks of mixed classes.
 *
 * One op = one malloc + one free. */
#include "common.h"

#include <stdio.h>

#define SIZE_TABLE 4096 /* power of two: sizes are drawn once, up front */

static long g_size = 32;
static long g_lifo = 0;

static uint64_t run_single(uint64_t ops, uint64_t seed)
{
    size_t size = (size_t)g_size;
    for (uint64_t i = 0; i < ops; i++) {
        uint64_t tag = seed + i;
        char *p = bmalloc(size);
        pat_fill(p, size, tag);
        pat_check(p, size, tag, "tiny_hot");
        free(p);
    }
    return ops;
}

struct lifo_slot {
    void *p;
    size_t size;
    uint64_t tag;
};

/* Rounds of: push N blocks, then pop (verify + free) them newest-first.
 * Sizes come from a table drawn up front so the RNG stays out of the loop. */
static uint64_t run_lifo(uint64_t ops, uint64_t seed)
{
    size_t n = (size_t)g_lifo;
    struct lifo_slot *stack = harness_alloc(n * sizeof *stack);
    uint32_t *sizes = harness_alloc(SIZE_TABLE * sizeof *sizes);
    rng_t rng;
    rng_seed(&rng, seed, 0);
    for (size_t i = 0; i < SIZE_TABLE; i++)
        sizes[i] = (uint32_t)rng_range(&rng, 16, 128);

    uint64_t done = 0, k = 0;
    while (done < ops) {
        size_t depth = ops - done < n ? (size_t)(ops - done) : n;
        for (size_t j = 0; j < depth; j++, k++) {
            stack[j].size = sizes[k & (SIZE_TABLE - 1)];
            stack[j].tag = seed + k;
            stack[j].p = bmalloc(stack[j].size);
            pat_fill(stack[j].p, stack[j].size, stack[j].tag);
        }
        for (size_t j = depth; j-- > 0;) {
            pat_check(stack[j].p, stack[j].size, stack[j].tag, "tiny_hot --lifo");
            free(stack[j].p);
        }
        done += depth;
    }
    harness_free(sizes, SIZE_TABLE * sizeof *sizes);
    harness_free(stack, n * sizeof *stack);
    return done;
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 40000000, .threads = 1, .max_threads = 1, .seed = 42};
    const struct bench_opt opts[] = {
        {"size", OPT_LONG, &g_size, "block size in bytes (default 32)"},
        {"lifo", OPT_LONG, &g_lifo, "N: LIFO working set of N blocks of 16..128 B"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "tiny_hot", "One thread, malloc/free of small blocks in a loop.\n"
                "--ops = number of malloc+free pairs (default 25000000 with --lifo).", &a, opts);
    if (g_lifo > 0 && !a.ops_given)
        a.ops = 25000000; /* the LIFO loop is slower per op: keep ~1-2 s */
    bench_quick_ops(&a, 200000);
    if (g_size < 1)
        bench_fail("--size must be at least 1");

    double t0 = now_sec();
    uint64_t ops = g_lifo > 0 ? run_lifo((uint64_t)a.ops, a.seed)
                              : run_single((uint64_t)a.ops, a.seed);
    double secs = now_sec() - t0;

    struct bench_result r = {.threads = 1, .ops = ops, .seconds = secs};
    if (g_lifo > 0)
        result_print(&r, " lifo=%ld size=16-128", g_lifo);
    else
        result_print(&r, " size=%ld", g_size);
    return 0;
}
