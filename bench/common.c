/* Shared helpers for the benchmark programs; see common.h. */
#include "common.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

static const char *g_bench = "?"; /* program name, for messages */

/* ---- RNG ----------------------------------------------------------------- */

static unsigned bit_length(uint64_t x)
{
    return x ? 64u - (unsigned)__builtin_clzll(x) : 0u;
}

uint64_t rng_log_range(rng_t *r, uint64_t lo, uint64_t hi)
{
    /* Draw a bit length uniformly, then a value uniformly within it. */
    unsigned b = (unsigned)rng_range(r, bit_length(lo), bit_length(hi));
    uint64_t band_lo = b ? 1ull << (b - 1) : 0;
    uint64_t band_hi = b >= 64 ? UINT64_MAX : (1ull << b) - 1;
    if (band_lo < lo)
        band_lo = lo;
    if (band_hi > hi)
        band_hi = hi;
    return rng_range(r, band_lo, band_hi);
}

/* ---- time ---------------------------------------------------------------- */

double now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void sleep_sec(double s)
{
    struct timespec ts;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* ---- RSS ----------------------------------------------------------------- */

/* Value in kB of the line "key:   123 kB" in a /proc status text. */
static long status_field_kb(const char *text, const char *key)
{
    size_t klen = strlen(key);
    for (const char *line = text; line && *line; line = strchr(line, '\n')) {
        if (*line == '\n')
            line++;
        if (strncmp(line, key, klen) == 0 && line[klen] == ':')
            return strtol(line + klen + 1, NULL, 10);
    }
    return -1;
}

/* Uses open/read and a stack buffer: stdio would call malloc, and RSS is
 * sampled in the middle of benchmark loops. */
void rss_read(long *rss_kb, long *hwm_kb)
{
    rss_read_pid(0, rss_kb, hwm_kb);
}

void rss_read_pid(pid_t pid, long *rss_kb, long *hwm_kb)
{
    char path[64];
    if (pid)
        snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    else
        strcpy(path, "/proc/self/status");
    char buf[8192];
    ssize_t n = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t got;
        while (n < (ssize_t)sizeof buf - 1 &&
               (got = read(fd, buf + n, sizeof buf - 1 - (size_t)n)) > 0)
            n += got;
        close(fd);
    }
    buf[n > 0 ? n : 0] = '\0';
    if (rss_kb)
        *rss_kb = status_field_kb(buf, "VmRSS");
    if (hwm_kb)
        *hwm_kb = status_field_kb(buf, "VmHWM");
}

bool file_contains(FILE *f, const char *what)
{
    char line[4096];
    rewind(f);
    while (fgets(line, sizeof line, f))
        if (strstr(line, what))
            return true;
    return false;
}

long rss_now_kb(void)
{
    long rss;
    rss_read(&rss, NULL);
    return rss;
}

/* ---- allocator detection --------------------------------------------------- */

static bool has_symbol(const char *name)
{
    return dlsym(RTLD_DEFAULT, name) != NULL;
}

/* Each allocator exports a private entry point besides malloc; finding it in
 * the global symbol scope shows that its library is loaded (LD_PRELOAD puts
 * it first, so its malloc is the one in use).  hakmem is checked first. */
const char *detect_allocator(void)
{
    static const char *cached;
    if (cached)
        return cached;
    if (has_symbol("hakmem_malloc"))
        cached = "hakmem";
    else if (has_symbol("mi_malloc"))
        cached = "mimalloc";
    else if (has_symbol("mallctl") || has_symbol("je_mallctl"))
        cached = "jemalloc";
    else if (has_symbol("tc_malloc") || has_symbol("tc_version") ||
             has_symbol("MallocExtension_GetNumericProperty"))
        cached = "tcmalloc";
    else
        cached = "glibc";
    return cached;
}

/* ---- failures, harness memory ---------------------------------------------- */

void bench_fail(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "FAIL bench=%s: ", g_bench);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    /* _exit: the heap may be corrupt, so run no atexit handlers. */
    _exit(1);
}

void *harness_alloc(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        bench_fail("mmap(%zu) for harness memory failed: %s", bytes, strerror(errno));
    return p;
}

void harness_free(void *p, size_t bytes)
{
    if (p)
        munmap(p, bytes);
}

/* ---- pattern fill / verify -------------------------------------------------- */

uint64_t pat_tag(uint64_t a, uint64_t b)
{
    uint64_t x = a * 0x9E3779B97F4A7C15ull + b;
    return splitmix64(&x);
}

