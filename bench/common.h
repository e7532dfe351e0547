/* Shared helpers for the hakmem benchmark programs.
 *
 * Everything a benchmark needs besides its own loop lives here, so that all
 * programs measure, verify and report the same way:
 *   - a fixed-seed RNG (splitmix64 to seed, xorshift64* to draw),
 *   - a monotonic clock,
 *   - RSS reading from /proc/self/status (VmRSS, VmHWM) without malloc,
 *   - detection of the malloc implementation actually in use,
 *   - pattern fill/verify of blocks (overlapping blocks make the run fail),
 *   - harness memory that does not come from the allocator under test,
 *   - command-line parsing with the common flags, and the RESULT line.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>

/* ---- RNG --------------------------------------------------------------- */

typedef struct {
    uint64_t s;
} rng_t;

/* splitmix64: turns any seed (even 0 or 1, 2, 3...) into well-mixed state. */
static inline uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Seeds one generator; `stream` separates threads that share a seed. */
static inline void rng_seed(rng_t *r, uint64_t seed, uint64_t stream)
{
    uint64_t x = seed ^ (stream * 0xD1B54A32D192ED03ull);
    r->s = splitmix64(&x);
    if (r->s == 0)
        r->s = 1; /* xorshift must never hold 0 */
}

/* xorshift64*: a few cycles per draw, so the RNG does not dominate. */
static inline uint64_t rng_next(rng_t *r)
{
    uint64_t x = r->s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

__extension__ typedef unsigned __int128 bench_u128;

/* Uniform in [lo, hi] (inclusive), by multiply-high: no division. */
static inline uint64_t rng_range(rng_t *r, uint64_t lo, uint64_t hi)
{
    bench_u128 m = (bench_u128)rng_next(r) * (hi - lo + 1);
    return lo + (uint64_t)(m >> 64);
}

/* Log-uniform in [lo, hi]: as many draws per power of two, so that small
 * sizes dominate by count as they do in real programs.  It draws a bit
 * length uniformly, so a hi that is a power of two is a band of its own:
 * 16..65536 gives 13 bands, and 1 draw in 13 is exactly 64 KiB (the rows'
 * workloads are defined with it, and every allocator sees the same). */
uint64_t rng_log_range(rng_t *r, uint64_t lo, uint64_t hi);

/* ---- time, RSS, allocator ---------------------------------------------- */

double now_sec(void);
void sleep_sec(double s);

/* Current (VmRSS) and peak (VmHWM) resident set in KiB; -1 if unknown. */
void rss_read(long *rss_kb, long *hwm_kb);
/* The same of another process (pid 0: this one). */
void rss_read_pid(pid_t pid, long *rss_kb, long *hwm_kb);
long rss_now_kb(void);
/* Whether a line of f (read from its start) contains `what`. */
bool file_contains(FILE *f, const char *what);

/* Name of the malloc in use: hakmem, mimalloc, jemalloc, tcmalloc, glibc. */
const char *detect_allocator(void);

/* ---- failures and checked allocation ------------------------------------ */

/* Prints "FAIL bench=NAME: message" to stderr and exits with status 1. */
__attribute__((noreturn, format(printf, 1, 2))) void bench_fail(const char *fmt, ...);

static inline void *bmalloc(size_t n)
{
    void *p = malloc(n);
    if (p == NULL)
        bench_fail("malloc(%zu) returned NULL", n);
    return p;
}

/* Memory for the harness itself (slot arrays, queues, traces): from mmap,
 * so the allocator under test sees only the benchmark's own traffic. */
void *harness_alloc(size_t bytes);
void harness_free(void *p, size_t bytes);

/* ---- pattern fill / verify ----------------------------------------------
 *
 * A block's content is a function of (tag, offset): the 8-byte word at
 * offset o is tag ^ (o * golden), the last word cut to the block's end.
 * Each allocation gets its own tag, so two live blocks that share bytes
 * cannot both verify: whichever was written first is overwritten.
 *
 * Which words are written (the stride):
 *   PAT_DENSE  every word (the default for blocks of at most 256 bytes);
 *   64         the first and last 64 bytes of the block plus one word per
 *              64-byte line (default up to 4 KiB): any overlap of at least
 *              64 bytes is caught, and every line of the block is touched;
 *   4096       head, tail and one word per page (default above 4 KiB):
 *              every page is touched, so RSS is real, at a fraction of a
 *              memset's cost; same-start and head/tail overlaps are caught.
 * A stride passed explicitly must be 8 or a multiple of 64. */
#define PAT_DENSE 8u

uint64_t pat_tag(uint64_t a, uint64_t b);

static inline size_t pat_default_stride(size_t size)
{
    if (size <= 256)
        return PAT_DENSE;
    return size <= 4096 ? 64 : 4096;
}

void pat_fill_stride(void *p, size_t size, uint64_t tag, size_t stride);
/* Returns the offset of the first bad word, or (size_t)-1 if all match. */
size_t pat_find_bad(const void *p, size_t size, uint64_t tag, size_t stride);
/* Verifies; on a mismatch fails the run naming `what` and the offset. */
void pat_check_stride(const void *p, size_t size, uint64_t tag, size_t stride,
                      const char *what);

static inline void pat_fill(void *p, size_t size, uint64_t tag)
{
    pat_fill_stride(p, size, tag, pat_default_stride(size));
}

static inline void pat_check(const void *p, size_t size, uint64_t tag, const char *what)
{
    pat_check_stride(p, size, tag, pat_default_stride(size), what);
}

/* The word the pattern puts at offset `off` (a multiple of 8). */
static inline uint64_t pat_word(uint64_t tag, size_t off)
{
    return tag ^ ((uint64_t)off * 0x9E3779B97F4A7C15ull);
}

/* Keeps the compiler from proving a block unused and deleting the
 * malloc/free pair around it. */
static inline void escape(void *p)
{
    __asm__ volatile("" : : "g"(p) : "memory");
}

/* ---- command line -------------------------------------------------------- */

enum opt_type {
    OPT_LONG,   /* integer, accepts 2e6 */
    OPT_SIZE,   /* byte count, accepts K/M/G suffixes (powers of 1024) */
    OPT_DOUBLE, /* floating point */
    OPT_STRING, /* const char * */
    OPT_FLAG,   /* bool, set to true when present */
};

struct bench_opt {
    const char *name; /* without the leading "--" */
    enum opt_type type;
    void *ptr;        /* long *, size_t *, double *, const char **, bool * */
    const char *help;
};

/* Flags every program takes.  The program stores its defaults here before
 * calling bench_parse(); --ops sets ops and ops_given. */
struct bench_args {
    long ops;         /* --ops N: amount of work (see each program's help) */
    long threads;     /* --threads T */
    long max_threads; /* 1 for single-threaded programs */
    bool quick;       /* --quick: tiny run for smoke tests */
    bool ops_given;
    uint64_t seed;    /* --seed S */
};

/* Parses argv; prints usage and exits 0 on --help, exits 2 on errors.
 * `extra` is an array ending with a {NULL} entry (or NULL). */
/* The name messages and the RESULT line give, for a program that parses
 * its own options (program.c). */
void bench_set_name(const char *bench);

void bench_parse(int argc, char **argv, const char *bench, const char *about,
                 struct bench_args *a, const struct bench_opt *extra);

/* Applies the --quick amount of work unless --ops was given. */
static inline void bench_quick_ops(struct bench_args *a, long quick_ops)
{
    if (a->quick && !a->ops_given)
        a->ops = quick_ops;
}

/* ---- result -------------------------------------------------------------- */

struct bench_result {
    long threads;
    uint64_t ops;
    double seconds;
    /* Measured by the bench (before an idle period: the kernel's VmHWM
     * may fall with RSS as memory goes back); 0: read when printed. */
    long final_rss_kb, peak_rss_kb;
};

/* Prints the one RESULT line:
 *   RESULT bench=B allocator=A threads=T ops=N seconds=S ops_per_sec=R
 *          peak_rss_kb=H final_rss_kb=F [extra key=value pairs]
 * `extra_fmt` (may be NULL) adds program-specific " key=value" pairs. */
__attribute__((format(printf, 2, 3))) void result_print(const struct bench_result *r,
                                                        const char *extra_fmt, ...);

/* ---- call times ---------------------------------------------------------- */

/* Times of single calls, read with the TSC around each, in a histogram of
 * 16 buckets per power of two (at most 6% above the true value). */
#define LAT_SUB 16
#define LAT_POWERS 48
struct lat_hist {
    uint64_t count[LAT_POWERS * LAT_SUB];
    uint64_t samples, slowest;
    uint64_t overhead;          /* ticks of two back-to-back TSC reads */
};

/* Zeroes h and measures the cost of reading the TSC twice. */
void lat_init(struct lat_hist *h);
/* Records one call that ran from TSC `from` to `to`, less the overhead. */
void lat_record(struct lat_hist *h, uint64_t from, uint64_t to);
/* The q-quantile (0..1) of the recorded times, in ticks. */
uint64_t lat_percentile(const struct lat_hist *h, double q);

/* A slot of a ring whose blocks are replaced at random, each call timed. */
struct lat_slot {
    void *p;
    size_t size;
    uint64_t tag;
};

/* Verifies and frees the slot's block (if any), then puts a new block of
 * `size` there, filled with `tag`'s pattern; both calls go into h. */
void lat_replace(struct lat_hist *h, struct lat_slot *s, size_t size, uint64_t tag,
                 const char *what);

/* ---- threads ------------------------------------------------------------ */

/* Starts fn on each of nt workers (an array with `stride` bytes a worker),
 * releases them together through `gate` (a barrier of nt + 1 that each
 * worker waits on first), joins them all, and returns the seconds from the
 * release to the last join. */
double run_workers(void *(*fn)(void *), void *workers, size_t stride, unsigned nt,
                   pthread_barrier_t *gate);

/* pthread_create / pthread_join that fail the run instead of returning. */
pthread_t thread_start(void *(*fn)(void *), void *arg);
void thread_start_detached(void *(*fn)(void *), void *arg);
void thread_join(pthread_t t);

#endif
