/* cache_scratch: passive false sharing (after Hoard's cache-scratch).
 *
 * The main thread allocates one small object per thread, back to back, so
 * they likely share a cache line.  Each thread frees the object it was
 * given, then repeatedly mallocs a small object and writes every byte of it
 * many times.  An allocator that hands the freed object (or its neighbours)
 * back to the thread that freed it makes threads write to one cache line
 * and the line bounces between cores; one that keeps per-thread memory
 * apart runs at full speed.  The time is almost all writes, so ops/s here
 * mostly shows whether false sharing happened.
 * --ops = total malloc+free pairs (T * iterations); --writes sets the
 * writes per byte of each object. */
#include "common.h"

#include <stdio.h>

struct worker {
    unsigned id;
    void *given;      /* allocated by main, freed by this thread */
    size_t given_size;
    uint64_t given_tag;
    uint64_t iterations;
    uint64_t seed;
    pthread_barrier_t *start;
};

static size_t g_size = 8;
static long g_writes = 100000;

/* Increments every byte `writes` times through a volatile pointer (so each
 * write really goes to memory), then subtracts the total once: a block no
 * other thread touched ends up as it started. */
static void scratch(unsigned char *p, size_t size)
{
    volatile unsigned char *v = p;
    for (long r = 0; r < g_writes; r++)
        for (size_t k = 0; k < size; k++)
            v[k] = (unsigned char)(v[k] + 1);
    for (size_t k = 0; k < size; k++)
        v[k] = (unsigned char)(v[k] - (unsigned char)g_writes);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    pthread_barrier_wait(w->start);
    pat_check(w->given, w->given_size, w->given_tag, "cache_scratch (given)");
    free(w->given);
    uint64_t tag = w->seed + ((uint64_t)(w->id + 1) << 40);
    for (uint64_t i = 0; i < w->iterations; i++, tag++) {
        unsigned char *p = bmalloc(g_size);
        pat_fill(p, g_size, tag);
        scratch(p, g_size);
        pat_check(p, g_size, tag, "cache_scratch");
        free(p);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 2000, .threads = 2, .max_threads = 256, .seed = 42};
    const struct bench_opt opts[] = {
        {"size", OPT_SIZE, &g_size, "object size (default 8)"},
        {"writes", OPT_LONG, &g_writes, "writes per byte per object (default 100000)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "cache_scratch",
                "False-sharing test: threads free an object the main thread made,\n"
                "then malloc small objects and write them many times.\n"
                "--ops = total malloc+free pairs over all threads.",
                &a, opts);
    if (a.quick && !a.ops_given)
        a.ops = 20 * a.threads;
    if (a.quick)
        g_writes = g_writes < 20000 ? g_writes : 20000;
    if (g_size < 1 || g_writes < 1)
        bench_fail("need --size >= 1 and --writes >= 1");

    unsigned nt = (unsigned)a.threads;
    struct worker *w = harness_alloc(nt * sizeof *w);
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, nt + 1);
    for (unsigned i = 0; i < nt; i++) { /* back to back: one cache line */
        w[i] = (struct worker){.id = i, .given_size = g_size, .given_tag = a.seed + i,
                               .iterations = (uint64_t)a.ops / nt, .seed = a.seed,
                               .start = &start};
        w[i].given = bmalloc(g_size);
        pat_fill(w[i].given, g_size, w[i].given_tag);
    }
    double secs = run_workers(worker_main, w, sizeof *w, nt, &start);
    uint64_t ops = 0;
    for (unsigned i = 0; i < nt; i++)
        ops += w[i].iterations;
    pthread_barrier_destroy(&start);
    harness_free(w, nt * sizeof *w);

    struct bench_result r = {.threads = nt, .ops = ops, .seconds = secs};
    result_print(&r, " size=%zu writes=%ld byte_writes_per_sec=%.0f", g_size, g_writes,
                 secs > 0 ? (double)ops * (double)g_size * (double)g_writes / secs : 0.0);
    return 0;
}