/* Which words the pattern uses: the first and last 64 bytes densely, and
 * every `stride`-th offset in between.  The content depends only on the
 * offset, so the regions may overlap harmlessly. */
struct pat_layout {
    size_t head_end;  /* [0, head_end): every word */
    size_t mid_start; /* [mid_start, tail): one word per stride */
    size_t tail;      /* [tail, size): every word */
};

static struct pat_layout pat_layout(size_t size, size_t stride)
{
    struct pat_layout l;
    size_t tail = size > 64 ? ((size - 64) & ~(size_t)7) : 0;
    l.head_end = size < 64 ? size : 64;
    l.mid_start = stride < 64 ? 64 : stride;
    l.tail = tail > l.head_end ? tail : l.head_end;
    return l;
}

static inline void pat_put(unsigned char *b, size_t size, uint64_t tag, size_t off)
{
    uint64_t w = pat_word(tag, off);
    if (off + 8 <= size)
        memcpy(b + off, &w, 8);
    else
        memcpy(b + off, &w, size - off); /* little-endian: the low bytes */
}

static inline bool pat_ok(const unsigned char *b, size_t size, uint64_t tag, size_t off)
{
    uint64_t want = pat_word(tag, off), got = 0;
    if (off + 8 <= size) {
        memcpy(&got, b + off, 8);
    } else {
        memcpy(&got, b + off, size - off);
        want &= (1ull << (8 * (size - off))) - 1;
    }
    return got == want;
}

void pat_fill_stride(void *p, size_t size, uint64_t tag, size_t stride)
{
    unsigned char *b = p;
    if (stride == PAT_DENSE || size <= 128) {
        /* Every word: the common small-block case, kept to a tight loop. */
        size_t off = 0;
        for (; off + 8 <= size; off += 8) {
            uint64_t w = pat_word(tag, off);
            memcpy(b + off, &w, 8);
        }
        if (off < size)
            pat_put(b, size, tag, off);
    } else {
        struct pat_layout l = pat_layout(size, stride);
        for (size_t off = 0; off < l.head_end; off += 8)
            pat_put(b, size, tag, off);
        for (size_t off = l.mid_start; off < l.tail; off += stride)
            pat_put(b, size, tag, off);
        for (size_t off = l.tail; off < size; off += 8)
            pat_put(b, size, tag, off);
    }
    escape(p);
}

size_t pat_find_bad(const void *p, size_t size, uint64_t tag, size_t stride)
{
    const unsigned char *b = p;
    if (stride == PAT_DENSE || size <= 128) {
        size_t off = 0;
        for (; off + 8 <= size; off += 8) {
            uint64_t got;
            memcpy(&got, b + off, 8);
            if (got != pat_word(tag, off))
                return off;
        }
        return off < size && !pat_ok(b, size, tag, off) ? off : (size_t)-1;
    }
    struct pat_layout l = pat_layout(size, stride);
    for (size_t off = 0; off < l.head_end; off += 8)
        if (!pat_ok(b, size, tag, off))
            return off;
    for (size_t off = l.mid_start; off < l.tail; off += stride)
        if (!pat_ok(b, size, tag, off))
            return off;
    for (size_t off = l.tail; off < size; off += 8)
        if (!pat_ok(b, size, tag, off))
            return off;
    return (size_t)-1;
}

void pat_check_stride(const void *p, size_t size, uint64_t tag, size_t stride, const char *what)
{
    size_t bad = pat_find_bad(p, size, tag, stride);
    if (bad != (size_t)-1)
        bench_fail("verify failed [%s]: block %p (size %zu) corrupted at offset %zu"
                   " (expected %016" PRIx64 "): the allocator handed out overlapping"
                   " or still-live memory",
                   what, p, size, bad, pat_word(tag, bad));
}

/* ---- command line ------------------------------------------------------------ */

static void usage(const char *bench, const char *about, const struct bench_args *a,
                  const struct bench_opt *extra, FILE *to)
{
    fprintf(to, "usage: %s [options]\n%s\n\ncommon options:\n", bench, about);
    fprintf(to, "  --ops N        amount of work (default %ld)\n", a->ops);
    if (a->max_threads > 1)
        fprintf(to, "  --threads T    worker threads (default %ld)\n", a->threads);
    fprintf(to, "  --quick        tiny run for smoke tests (well under a second)\n");
    fprintf(to, "  --seed S       RNG seed (default %" PRIu64 ")\n", a->seed);
    if (extra && extra[0].name) {
        fprintf(to, "options of %s:\n", bench);
        for (const struct bench_opt *o = extra; o->name; o++)
            fprintf(to, "  --%-12s %s\n", o->name, o->help);
    }
}

