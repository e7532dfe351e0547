/* realloc_grow: buffers grown by realloc, like strings and vectors that
 * are appended to.
 *
 * --buffers buffers (default 4) grow in turn, so a buffer's neighbour is
 * often another live buffer and in-place growth is not free.  Each step
 * adds a random 1..max(64, size/4) bytes; a buffer that reaches --max
 * (default 1 MiB) is verified, freed and starts again at 16..64 bytes.
 * After every realloc the old content is checked (densely near the old
 * end, where short copies show, sampled elsewhere) and the new bytes are
 * filled.  --ops = realloc calls.  Extra keys: how many reallocs moved the
 * block. */
#include "common.h"

#include <stdio.h>
#include <string.h>

struct buffer {
    unsigned char *p;
    size_t size;
    uint64_t tag;
};

static long g_buffers = 4;
static size_t g_max = 1024 * 1024;

/* Every whole 8-byte word in [lo, hi) gets its pattern word; content is a
 * function of the offset, so it is the same whichever realloc wrote it. */
static void fill_range(unsigned char *p, size_t lo, size_t hi, uint64_t tag)
{
    for (size_t off = lo & ~(size_t)7; off + 8 <= hi; off += 8) {
        uint64_t w = pat_word(tag, off);
        memcpy(p + off, &w, 8);
    }
}

static void check_word(const unsigned char *p, size_t size, size_t off, uint64_t tag)
{
    uint64_t got;
    memcpy(&got, p + off, 8);
    if (got != pat_word(tag, off))
        bench_fail("realloc_grow: block %p (size %zu) lost its content at offset %zu",
                   (const void *)p, size, off);
}

/* Checks the whole words of [0, size): the last 64 bytes densely, the rest
 * at a power-of-two stride that keeps it to about 256 words. */
static void check_content(const unsigned char *p, size_t size, uint64_t tag)
{
    size_t words_end = size & ~(size_t)7;
    size_t dense_from = words_end > 64 ? words_end - 64 : 0;
    size_t stride = 64;
    while (size / stride > 256)
        stride *= 2;
    for (size_t off = 0; off < dense_from; off += stride)
        check_word(p, size, off, tag);
    for (size_t off = dense_from; off < words_end; off += 8)
        check_word(p, size, off, tag);
}

static void buffer_start(struct buffer *b, rng_t *rng, uint64_t tag)
{
    b->size = (size_t)rng_range(rng, 16, 64);
    b->tag = tag;
    b->p = bmalloc(b->size);
    fill_range(b->p, 0, b->size, tag);
}

/* One realloc step; returns true if the block moved. */
static bool buffer_grow(struct buffer *b, rng_t *rng)
{
    size_t step_max = b->size / 4 > 64 ? b->size / 4 : 64;
    size_t new_size = b->size + (size_t)rng_range(rng, 1, step_max);
    unsigned char *old = b->p;
    unsigned char *p = realloc(old, new_size);
    if (p == NULL)
        bench_fail("realloc(%p, %zu) returned NULL", (void *)old, new_size);
    check_content(p, b->size, b->tag);
    fill_range(p, b->size, new_size, b->tag);
    b->p = p;
    b->size = new_size;
    return p != old;
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 500000, .threads = 1, .max_threads = 1, .seed = 42};
    const struct bench_opt opts[] = {
        {"buffers", OPT_LONG, &g_buffers, "buffers growing in turn (default 4)"},
        {"max", OPT_SIZE, &g_max, "size at which a buffer starts over (default 1M)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "realloc_grow",
                "Buffers grown by realloc from 16 B to ~1 MiB, content verified.\n"
                "--ops = realloc calls.",
                &a, opts);
    bench_quick_ops(&a, 20000);
    if (g_buffers < 1 || g_max < 128)
        bench_fail("need --buffers >= 1 and --max >= 128");

    size_t nb = (size_t)g_buffers;
    struct buffer *bufs = harness_alloc(nb * sizeof *bufs);
    rng_t rng;
    rng_seed(&rng, a.seed, 0);
    uint64_t tag = a.seed, moves = 0, restarts = 0;

    double t0 = now_sec();
    for (size_t i = 0; i < nb; i++)
        buffer_start(&bufs[i], &rng, tag++);
    for (uint64_t i = 0; i < (uint64_t)a.ops; i++) {
        struct buffer *b = &bufs[i % nb];
        moves += buffer_grow(b, &rng);
        if (b->size >= g_max) {
            check_content(b->p, b->size, b->tag);
            free(b->p);
            buffer_start(b, &rng, tag++);
            restarts++;
        }
    }
    for (size_t i = 0; i < nb; i++) {
        check_content(bufs[i].p, bufs[i].size, bufs[i].tag);
        free(bufs[i].p);
    }
    double secs = now_sec() - t0;
    harness_free(bufs, nb * sizeof *bufs);

    struct bench_result r = {.threads = 1, .ops = (uint64_t)a.ops, .seconds = secs};
    result_print(&r, " buffers=%zu max=%zu moves=%" PRIu64 " restarts=%" PRIu64, nb, g_max,
                 moves, restarts);
    return 0;
}
