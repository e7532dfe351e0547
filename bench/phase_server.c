/* phase_server: a long-running server whose workload changes over time.
 *
 * Three phases with different size mixes:
 *   1 small   16..256 B (log-uniform)     -- e.g. request headers, nodes
 *   2 medium  1..8 KiB (uniform)          -- e.g. buffers
 *   3 mixed   16 B..64 KiB (log-uniform)  -- everything at once
 * In each phase the live set grows to --target bytes (default 64 MiB; 3/4
 * of ops allocate, 1/4 free), then --ops random replacements run at that
 * size, then it shrinks to 1% of the target (3/4 free).  The survivors of
 * a phase stay live into the next one, pinning memory as long-lived
 * objects do.  After the last phase the process idles for --idle seconds,
 * sampling RSS every 100 ms: an allocator that returns freed memory to the
 * OS (at once or in the background) shows a low idle_rss_kb.
 *
 * RSS is also sampled every ~20 ms while working (cheap: open/read of
 * /proc/self/status); --rss-trace FILE writes all samples as lines
 * "t_ms rss_kb phase".
 * --ops = steady-state replacements per phase (the grow and shrink ops come
 * on top); the RESULT ops counts every malloc. */
#include "common.h"

#include <stdio.h>
#include <string.h>

struct block {
    void *p;
    uint32_t size;
    uint32_t id; /* tag = pat_tag(seed, id): 16-byte entries keep the
                  * harness's own RSS small next to a 64 MiB live set */
};

enum dist { LOG_UNIFORM, UNIFORM };

struct phase {
    const char *name;
    enum dist dist;
    size_t min, max;
};

static const struct phase PHASES[] = {
    {"small", LOG_UNIFORM, 16, 256},
    {"medium", UNIFORM, 1024, 8192},
    {"mixed", LOG_UNIFORM, 16, 65536},
};
#define NPHASES (sizeof PHASES / sizeof PHASES[0])

struct sample {
    uint32_t t_ms;
    uint32_t rss_kb;
    const char *phase;
};

#define MAX_SAMPLES 65536

/* All the state of one run, kept together so helpers stay short. */
struct server {
    struct block *live;
    size_t n_live, cap;
    size_t live_bytes;
    uint32_t next_id;
    uint64_t seed;
    uint64_t mallocs; /* in the current phase */
    rng_t rng;
    const struct phase *phase;
    /* RSS sampling */
    struct sample *samples;
    size_t n_samples;
    double t_start, next_sample;
    const char *label;
};

static size_t g_target = 64u << 20;
static double g_idle = 2.0;
static const char *g_trace = NULL;

static void sample_rss(struct server *s, double now)
{
    if (s->n_samples == MAX_SAMPLES)
        return;
    struct sample *x = &s->samples[s->n_samples++];
    x->t_ms = (uint32_t)((now - s->t_start) * 1000.0);
    x->rss_kb = (uint32_t)rss_now_kb();
    x->phase = s->label;
}

/* Called once per op; looks at the clock every 1024 ops only. */
static inline void maybe_sample(struct server *s, uint64_t op)
{
    if ((op & 1023) != 0)
        return;
    double now = now_sec();
    if (now >= s->next_sample) {
        sample_rss(s, now);
        s->next_sample = now + 0.020;
    }
}

static void add_block(struct server *s)
{
    if (s->n_live == s->cap)
        bench_fail("live set overflow (%zu blocks)", s->cap);
    const struct phase *ph = s->phase;
    size_t size = ph->dist == UNIFORM ? (size_t)rng_range(&s->rng, ph->min, ph->max)
                                      : (size_t)rng_log_range(&s->rng, ph->min, ph->max);
    struct block *b = &s->live[s->n_live++];
    b->size = (uint32_t)size;
    b->id = s->next_id++;
    b->p = bmalloc(size);
    pat_fill(b->p, size, pat_tag(s->seed, b->id));
    s->live_bytes += size;
    s->mallocs++;
}

/* Frees a random live block; the last one takes its place. */
static void remove_block(struct server *s, const char *what)
{
    size_t i = (size_t)rng_range(&s->rng, 0, s->n_live - 1);
    struct block *b = &s->live[i];
    pat_check(b->p, b->size, pat_tag(s->seed, b->id), what);
    free(b->p);
    s->live_bytes -= b->size;
    *b = s->live[--s->n_live];
}