static bool parse_number(const char *s, enum opt_type type, double *out)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s)
        return false;
    if (type == OPT_SIZE && *end) {
        switch (*end++) {
        case 'k': case 'K': v *= 1024.0; break;
        case 'm': case 'M': v *= 1024.0 * 1024.0; break;
        case 'g': case 'G': v *= 1024.0 * 1024.0 * 1024.0; break;
        default: return false;
        }
        if (*end == 'i' || *end == 'B') /* allow KiB, MB, ... */
            end++;
        if (*end == 'B')
            end++;
    }
    *out = v;
    return *end == '\0';
}

/* Stores `val` into the option; returns false if it does not parse. */
static bool set_option(const struct bench_opt *o, const char *val)
{
    double v;
    switch (o->type) {
    case OPT_FLAG:
        *(bool *)o->ptr = true;
        return true;
    case OPT_STRING:
        *(const char **)o->ptr = val;
        return true;
    case OPT_DOUBLE:
        if (!parse_number(val, OPT_DOUBLE, &v))
            return false;
        *(double *)o->ptr = v;
        return true;
    case OPT_LONG:
        if (!parse_number(val, OPT_LONG, &v) || v < 0)
            return false;
        *(long *)o->ptr = (long)v;
        return true;
    case OPT_SIZE:
        if (!parse_number(val, OPT_SIZE, &v) || v < 0)
            return false;
        *(size_t *)o->ptr = (size_t)v;
        return true;
    }
    return false;
}

void bench_set_name(const char *bench)
{
    g_bench = bench;
}

void bench_parse(int argc, char **argv, const char *bench, const char *about,
                 struct bench_args *a, const struct bench_opt *extra)
{
    long seed = (long)a->seed;
    const struct bench_opt common[] = {
        {"ops", OPT_LONG, &a->ops, ""},
        {"threads", OPT_LONG, &a->threads, ""},
        {"quick", OPT_FLAG, &a->quick, ""},
        {"seed", OPT_LONG, &seed, ""},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    int i;
    g_bench = bench;
    for (i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            usage(bench, about, a, extra, stdout);
            exit(0);
        }
        if (strncmp(arg, "--", 2) != 0)
            goto bad;
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const struct bench_opt *o = NULL;
        for (const struct bench_opt *c = common; c->name && !o; c++)
            if (strlen(c->name) == nlen && strncmp(c->name, name, nlen) == 0)
                o = c;
        for (const struct bench_opt *c = extra; c && c->name && !o; c++)
            if (strlen(c->name) == nlen && strncmp(c->name, name, nlen) == 0)
                o = c;
        if (!o)
            goto bad;
        const char *val = eq ? eq + 1 : NULL;
        if (o->type != OPT_FLAG && !val) {
            if (i + 1 >= argc)
                goto bad;
            val = argv[++i];
        }
        if (!set_option(o, val))
            goto bad;
        if (o->ptr == &a->ops)
            a->ops_given = true;
    }
    a->seed = (uint64_t)seed;
    if (a->threads < 1 || a->threads > a->max_threads) {
        fprintf(stderr, "%s: --threads must be between 1 and %ld\n", bench, a->max_threads);
        exit(2);
    }
    if (a->ops < 1) {
        fprintf(stderr, "%s: --ops must be at least 1\n", bench);
        exit(2);
    }
    return;
bad:
    fprintf(stderr, "%s: bad or unknown argument '%s'\n", bench, i < argc ? argv[i] : argv[argc - 1]);
    usage(bench, about, a, extra, stderr);
    exit(2);
}

/* ---- result ------------------------------------------------------------------ */

void result_print(const struct bench_result *r, const char *extra_fmt, ...)
{
    long rss, hwm;
    rss_read(&rss, &hwm);
    const char *alloc = detect_allocator();
    printf("RESULT bench=%s allocator=%s threads=%ld ops=%" PRIu64
           " seconds=%.6f ops_per_sec=%.0f peak_rss_kb=%ld final_rss_kb=%ld",
           g_bench, alloc, r->threads, r->ops, r->seconds,
           r->seconds > 0 ? (double)r->ops / r->seconds : 0.0,
           r->peak_rss_kb ? r->peak_rss_kb : hwm, r->final_rss_kb ? r->final_rss_kb : rss);
    if (strcmp(alloc, "hakmem") == 0) {
        /* Shows that the runner's HAKMEM_ACE setting reached the process. */
        const char *ace = getenv("HAKMEM_ACE");
        printf(" ace=%s", ace && *ace ? ace : "0");
    }
    if (extra_fmt) {
        va_list ap;
        va_start(ap, extra_fmt);
        vprintf(extra_fmt, ap);
        va_end(ap);
    }
    putchar('\n');
    fflush(stdout);
}

