/* larson: server churn in the style of Larson & Krishnan's benchmark.
 *
 * T lanes (default 2), each a slot array of blocks (sizes 16..1024 by
 * default, like the original's 8..1000).  The main thread fills every lane
 * up front, so the first frees of each lane are cross-thread.  A lane is
 * worked by one thread at a time: it does --round-ops random replacements,
 * then creates a new thread, hands it the lane and exits.  Blocks allocated
 * by a thread are thus freed later by its successors after it has died:
 * the allocator must handle frees into the caches of dead threads, and
 * reclaim those caches, while threads come and go like connections in a
 * server.
 * --ops = total replacements over all lanes (one malloc + one free each). */
#include "common.h"

#include <stdio.h>

struct slot {
    void *p;
    size_t size;
    uint64_t tag;
};

struct lane {
    unsigned id;
    struct slot *slots;
    uint64_t ops_left;   /* replacements still to do in this lane */
    uint64_t next_tag;
    uint64_t generation; /* how many threads have worked this lane */
    rng_t rng;
};

static size_t g_min = 16;
static size_t g_max = 1024;
static long g_slots = 1000;
static long g_round_ops = 10000;

/* Lanes still running; the last thread of a lane decrements it. */
static pthread_mutex_t g_done_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_done_cond = PTHREAD_COND_INITIALIZER;
static unsigned g_lanes_running;

static void slot_put(struct slot *s, struct lane *l)
{
    s->size = (size_t)rng_range(&l->rng, g_min, g_max);
    s->tag = l->next_tag++;
    s->p = bmalloc(s->size);
    pat_fill(s->p, s->size, s->tag);
}

static void slot_clear(struct slot *s, const char *what)
{
    pat_check(s->p, s->size, s->tag, what);
    free(s->p);
    s->p = NULL;
}

static void *lane_thread(void *arg)
{
    struct lane *l = arg;
    uint64_t n = l->ops_left < (uint64_t)g_round_ops ? l->ops_left : (uint64_t)g_round_ops;
    size_t nslots = (size_t)g_slots;
    for (uint64_t i = 0; i < n; i++) {
        struct slot *s = &l->slots[rng_range(&l->rng, 0, nslots - 1)];
        slot_clear(s, "larson");
        slot_put(s, l);
    }
    l->ops_left -= n;
    l->generation++;
    if (l->ops_left > 0) {
        /* Hand the lane on; this thread exits, its blocks live on. */
        thread_start_detached(lane_thread, l);
        return NULL;
    }
    pthread_mutex_lock(&g_done_lock);
    if (--g_lanes_running == 0)
        pthread_cond_signal(&g_done_cond);
    pthread_mutex_unlock(&g_done_lock);
    return NULL;
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 8000000, .threads = 2, .max_threads = 256, .seed = 42};
    const struct bench_opt opts[] = {
        {"min", OPT_SIZE, &g_min, "smallest block (default 16)"},
        {"max", OPT_SIZE, &g_max, "largest block (default 1024)"},
        {"slots", OPT_LONG, &g_slots, "blocks per lane (default 1000)"},
        {"round-ops", OPT_LONG, &g_round_ops,
         "replacements a thread does before handing its lane on (default 10000)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "larson",
                "Larson-style churn: threads replace blocks, then hand their slots\n"
                "to a new thread and exit. --ops = total replacements.",
                &a, opts);
    bench_quick_ops(&a, 100000);
    if (g_min < 1 || g_max < g_min || g_slots < 1 || g_round_ops < 1)
        bench_fail("need 1 <= --min <= --max, --slots >= 1, --round-ops >= 1");

    unsigned nl = (unsigned)a.threads;
    size_t nslots = (size_t)g_slots;
    struct lane *lanes = harness_alloc(nl * sizeof *lanes);
    for (unsigned i = 0; i < nl; i++) {
        struct lane *l = &lanes[i];
        l->id = i;
        l->slots = harness_alloc(nslots * sizeof *l->slots);
        l->ops_left = (uint64_t)a.ops / nl;
        l->next_tag = a.seed + ((uint64_t)i << 40);
        rng_seed(&l->rng, a.seed, i + 1);
        for (size_t j = 0; j < nslots; j++) /* by main: first frees cross */
            slot_put(&l->slots[j], l);
    }

    double t0 = now_sec();
    g_lanes_running = nl;
    for (unsigned i = 0; i < nl; i++)
        thread_start_detached(lane_thread, &lanes[i]);
    pthread_mutex_lock(&g_done_lock);
    while (g_lanes_running > 0)
        pthread_cond_wait(&g_done_cond, &g_done_lock);
    pthread_mutex_unlock(&g_done_lock);
    double secs = now_sec() - t0;

    uint64_t ops = 0, generations = 0;
    for (unsigned i = 0; i < nl; i++) {
        for (size_t j = 0; j < nslots; j++)
            slot_clear(&lanes[i].slots[j], "larson (final)");
        ops += (uint64_t)a.ops / nl;
        generations += lanes[i].generation;
        harness_free(lanes[i].slots, nslots * sizeof *lanes[i].slots);
    }
    harness_free(lanes, nl * sizeof *lanes);

    struct bench_result r = {.threads = nl, .ops = ops, .seconds = secs};
    result_print(&r, " min=%zu max=%zu slots=%zu threads_created=%" PRIu64, g_min, g_max,
                 nslots, generations);
    return 0;
}
