/* large: random malloc/free of big blocks (64 KiB .. 8 MiB).
 *
 * --slots slots (default 16) hold blocks of log-uniform sizes; each op
 * verifies and frees a random slot's block and allocates a new one.  Each
 * block is touched at its first and last 64 bytes and on 8 pages spread
 * over it, like a program that uses only part of a big buffer: the cost
 * measured is the allocator's (mmap/munmap, page reuse, page faults on
 * fresh memory), not a memset.  --ops = replacements. */
#include "common.h"

#include <stdio.h>

struct slot {
    void *p;
    size_t size;
    uint64_t tag;
};

static size_t g_min = 64 * 1024;
static size_t g_max = 8 * 1024 * 1024;
static long g_slots = 16;
static long g_pages = 8;

/* A page-multiple stride that lands on about g_pages pages of the block. */
static size_t touch_stride(size_t size)
{
    size_t stride = size / (size_t)g_pages;
    stride = (stride + 4095) & ~(size_t)4095;
    return stride < 4096 ? 4096 : stride;
}

static void slot_free(struct slot *s, const char *what)
{
    pat_check_stride(s->p, s->size, s->tag, touch_stride(s->size), what);
    free(s->p);
    s->p = NULL;
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 20000, .threads = 1, .max_threads = 1, .seed = 42};
    const struct bench_opt opts[] = {
        {"min", OPT_SIZE, &g_min, "smallest block (default 64K)"},
        {"max", OPT_SIZE, &g_max, "largest block (default 8M)"},
        {"slots", OPT_LONG, &g_slots, "live blocks (default 16)"},
        {"pages", OPT_LONG, &g_pages, "pages touched per block (default 8)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "large",
                "Random replace of 64 KiB..8 MiB blocks, a few pages touched.\n"
                "--ops = replacements.",
                &a, opts);
    bench_quick_ops(&a, 500);
    if (g_min < 128 || g_max < g_min || g_slots < 1 || g_pages < 1)
        bench_fail("need 128 <= --min <= --max, --slots >= 1, --pages >= 1");

    size_t nslots = (size_t)g_slots;
    struct slot *slots = harness_alloc(nslots * sizeof *slots);
    rng_t rng;
    rng_seed(&rng, a.seed, 0);

    double t0 = now_sec();
    for (uint64_t i = 0; i < (uint64_t)a.ops; i++) {
        struct slot *s = &slots[rng_range(&rng, 0, nslots - 1)];
        if (s->p)
            slot_free(s, "large");
        s->size = (size_t)rng_log_range(&rng, g_min, g_max);
        s->tag = a.seed + i;
        s->p = bmalloc(s->size);
        pat_fill_stride(s->p, s->size, s->tag, touch_stride(s->size));
    }
    for (size_t i = 0; i < nslots; i++)
        if (slots[i].p)
            slot_free(&slots[i], "large (final)");
    double secs = now_sec() - t0;
    harness_free(slots, nslots * sizeof *slots);

    struct bench_result r = {.threads = 1, .ops = (uint64_t)a.ops, .seconds = secs};
    result_print(&r, " min=%zu max=%zu slots=%zu", g_min, g_max, nslots);
    return 0;
}