/* ---- threads ----------------------------------------------------------------- */

pthread_t thread_start(void *(*fn)(void *), void *arg)
{
    pthread_t t;
    int err = pthread_create(&t, NULL, fn, arg);
    if (err)
        bench_fail("pthread_create: %s", strerror(err));
    return t;
}

void thread_start_detached(void *(*fn)(void *), void *arg)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    int err = pthread_create(&t, &attr, fn, arg);
    pthread_attr_destroy(&attr);
    if (err)
        bench_fail("pthread_create: %s", strerror(err));
}

double run_workers(void *(*fn)(void *), void *workers, size_t stride, unsigned nt,
                   pthread_barrier_t *gate)
{
    pthread_t *t = harness_alloc(nt * sizeof *t);
    for (unsigned i = 0; i < nt; i++)
        t[i] = thread_start(fn, (char *)workers + (size_t)i * stride);
    double t0 = now_sec(); /* before releasing the workers: on a busy
                            * machine main may not run again until they end */
    pthread_barrier_wait(gate);
    for (unsigned i = 0; i < nt; i++)
        thread_join(t[i]);
    double secs = now_sec() - t0;
    harness_free(t, nt * sizeof *t);
    return secs;
}

void thread_join(pthread_t t)
{
    int err = pthread_join(t, NULL);
    if (err)
        bench_fail("pthread_join: %s", strerror(err));
}

/* ---- call times ---------------------------------------------------------- */

static unsigned lat_bucket(uint64_t t)
{
    if (t < LAT_SUB)
        return (unsigned)t;
    unsigned top = 63u - (unsigned)__builtin_clzll(t);           /* >= 4 */
    unsigned sub = (unsigned)(t >> (top - 4)) & (LAT_SUB - 1);
    unsigned b = (top - 3) * LAT_SUB + sub;
    return b < LAT_POWERS * LAT_SUB ? b : LAT_POWERS * LAT_SUB - 1;
}

/* The largest value a bucket holds. */
static uint64_t lat_bucket_top(unsigned b)
{
    if (b < LAT_SUB)
        return b;
    unsigned top = b / LAT_SUB + 3, sub = b % LAT_SUB;
    return ((uint64_t)(LAT_SUB + sub + 1) << (top - 4)) - 1;
}

void lat_init(struct lat_hist *h)
{
    memset(h, 0, sizeof *h);
    uint64_t best = UINT64_MAX;
    for (int i = 0; i < 100000; i++) {
        uint64_t a = __rdtsc();
        uint64_t b = __rdtsc();
        if (b - a < best)
            best = b - a;
    }
    h->overhead = best;
}

void lat_record(struct lat_hist *h, uint64_t from, uint64_t to)
{
    uint64_t t = to - from;
    t = t > h->overhead ? t - h->overhead : 0;
    h->count[lat_bucket(t)]++;
    h->samples++;
    if (t > h->slowest)
        h->slowest = t;
}

uint64_t lat_percentile(const struct lat_hist *h, double q)
{
    uint64_t want = (uint64_t)(q * (double)h->samples), seen = 0;
    for (unsigned b = 0; b < LAT_POWERS * LAT_SUB; b++) {
        seen += h->count[b];
        if (seen > want)
            return lat_bucket_top(b) < h->slowest ? lat_bucket_top(b) : h->slowest;
    }
    return h->slowest;
}

void lat_replace(struct lat_hist *h, struct lat_slot *s, size_t size, uint64_t tag,
                 const char *what)
{
    if (s->p) {
        pat_check(s->p, s->size, s->tag, what);
        uint64_t a = __rdtsc();
        free(s->p);
        lat_record(h, a, __rdtsc());
    }
    s->size = size;
    s->tag = tag;
    uint64_t a = __rdtsc();
    s->p = bmalloc(size);
    lat_record(h, a, __rdtsc());
    pat_fill(s->p, size, tag);
}