/* Runs one phase; returns its malloc count per second. */
static double run_phase(struct server *s, const struct phase *ph, uint64_t steady_ops)
{
    s->phase = ph;
    s->label = ph->name;
    s->mallocs = 0;
    uint64_t op = 0;
    double t0 = now_sec();
    while (s->live_bytes < g_target) { /* grow: 3 of 4 ops allocate */
        if (s->n_live == 0 || rng_range(&s->rng, 0, 3) != 0)
            add_block(s);
        else
            remove_block(s, "phase_server (grow)");
        maybe_sample(s, ++op);
    }
    for (uint64_t i = 0; i < steady_ops; i++) { /* steady: replace */
        remove_block(s, "phase_server (steady)");
        add_block(s);
        maybe_sample(s, ++op);
    }
    while (s->live_bytes > g_target / 100 && s->n_live > 0) { /* shrink */
        if (rng_range(&s->rng, 0, 3) != 0)
            remove_block(s, "phase_server (shrink)");
        else
            add_block(s);
        maybe_sample(s, ++op);
    }
    double secs = now_sec() - t0;
    return secs > 0 ? (double)s->mallocs / secs : 0.0;
}

/* Sleeps in 100 ms steps, sampling RSS after each; returns the last RSS. */
static long idle(struct server *s)
{
    s->label = "idle";
    double end = now_sec() + g_idle;
    long rss = rss_now_kb();
    for (double now = now_sec(); now < end; now = now_sec()) {
        sleep_sec(end - now < 0.1 ? end - now : 0.1);
        now = now_sec();
        sample_rss(s, now);
        rss = (long)s->samples[s->n_samples - 1].rss_kb;
    }
    return rss;
}

static void write_trace(const struct server *s)
{
    FILE *f = fopen(g_trace, "w");
    if (!f)
        bench_fail("cannot write --rss-trace file %s", g_trace);
    fprintf(f, "# t_ms rss_kb phase (allocator=%s)\n", detect_allocator());
    for (size_t i = 0; i < s->n_samples; i++)
        fprintf(f, "%u %u %s\n", s->samples[i].t_ms, s->samples[i].rss_kb, s->samples[i].phase);
    fclose(f);
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 150000, .threads = 1, .max_threads = 1, .seed = 42};
    const struct bench_opt opts[] = {
        {"target", OPT_SIZE, &g_target, "live-set peak in bytes (default 64M)"},
        {"idle", OPT_DOUBLE, &g_idle, "idle seconds at the end (default 2)"},
        {"rss-trace", OPT_STRING, &g_trace, "FILE: write RSS samples \"t_ms rss_kb phase\""},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "phase_server",
                "Phases of changing size mix; live set grows to --target, shrinks\n"
                "to 1%, then the process idles. --ops = steady replacements per phase.",
                &a, opts);
    if (a.quick) { /* flags given explicitly still win */
        bench_quick_ops(&a, 20000);
        if (g_target == (64u << 20))
            g_target = 4u << 20;
        if (g_idle == 2.0)
            g_idle = 0.2;
    }
    if (g_target < 4096 || g_idle < 0)
        bench_fail("need --target >= 4096 and --idle >= 0");

    struct server s = {.seed = a.seed};
    rng_seed(&s.rng, a.seed, 0);
    s.cap = g_target / 16 + 1024; /* enough even if every block were 16 B */
    s.live = harness_alloc(s.cap * sizeof *s.live);
    s.samples = harness_alloc(MAX_SAMPLES * sizeof *s.samples);
    s.t_start = now_sec();
    s.label = "start";
    sample_rss(&s, s.t_start);

    double rate[NPHASES];
    long end_rss[NPHASES];
    uint64_t total = 0;
    double t0 = now_sec();
    for (size_t i = 0; i < NPHASES; i++) {
        rate[i] = run_phase(&s, &PHASES[i], (uint64_t)a.ops);
        total += s.mallocs;
        end_rss[i] = rss_now_kb();
    }
    double secs = now_sec() - t0;
    long idle_start = rss_now_kb();
    long idle_rss = idle(&s);

    s.label = "teardown";
    while (s.n_live > 0)
        remove_block(&s, "phase_server (final)");
    sample_rss(&s, now_sec());
    if (g_trace)
        write_trace(&s);
    harness_free(s.samples, MAX_SAMPLES * sizeof *s.samples);
    harness_free(s.live, s.cap * sizeof *s.live);

    struct bench_result r = {.threads = 1, .ops = total, .seconds = secs};
    result_print(&r,
                 " target=%zu idle_s=%.1f phase1_ops_per_sec=%.0f phase2_ops_per_sec=%.0f"
                 " phase3_ops_per_sec=%.0f phase1_end_rss_kb=%ld phase2_end_rss_kb=%ld"
                 " phase3_end_rss_kb=%ld idle_start_rss_kb=%ld idle_rss_kb=%ld",
                 g_target, g_idle, rate[0], rate[1], rate[2], end_rss[0], end_rss[1],
                 end_rss[2], idle_start, idle_rss);
    return 0;
}
