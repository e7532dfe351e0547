/* xmalloc: producer/consumer, every free is cross-thread.
 *
 * Producer threads malloc blocks (log-uniform 16..512 B by default), fill
 * them and pass them in batches through a bounded queue to consumer
 * threads, which verify and free them.  No block is freed by the thread
 * that allocated it, so this measures the allocator's remote-free path and
 * how fast freed memory flows back to the producers.
 *
 * The queue is a plain mutex + two condition variables over a ring of
 * batches; batching (64 blocks per hand-off) keeps the lock out of the
 * measurement without making it lock-free.
 * --threads T = total threads: T/2 producers, the rest consumers (T >= 2).
 * --ops = total blocks passed (one malloc + one remote free each). */
#include "common.h"

#include <stdio.h>

#define BATCH 64
#define QUEUE_BATCHES 32

struct item {
    void *p;
    size_t size;
    uint64_t tag;
};

struct batch {
    unsigned n;
    struct item items[BATCH];
};

struct queue {
    pthread_mutex_t lock;
    pthread_cond_t not_full, not_empty;
    struct batch ring[QUEUE_BATCHES];
    unsigned head, count;    /* ring[head] is the oldest full batch */
    unsigned producers_left; /* consumers stop when 0 and empty */
};

struct worker {
    pthread_t thread;
    struct queue *q;
    unsigned id;
    uint64_t ops;   /* producers: blocks to make; consumers: blocks freed */
    uint64_t seed;
};

static size_t g_min = 16;
static size_t g_max = 512;

static void queue_push(struct queue *q, const struct batch *b)
{
    pthread_mutex_lock(&q->lock);
    while (q->count == QUEUE_BATCHES)
        pthread_cond_wait(&q->not_full, &q->lock);
    q->ring[(q->head + q->count) % QUEUE_BATCHES] = *b;
    q->count++;
    pthread_cond_signal(&q->not_empty);
    pthread_mutex_unlock(&q->lock);
}

/* Copies the oldest batch into *b; returns false once all producers are
 * done and the queue is drained. */
static bool queue_pop(struct queue *q, struct batch *b)
{
    pthread_mutex_lock(&q->lock);
    while (q->count == 0 && q->producers_left > 0)
        pthread_cond_wait(&q->not_empty, &q->lock);
    bool got = q->count > 0;
    if (got) {
        *b = q->ring[q->head];
        q->head = (q->head + 1) % QUEUE_BATCHES;
        q->count--;
        pthread_cond_signal(&q->not_full);
    }
    pthread_mutex_unlock(&q->lock);
    return got;
}

static void producer_done(struct queue *q)
{
    pthread_mutex_lock(&q->lock);
    if (--q->producers_left == 0)
        pthread_cond_broadcast(&q->not_empty); /* wake consumers to exit */
    pthread_mutex_unlock(&q->lock);
}

static void *producer_main(void *arg)
{
    struct worker *w = arg;
    struct batch b = {.n = 0};
    rng_t rng;
    rng_seed(&rng, w->seed, w->id + 1);
    uint64_t tag = w->seed + ((uint64_t)w->id << 40);
    for (uint64_t i = 0; i < w->ops; i++) {
        struct item *it = &b.items[b.n++];
        it->size = (size_t)rng_log_range(&rng, g_min, g_max);
        it->tag = tag++;
        it->p = bmalloc(it->size);
        pat_fill(it->p, it->size, it->tag);
        if (b.n == BATCH) {
            queue_push(w->q, &b);
            b.n = 0;
        }
    }
    if (b.n > 0)
        queue_push(w->q, &b);
    producer_done(w->q);
    return NULL;
}

static void *consumer_main(void *arg)
{
    struct worker *w = arg;
    struct batch b;
    while (queue_pop(w->q, &b)) {
        for (unsigned i = 0; i < b.n; i++) {
            pat_check(b.items[i].p, b.items[i].size, b.items[i].tag, "xmalloc");
            free(b.items[i].p);
        }
        w->ops += b.n;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 3000000, .threads = 2, .max_threads = 256, .seed = 42};
    const struct bench_opt opts[] = {
        {"min", OPT_SIZE, &g_min, "smallest block (default 16)"},
        {"max", OPT_SIZE, &g_max, "largest block (default 512)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "xmalloc",
                "Producers malloc, consumers free (all frees cross-thread).\n"
                "--threads T: T/2 producers + the rest consumers. --ops = blocks.",
                &a, opts);
    bench_quick_ops(&a, 100000);
    if (a.threads < 2)
        bench_fail("--threads must be at least 2 (a producer and a consumer)");
    if (g_min < 1 || g_max < g_min)
        bench_fail("need 1 <= --min <= --max");

    unsigned np = (unsigned)a.threads / 2, nc = (unsigned)a.threads - np;
    struct queue *q = harness_alloc(sizeof *q);
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->not_full, NULL);
    pthread_cond_init(&q->not_empty, NULL);
    q->producers_left = np;
    struct worker *w = harness_alloc((np + nc) * sizeof *w);

    double t0 = now_sec();
    for (unsigned i = 0; i < np + nc; i++) {
        bool prod = i < np;
        w[i] = (struct worker){.q = q, .id = i, .seed = a.seed,
                               .ops = prod ? (uint64_t)a.ops / np : 0};
        w[i].thread = thread_start(prod ? producer_main : consumer_main, &w[i]);
    }
    uint64_t freed = 0;
    for (unsigned i = 0; i < np + nc; i++) {
        thread_join(w[i].thread);
        if (i >= np)
            freed += w[i].ops;
    }
    double secs = now_sec() - t0;

    uint64_t made = (uint64_t)a.ops / np * np;
    if (freed != made)
        bench_fail("consumers freed %" PRIu64 " blocks, producers made %" PRIu64, freed, made);
    harness_free(w, (np + nc) * sizeof *w);
    harness_free(q, sizeof *q);

    struct bench_result r = {.threads = np + nc, .ops = freed, .seconds = secs};
    result_print(&r, " producers=%u consumers=%u min=%zu max=%zu", np, nc, g_min, g_max);
    return 0;
}
