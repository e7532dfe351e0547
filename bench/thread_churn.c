/* thread_churn: thousands of short-lived threads.
 *
 * Threads are created and joined one after another, --threads of them
 * alive at a time (default 2), 2000 in all by default.  Each does
 * --per-thread (default 300) small mallocs (16..512 B) with random replace
 * in a few live slots; when it starts it frees the blocks its predecessor
 * left behind, and when it ends it frees half its blocks and leaves the
 * other half for a later thread.  This measures per-thread setup and
 * teardown (caches created, flushed and reclaimed), frees of blocks whose
 * owner thread is gone, and whether memory of dead threads is reused: see
 * final_rss_kb, taken once the last thread has ended and every block is
 * freed.  With --idle S the process then sleeps S seconds and reports
 * idle_rss_kb: what an allocator that gives memory back with a delay (or
 * from a background thread) still holds after a quiet spell.
 * --ops = total mallocs (threads created = ops / per-thread); --spawn N is
 * the same as --ops N*per-thread. */
#include "common.h"

#include <stdio.h>

#define LIVE 32      /* live slots per thread */
#define LEAVE 16     /* blocks a thread leaves to the next */
#define HANDOFF 256  /* capacity of the shared left-behind list */

struct block {
    void *p;
    size_t size;
    uint64_t tag;
};

struct worker {
    uint64_t index; /* which thread this is, for seeding and tags */
    uint64_t seed;
};

static long g_per_thread = 300;
static long g_spawn = 0;
static double g_idle = 0;

/* Blocks left by finished threads, for the next ones to free. */
static pthread_mutex_t g_handoff_lock = PTHREAD_MUTEX_INITIALIZER;
static struct block g_handoff[HANDOFF];
static size_t g_handoff_n;

static void block_free(struct block *b, const char *what)
{
    pat_check(b->p, b->size, b->tag, what);
    free(b->p);
    b->p = NULL;
}

/* Takes up to LEAVE left-behind blocks (oldest owners likely dead). */
static size_t handoff_take(struct block *out)
{
    pthread_mutex_lock(&g_handoff_lock);
    size_t n = g_handoff_n < LEAVE ? g_handoff_n : LEAVE;
    g_handoff_n -= n;
    for (size_t i = 0; i < n; i++)
        out[i] = g_handoff[g_handoff_n + i];
    pthread_mutex_unlock(&g_handoff_lock);
    return n;
}

/* Leaves blocks for later threads; returns how many did not fit. */
static size_t handoff_leave(const struct block *in, size_t n)
{
    pthread_mutex_lock(&g_handoff_lock);
    size_t room = HANDOFF - g_handoff_n, k = n < room ? n : room;
    for (size_t i = 0; i < k; i++)
        g_handoff[g_handoff_n++] = in[i];
    pthread_mutex_unlock(&g_handoff_lock);
    return n - k;
}

static void *worker_main(void *arg)
{
    const struct worker *w = arg;
    struct block live[LIVE] = {{0}}, inherited[LEAVE];
    rng_t rng;
    rng_seed(&rng, w->seed, w->index + 1);
    uint64_t tag = w->seed + (w->index << 24);

    size_t n_in = handoff_take(inherited);
    for (size_t i = 0; i < n_in; i++)
        block_free(&inherited[i], "thread_churn (inherited)");

    for (long i = 0; i < g_per_thread; i++) {
        struct block *b = &live[rng_range(&rng, 0, LIVE - 1)];
        if (b->p)
            block_free(b, "thread_churn");
        b->size = (size_t)rng_log_range(&rng, 16, 512);
        b->tag = tag++;
        b->p = bmalloc(b->size);
        pat_fill(b->p, b->size, b->tag);
    }

    /* Compact the live blocks, leave the first LEAVE, free the rest. */
    struct block keep[LIVE];
    size_t n = 0;
    for (size_t i = 0; i < LIVE; i++)
        if (live[i].p)
            keep[n++] = live[i];
    size_t leave = n < LEAVE ? n : LEAVE;
    size_t unplaced = handoff_leave(keep, leave);
    for (size_t i = leave - unplaced; i < n; i++)
        block_free(&keep[i], "thread_churn (exit)");
    return NULL;
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 600000, .threads = 2, .max_threads = 64, .seed = 42};
    const struct bench_opt opts[] = {
        {"per-thread", OPT_LONG, &g_per_thread, "mallocs per thread (default 300)"},
        {"spawn", OPT_LONG, &g_spawn, "threads to create (default 2000 = --ops / per-thread)"},
        {"idle", OPT_DOUBLE, &g_idle, "seconds to sleep at the end before idle_rss_kb (default 0)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "thread_churn",
                "Create and join many short-lived threads that malloc/free a little.\n"
                "--threads T alive at a time. --ops = total mallocs.",
                &a, opts);
    if (g_per_thread < 1 || g_idle < 0)
        bench_fail("need --per-thread >= 1 and --idle >= 0");
    bench_quick_ops(&a, 100 * g_per_thread);
    uint64_t spawn = g_spawn > 0 ? (uint64_t)g_spawn : (uint64_t)a.ops / (uint64_t)g_per_thread;
    if (spawn < 1)
        spawn = 1;

    unsigned nt = (unsigned)a.threads;
    pthread_t *running = harness_alloc(nt * sizeof *running);
    struct worker *w = harness_alloc(nt * sizeof *w);

    /* A sliding window: thread i replaces thread i - T once that ends. */
    double t0 = now_sec();
    for (uint64_t i = 0; i < spawn; i++) {
        unsigned k = (unsigned)(i % nt);
        if (i >= nt)
            thread_join(running[k]);
        w[k] = (struct worker){.index = i, .seed = a.seed};
        running[k] = thread_start(worker_main, &w[k]);
    }
    for (uint64_t i = spawn > nt ? spawn - nt : 0; i < spawn; i++)
        thread_join(running[i % nt]);
    struct block rest[LEAVE];
    size_t n;
    while ((n = handoff_take(rest)) > 0)
        for (size_t i = 0; i < n; i++)
            block_free(&rest[i], "thread_churn (final)");
    double secs = now_sec() - t0;
    harness_free(w, nt * sizeof *w);
    harness_free(running, nt * sizeof *running);

    uint64_t ops = spawn * (uint64_t)g_per_thread;
    struct bench_result r = {.threads = nt, .ops = ops, .seconds = secs};
    rss_read(&r.final_rss_kb, &r.peak_rss_kb);
    char idle[64] = "";
    if (g_idle > 0) {
        sleep_sec(g_idle);
        snprintf(idle, sizeof idle, " idle_s=%.1f idle_rss_kb=%ld", g_idle, rss_now_kb());
    }
    result_print(&r, " spawned=%" PRIu64 " per_thread=%ld threads_per_sec=%.0f%s", spawn,
                 g_per_thread, secs > 0 ? (double)spawn / secs : 0.0, idle);
    return 0;
}
