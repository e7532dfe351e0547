/* acectl: inspect and steer what a running hakmem process has learned.
 *
 * It reads and writes the shared region that the process's ACE thread keeps
 * at /dev/shm/hakmem.<pid> (layout and protocols: include/hakmem_region.h)
 * and links nothing of hakmem.  See `acectl --help` and docs/acectl.md. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "hakmem_region.h"

#define ACECTL_VERSION "1"

enum exit_code {
    EXIT_OK = 0,
    EXIT_USAGE = 1,
    EXIT_NO_PROCESS = 2,
    EXIT_NO_REGION = 3,
    EXIT_PERMISSION = 4,
    EXIT_LAYOUT = 5,
    EXIT_REFUSED = 6,
    EXIT_TIMEOUT = 7,
};

#define MAX_CLASSES       1024        /* a region claiming more is corrupt */
#define ANSWER_WAIT_MS    2000        /* how long a request waits for its ack */
#define TRIM_WAIT_MS      30000       /* and a trim the process took, for its end */
#define LOCK_WAIT_MS      2000        /* and for another acectl's request */
#define SNAPSHOT_WAIT_MS  1000        /* a writer never holds the seqlock that long */
#define CREATE_WAIT_MS    250         /* a region whose magic is not written yet */
#define STALE_MS          5000        /* a snapshot older than this gets a warning */

static const char help_text[] =
"NAME\n"
"    acectl - inspect and steer what a running hakmem process has learned\n"
"\n"
"SYNOPSIS\n"
"    acectl list [--json]\n"
"    acectl show PID [--json] [--all]\n"
"    acectl watch PID [--interval S] [--count N] [--all]\n"
"    acectl freeze PID\n"
"    acectl unfreeze PID\n"
"    acectl reset PID [CLASS]\n"
"    acectl pin PID CLASS COUNT\n"
"    acectl trim PID\n"
"    acectl --help | --version\n"
"\n"
"DESCRIPTION\n"
"    A process running under hakmem with HAKMEM_ACE=1 has a learning thread\n"
"    (ACE) that tunes each size class's refill count: how many blocks a\n"
"    thread cache takes from the shared heap at once.  The thread publishes\n"
"    what it knows to " HAKMEM_REGION_DIR "/" HAKMEM_REGION_PREFIX "PID (mode 0600, at most every\n"
"    100 ms and at least every second) and answers requests written there.\n"
"    acectl reads that snapshot and sends those requests.  Only processes of\n"
"    your own uid can be inspected or steered, root included.\n"
"\n"
"COMMANDS\n"
"    list      Processes of this user with a hakmem region: pid, command,\n"
"              learning state, pinned and active classes, bytes mapped and\n"
"              the snapshot's age.  Regions left by processes that died\n"
"              without exiting normally are removed (and reported).\n"
"    show      One snapshot as a table: per class the block size, the refill\n"
"              count now, its default, min and max, refills, ACE events,\n"
"              dropped events, blocks cached in thread caches and whether\n"
"              it is pinned; then totals.  Classes never used are left out\n"
"              unless --all is given (--json always lists every class).\n"
"    watch     show, again every S seconds (default 1), with each column's\n"
"              change since the previous sample (refills and events per\n"
"              second).  Stops after N samples, or when the process exits.\n"
"    freeze    Stop learning: refill counts stay as they are (the ACE thread\n"
"              still drains its events).  pin and reset still work.\n"
"    unfreeze  Resume learning.\n"
"    reset     Set CLASS (default: every class) back to its default count\n"
"              and unpin it.  Learning, unless frozen, goes on from there.\n"
"    pin       Fix CLASS's count at COUNT, which must be within the class's\n"
"              [min, max]; learning leaves a pinned class alone until reset.\n"
"    trim      Give free memory back to the OS now: the ACE thread runs\n"
"              malloc_trim(0) for the process (every thread's stashes and\n"
"              the free pages of every heap; not other threads' bins), and\n"
"              acectl prints the process's resident memory before and\n"
"              after.  Waits up to 30 s once the process took it.\n"
"\n"
"    CLASS is a class index (0, 1, ...) or a size in bytes with a B suffix\n"
"    (64B): the class that malloc of that size uses.  Requests wait up to\n"
"    2 s for the process's answer: applied, or refused with a reason\n"
"    (no such class, count out of bounds, malformed).  A refused request\n"
"    changes nothing; the process counts it (requests_refused).\n"
"\n"
"OPTIONS\n"
"    --json        Machine-readable output (show, list).\n"
"    --all         Every class, used or not (show, watch).\n"
"    --interval S  Seconds between samples for watch (0.1 to 3600).\n"
"    --count N     Samples for watch (default: until the process exits).\n"
"    -h, --help    This text.\n"
"    --version     acectl's version and the region layout version it reads.\n"
"\n"
"EXIT STATUS\n"
"    0   Success.\n"
"    1   Bad arguments or usage.\n"
"    2   No such process (also: its region is stale, the process is gone).\n"
"    3   The process has no hakmem region: not running hakmem, HAKMEM_ACE\n"
"        is not 1, or its ACE thread has had no refill report yet, or its\n"
"        first came less than half a second ago.\n"
"    4   Permission denied: the region belongs to another user, is\n"
"        accessible by others, or is a symlink or not a regular file.\n"
"    5   Incompatible layout version, bad magic, or a truncated region.\n"
"    6   The process refused the request.\n"
"    7   Timed out waiting for the process (stopped, or its ACE thread busy).\n"
"\n"
"FILES\n"
"    " HAKMEM_REGION_DIR "/" HAKMEM_REGION_PREFIX "PID   the region of process PID.\n"
"\n"
"EXAMPLES\n"
"    acectl list\n"
"    acectl show 4242\n"
"    acectl show --json 4242 | jq '.classes[] | select(.refills > 0)'\n"
"    acectl watch 4242 --interval 0.5 --count 10\n"
"    acectl pin 4242 64B 128 && acectl freeze 4242\n"
"    acectl trim 4242\n"
"\n"
"SEE ALSO\n"
"    docs/acectl.md in the hakmem sources.\n";

/* ---- errors ------------------------------------------------------------ */

static int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("acectl: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return code;
}

static int usage(const char *why)
{
    fail(EXIT_USAGE, "%s", why);
    fputs("usage: acectl list|show|watch|freeze|unfreeze|reset|pin|trim ... (acectl --help)\n",
          stderr);
    return EXIT_USAGE;
}

/* The region is mapped at its size when opened; if someone truncates the
 * file meanwhile, a read faults with SIGBUS.  Report it like any other
 * truncated region instead of dying on the signal. */
static void on_sigbus(int sig)
{
    (void)sig;
    static const char msg[] = "acectl: the region file shrank while being read\n";
    ssize_t unused = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)unused;
    _exit(EXIT_LAYOUT);
}

/* ---- small helpers ----------------------------------------------------- */

static uint64_t clock_ms(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* Strict decimal: digits only, no sign, no overflow past max. */
static bool parse_u64(const char *s, uint64_t max, uint64_t *out)
{
    if (!s || !*s)
        return false;
    uint64_t v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return false;
        unsigned d = (unsigned)(*s - '0');
        if (v > (max - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

static bool parse_pid(const char *s, pid_t *out)
{
    uint64_t v;
    if (!parse_u64(s, INT_MAX, &v) || v == 0)
        return false;
    *out = (pid_t)v;
    return true;
}

static void region_path(pid_t pid, char *buf, size_t len)
{
    snprintf(buf, len, "%s/%s%d", HAKMEM_REGION_DIR, HAKMEM_REGION_PREFIX, (int)pid);
}

static bool process_exists(pid_t pid)
{
    return kill(pid, 0) == 0 || errno != ESRCH;   /* EPERM: someone else's, alive */
}

/* Field 22 of /proc/PID/stat: the start time, in clock ticks after boot.
 * 0 when it cannot be read. */
static uint64_t process_start_time(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    return hakmem_region_start_time_of(path);
}

/* VmRSS of pid in KiB, -1 if unknown. */
static long process_rss_kb(pid_t pid)
{
    char path[64], line[128];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    long kb = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

static void process_comm(pid_t pid, char *buf, size_t len)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
    snprintf(buf, len, "?");
    FILE *f = fopen(path, "re");
    if (!f)
        return;
    if (fgets(buf, (int)len, f))
        buf[strcspn(buf, "\n")] = '\0';
    fclose(f);
}

/* The region names a process that has exited: its pid is gone, or was
 * reused by a process that started at another time. */
static bool region_is_stale(const struct hakmem_region_header *h, pid_t pid)
{
    if (!process_exists(pid))
        return true;
    uint64_t started = process_start_time(pid);
    return h->start_time && started && started != h->start_time;
}

/* ---- opening a region -------------------------------------------------- */

struct region {
    pid_t pid;
    int fd;
    bool missing;                     /* no file at the region's name */
    size_t size;
    struct hakmem_region_header *h;   /* the mapping */
};

static void region_close(struct region *r)
{
    if (r->h)
        munmap(r->h, r->size);
    if (r->fd >= 0)
        close(r->fd);
    r->h = NULL;
    r->fd = -1;
}

/* Ownership and type, from the open descriptor (no race with a rename):
 * ours, a regular file, and not accessible by anyone else. */
static int check_file(const struct stat *st, const char *path)
{
    if (!S_ISREG(st->st_mode))
        return fail(EXIT_PERMISSION, "%s is not a regular file: refusing", path);
    if (st->st_uid != getuid())
        return fail(EXIT_PERMISSION, "%s belongs to uid %u, not to you (uid %u)",
                    path, (unsigned)st->st_uid, (unsigned)getuid());
    if (st->st_mode & 077)
        return fail(EXIT_PERMISSION, "%s is accessible by others (mode %04o): refusing",
                    path, (unsigned)(st->st_mode & 07777));
    if ((size_t)st->st_size < sizeof(struct hakmem_region_header))
        return fail(EXIT_LAYOUT, "%s is truncated (%lld bytes)", path, (long long)st->st_size);
    return EXIT_OK;
}

/* Everything the header claims must hold before anything else is read. */
static int check_header(const struct hakmem_region_header *h, size_t size,
                        pid_t pid, uid_t uid, const char *path)
{
    if (h->magic != HAKMEM_REGION_MAGIC)
        return fail(EXIT_LAYOUT, "%s: bad magic (not a hakmem region)", path);
    if (h->version != HAKMEM_REGION_VERSION)
        return fail(EXIT_LAYOUT, "%s: layout version %u; this acectl reads version %u",
                    path, h->version, HAKMEM_REGION_VERSION);
    if (h->header_size < sizeof *h || h->class_size < sizeof(struct hakmem_region_class) ||
        h->header_size % 8 || h->class_size % 8 ||
        h->class_count == 0 || h->class_count > MAX_CLASSES)
        return fail(EXIT_LAYOUT, "%s: inconsistent layout (header %u, classes %u x %u)",
                    path, h->header_size, h->class_count, h->class_size);
    uint64_t need = (uint64_t)h->header_size + (uint64_t)h->class_count * h->class_size;
    if (h->total_size != size || need > size)
        return fail(EXIT_LAYOUT, "%s is truncated (%zu bytes; the layout needs %llu)",
                    path, size, (unsigned long long)(need > h->total_size ? need : h->total_size));
    if (h->pid != pid || h->uid != uid)
        return fail(EXIT_LAYOUT, "%s names pid %d uid %u, not pid %d uid %u", path,
                    (int)h->pid, h->uid, (int)pid, (unsigned)uid);
    return EXIT_OK;
}

/* A region whose magic is still 0 may be one the process is creating right
 * now (it writes the magic last): give it a moment before calling it bad. */
static int map_and_check(struct region *r, const struct stat *st, bool writable, const char *path)
{
    r->size = (size_t)st->st_size;
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *p = mmap(NULL, r->size, prot, MAP_SHARED, r->fd, 0);
    if (p == MAP_FAILED)
        return fail(EXIT_LAYOUT, "cannot map %s: %s", path, strerror(errno));
    r->h = p;
    uint64_t give_up = clock_ms(CLOCK_MONOTONIC) + CREATE_WAIT_MS;
    while (__atomic_load_n(&r->h->magic, __ATOMIC_ACQUIRE) == 0 &&
           clock_ms(CLOCK_MONOTONIC) < give_up)
        sleep_ms(10);
    return check_header(r->h, r->size, r->pid, st->st_uid, path);
}

/* Opens, checks and maps the file at path as the region of pid.  Returns
 * an exit code, having reported any error but a missing file (which is
 * EXIT_NO_REGION, unreported: the caller knows why).  r must be closed. */
static int region_open_file(struct region *r, pid_t pid, bool writable, const char *path)
{
    *r = (struct region){ .pid = pid, .fd = -1 };
    /* O_NOFOLLOW: never a symlink; O_NONBLOCK: a FIFO planted there cannot
     * hang us (it fails the regular-file check next). */
    int flags = (writable ? O_RDWR : O_RDONLY) | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK;
    r->fd = open(path, flags);
    if (r->fd < 0) {
        if (errno == ENOENT) {
            r->missing = true;
            return EXIT_NO_REGION;
        }
        if (errno == ELOOP)
            return fail(EXIT_PERMISSION, "%s is a symlink: refusing", path);
        if (errno == EACCES || errno == EPERM)
            return fail(EXIT_PERMISSION, "%s: permission denied (another user's region)", path);
        return fail(EXIT_NO_REGION, "cannot open %s: %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(r->fd, &st) != 0)
        return fail(EXIT_NO_REGION, "cannot stat %s: %s", path, strerror(errno));
    int rc = check_file(&st, path);
    if (rc == EXIT_OK)
        rc = map_and_check(r, &st, writable, path);
    return rc;
}

/* The region of a live process, as show/watch/requests need it. */
static int region_open(struct region *r, pid_t pid, bool writable)
{
    char path[96];
    region_path(pid, path, sizeof path);
    int rc = region_open_file(r, pid, writable, path);
    bool missing = r->missing;
    if (rc != EXIT_OK)
        region_close(r);
    if (missing && !process_exists(pid))
        return fail(EXIT_NO_PROCESS, "no such process: %d", (int)pid);
    if (missing)
        return fail(EXIT_NO_REGION, "process %d has no hakmem region (not using hakmem, "
                    "HAKMEM_ACE not 1, or not allocating yet)", (int)pid);
    if (rc != EXIT_OK)
        return rc;
    if (!process_exists(pid)) {
        region_close(r);
        return fail(EXIT_NO_PROCESS, "no such process: %d (its stale region is left; "
                    "'acectl list' removes it)", (int)pid);
    }
    if (region_is_stale(r->h, pid)) {
        region_close(r);
        return fail(EXIT_NO_REGION, "process %d has no hakmem region (%s is left by an "
                    "earlier process with that pid; 'acectl list' removes it)", (int)pid, path);
    }
    return EXIT_OK;
}

/* ---- reading a snapshot (seqlock) -------------------------------------- */

struct snapshot {
    struct hakmem_region_header h;    /* a copy: control fields are best-effort */
    unsigned n;
    struct hakmem_region_class cls[MAX_CLASSES];
};

/* Copies words with acquire loads: the seqlock's second read of seq
 * cannot move before them (a fence would do the same, but ThreadSanitizer
 * builds do not support fences).  check_header made the sizes multiples of 8. */
static void copy_words(void *dst, const void *src, size_t bytes)
{
    uint64_t *d = dst;
    const uint64_t *p = src;
    for (size_t i = 0; i < bytes / 8; i++)
        d[i] = __atomic_load_n(&p[i], __ATOMIC_ACQUIRE);
}

static void copy_snapshot(const struct region *r, struct snapshot *s)
{
    copy_words(&s->h, r->h, sizeof s->h);
    s->n = r->h->class_count;
    const char *base = (const char *)r->h + r->h->header_size;
    for (unsigned i = 0; i < s->n; i++)
        copy_words(&s->cls[i], base + (size_t)i * r->h->class_size, sizeof s->cls[i]);
}

/* Copies between two equal, even reads of seq (the writer makes it odd
 * while it writes).  class_count etc. never change after creation. */
static int read_snapshot(const struct region *r, struct snapshot *s)
{
    uint64_t give_up = clock_ms(CLOCK_MONOTONIC) + SNAPSHOT_WAIT_MS;
    for (;;) {
        uint64_t s1 = __atomic_load_n(&r->h->seq, __ATOMIC_ACQUIRE);
        if (!(s1 & 1)) {
            copy_snapshot(r, s);
            if (__atomic_load_n(&r->h->seq, __ATOMIC_RELAXED) == s1)
                break;
        }
        if (clock_ms(CLOCK_MONOTONIC) > give_up)
            return fail(EXIT_TIMEOUT, "process %d did not finish writing its snapshot "
                        "within %d ms", (int)r->pid, SNAPSHOT_WAIT_MS);
        sleep_ms(1);
    }
    return EXIT_OK;
}

static uint64_t snapshot_age_ms(const struct snapshot *s)
{
    uint64_t now = clock_ms(CLOCK_REALTIME), at = s->h.publish_time_ns / 1000000;
    return now > at ? now - at : 0;
}

static bool class_active(const struct hakmem_region_class *c)
{
    return c->refills || c->pinned || c->blocks_cached || c->count != c->count_default;
}

/* ---- show -------------------------------------------------------------- */

struct totals {
    uint64_t refills, events, drops, cached, cached_bytes;
    unsigned active;
};

static struct totals sum_classes(const struct snapshot *s)
{
    struct totals t = { 0 };
    for (unsigned i = 0; i < s->n; i++) {
        const struct hakmem_region_class *c = &s->cls[i];
        t.refills += c->refills;
        t.events += c->events;
        t.drops += c->drops;
        t.cached += c->blocks_cached;
        t.cached_bytes += c->blocks_cached * c->block_size;
        t.active += class_active(c);
    }
    return t;
}

static const char *human_bytes(uint64_t b, char *buf, size_t len)
{
    static const char *unit[] = { "B", "KiB", "MiB", "GiB", "TiB" };
    double v = (double)b;
    unsigned u = 0;
    while (v >= 1024 && u < 4) {
        v /= 1024;
        u++;
    }
    snprintf(buf, len, u ? "%.1f %s" : "%.0f %s", v, unit[u]);
    return buf;
}

static void print_title(const struct snapshot *s)
{
    char comm[64];
    process_comm(s->h.pid, comm, sizeof comm);
    printf("pid %d (%s)  learning %s  updated %.2f s ago  (snapshot %llu)\n",
           (int)s->h.pid, comm, s->h.frozen ? "FROZEN" : "on",
           (double)snapshot_age_ms(s) / 1000, (unsigned long long)s->h.publishes);
}

static void print_footer(const struct snapshot *s)
{
    struct totals t = sum_classes(s);
    char b1[32], b2[32], b3[32];
    printf("totals: refills %llu  events %llu  drops %llu  cached %llu blocks (%s)"
           "  classes in use %u, pinned %u\n",
           (unsigned long long)t.refills, (unsigned long long)t.events,
           (unsigned long long)t.drops, (unsigned long long)t.cached,
           human_bytes(t.cached_bytes, b1, sizeof b1), t.active, s->h.pinned_classes);
    printf("process: mapped %s  segments %llu  large blocks %llu (%s)  threads %llu live,"
           " %llu exited\n", human_bytes(s->h.bytes_mapped, b2, sizeof b2),
           (unsigned long long)s->h.segments, (unsigned long long)s->h.large_blocks,
           human_bytes(s->h.large_bytes, b3, sizeof b3),
           (unsigned long long)s->h.threads_live, (unsigned long long)s->h.threads_exited);
    printf("ace: events %llu  drops %llu  decisions %llu  changes %llu;"
           "  requests %llu applied, %llu refused\n",
           (unsigned long long)s->h.ace_events, (unsigned long long)s->h.ace_drops,
           (unsigned long long)s->h.ace_decisions, (unsigned long long)s->h.ace_changes,
           (unsigned long long)s->h.requests_applied, (unsigned long long)s->h.requests_refused);
}

static void print_table(const struct snapshot *s, bool all)
{
    print_title(s);
    printf("%5s %7s %6s %7s %4s %4s %11s %11s %7s %8s  %s\n", "class", "size", "count",
           "default", "min", "max", "refills", "events", "drops", "cached", "pinned");
    for (unsigned i = 0; i < s->n; i++) {
        const struct hakmem_region_class *c = &s->cls[i];
        if (!all && !class_active(c))
            continue;
        printf("%5u %7u %6u %7u %4u %4u %11llu %11llu %7llu %8llu  %s\n", i, c->block_size,
               c->count, c->count_default, c->count_min, c->count_max,
               (unsigned long long)c->refills, (unsigned long long)c->events,
               (unsigned long long)c->drops, (unsigned long long)c->blocks_cached,
               c->pinned ? "pinned" : "-");
    }
    print_footer(s);
}

/* A command name may hold any byte but NUL. */
static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

#define JU(name, v) printf("\"%s\": %llu", name, (unsigned long long)(v))

/* One class per line, so that line tools work as well as JSON parsers. */
static void print_json_class(unsigned i, const struct hakmem_region_class *c, bool last)
{
    printf("    {\"class\": %u, \"block_size\": %u, \"count\": %u, \"default\": %u, "
           "\"min\": %u, \"max\": %u, \"pinned\": %s, ", i, c->block_size, c->count,
           c->count_default, c->count_min, c->count_max, c->pinned ? "true" : "false");
    JU("refills", c->refills); fputs(", ", stdout);
    JU("blocks_refilled", c->blocks_refilled); fputs(", ", stdout);
    JU("flushes", c->flushes); fputs(", ", stdout);
    JU("blocks_flushed", c->blocks_flushed); fputs(", ", stdout);
    JU("remote_frees", c->remote_frees); fputs(", ", stdout);
    JU("events", c->events); fputs(", ", stdout);
    JU("drops", c->drops); fputs(", ", stdout);
    JU("cached", c->blocks_cached);
    printf("}%s\n", last ? "" : ",");
}

static void print_json(const struct snapshot *s)
{
    const struct hakmem_region_header *h = &s->h;
    struct totals t = sum_classes(s);
    char comm[64];
    process_comm(h->pid, comm, sizeof comm);
    printf("{\n  \"command\": ");
    json_string(comm);
    printf(",\n  \"pid\": %d, \"uid\": %u, \"version\": %u, \"snapshot\": %llu, "
           "\"age_ms\": %llu, \"frozen\": %s, \"pinned_classes\": %u,\n",
           (int)h->pid, h->uid, h->version, (unsigned long long)h->publishes,
           (unsigned long long)snapshot_age_ms(s), h->frozen ? "true" : "false",
           h->pinned_classes);
    printf("  \"requests_applied\": %llu, \"requests_refused\": %llu,\n",
           (unsigned long long)h->requests_applied, (unsigned long long)h->requests_refused);
    printf("  \"process\": {\"bytes_mapped\": %llu, \"segments\": %llu, \"large_blocks\": %llu, "
           "\"large_bytes\": %llu, \"threads_live\": %llu, \"threads_exited\": %llu},\n",
           (unsigned long long)h->bytes_mapped, (unsigned long long)h->segments,
           (unsigned long long)h->large_blocks, (unsigned long long)h->large_bytes,
           (unsigned long long)h->threads_live, (unsigned long long)h->threads_exited);
    printf("  \"ace\": {\"events\": %llu, \"drops\": %llu, \"decisions\": %llu, \"changes\": %llu},\n",
           (unsigned long long)h->ace_events, (unsigned long long)h->ace_drops,
           (unsigned long long)h->ace_decisions, (unsigned long long)h->ace_changes);
    printf("  \"totals\": {\"refills\": %llu, \"events\": %llu, \"drops\": %llu, \"cached\": %llu, "
           "\"cached_bytes\": %llu, \"classes_in_use\": %u},\n",
           (unsigned long long)t.refills, (unsigned long long)t.events,
           (unsigned long long)t.drops, (unsigned long long)t.cached,
           (unsigned long long)t.cached_bytes, t.active);
    printf("  \"classes\": [\n");
    for (unsigned i = 0; i < s->n; i++)
        print_json_class(i, &s->cls[i], i + 1 == s->n);
    printf("  ]\n}\n");
}

static struct snapshot snap_a, snap_b;   /* large: static, not on the stack */

static int cmd_show(pid_t pid, bool json, bool all)
{
    struct region r;
    int rc = region_open(&r, pid, false);
    if (rc != EXIT_OK)
        return rc;
    rc = read_snapshot(&r, &snap_a);
    region_close(&r);
    if (rc != EXIT_OK)
        return rc;
    if (json)
        print_json(&snap_a);
    else
        print_table(&snap_a, all);
    /* A live ACE thread writes at least once a second: an old snapshot
     * means a stopped process, or one that exec'd a program without hakmem. */
    if (snapshot_age_ms(&snap_a) > STALE_MS)
        fprintf(stderr, "acectl: warning: the snapshot is %.0f s old (process %d stopped, "
                "or no longer running hakmem)\n", (double)snapshot_age_ms(&snap_a) / 1000,
                (int)pid);
    return EXIT_OK;
}

/* ---- watch ------------------------------------------------------------- */

static void print_delta_row(unsigned i, const struct hakmem_region_class *c,
                            const struct hakmem_region_class *p, double secs)
{
    char count[32];
    int dc = (int)c->count - (int)p->count;
    if (dc)
        snprintf(count, sizeof count, "%u(%+d)", c->count, dc);
    else
        snprintf(count, sizeof count, "%u", c->count);
    double rate = secs > 0 ? 1 / secs : 0;   /* no new snapshot: no rate */
    printf("%5u %7u %11s %7u %11.0f %11.0f %7llu %8llu %+9lld  %s\n", i, c->block_size, count,
           c->count_default, (double)(c->refills - p->refills) * rate,
           (double)(c->events - p->events) * rate,
           (unsigned long long)(c->drops - p->drops), (unsigned long long)c->blocks_cached,
           (long long)(c->blocks_cached - p->blocks_cached), c->pinned ? "pinned" : "-");
}

static void print_watch(const struct snapshot *s, const struct snapshot *prev, bool all)
{
    if (isatty(STDOUT_FILENO))
        fputs("\033[H\033[J", stdout);
    /* Rates over the time between the two snapshots, not between our
     * samples: the process writes one at most every 100 ms. */
    double secs = (double)(s->h.publish_time_ns - prev->h.publish_time_ns) / 1e9;
    print_title(s);
    printf("%5s %7s %11s %7s %11s %11s %7s %8s %9s  %s\n", "class", "size", "count(chg)",
           "default", "refills/s", "events/s", "drops+", "cached", "cached+", "pinned");
    for (unsigned i = 0; i < s->n; i++) {
        if (!all && !class_active(&s->cls[i]) && !class_active(&prev->cls[i]))
            continue;
        print_delta_row(i, &s->cls[i], &prev->cls[i], secs);
    }
    print_footer(s);
    fputs("\n", stdout);
    fflush(stdout);
}

static int cmd_watch(pid_t pid, double interval, long count, bool all)
{
    struct region r;
    int rc = region_open(&r, pid, false);
    if (rc != EXIT_OK)
        return rc;
    struct snapshot *cur = &snap_a, *prev = &snap_b;
    rc = read_snapshot(&r, prev);
    /* The first sample is measured against the one just taken: the rates
     * need an interval, so it is printed after the first sleep. */
    for (long n = 0; rc == EXIT_OK && (count <= 0 || n < count); n++) {
        sleep_ms((unsigned)(interval * 1000));
        if (!process_exists(pid)) {
            printf("pid %d exited\n", (int)pid);
            break;
        }
        rc = read_snapshot(&r, cur);
        if (rc != EXIT_OK)
            break;
        print_watch(cur, prev, all);
        struct snapshot *t = prev;
        prev = cur;
        cur = t;
    }
    region_close(&r);
    return rc;
}

/* ---- requests ---------------------------------------------------------- */

struct answer {
    uint32_t status, reason;
};

/* Serialises acectl instances: a request is written and answered whole
 * under an exclusive flock of the region file. */
static int lock_region(const struct region *r)
{
    uint64_t give_up = clock_ms(CLOCK_MONOTONIC) + LOCK_WAIT_MS;
    while (flock(r->fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK && errno != EINTR)
            return fail(EXIT_PERMISSION, "cannot lock the region: %s", strerror(errno));
        if (clock_ms(CLOCK_MONOTONIC) > give_up)
            return fail(EXIT_TIMEOUT, "another acectl is talking to process %d", (int)r->pid);
        sleep_ms(5);
    }
    return EXIT_OK;
}

static void post_request(struct hakmem_region_header *h, uint64_t id,
                         uint32_t cmd, uint32_t cls, uint32_t value)
{
    /* Odd: being written.  An acquire read-modify-write keeps the field
     * stores below after it (no fence: see copy_words). */
    __atomic_exchange_n(&h->req_seq, id - 1, __ATOMIC_ACQ_REL);
    __atomic_store_n(&h->req_cmd, cmd, __ATOMIC_RELAXED);
    __atomic_store_n(&h->req_class, cls, __ATOMIC_RELAXED);
    __atomic_store_n(&h->req_value, value, __ATOMIC_RELAXED);
    __atomic_store_n(&h->req_seq, id, __ATOMIC_RELEASE);       /* ready */
    __atomic_fetch_add(&h->doorbell, 1, __ATOMIC_RELEASE);
    syscall(SYS_futex, &h->doorbell, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* Polls for ack_seq == id until the deadline; false on timeout.  Also gives
 * up early when the process is gone. */
static bool wait_answer(const struct region *r, uint64_t id, uint64_t deadline, bool *gone)
{
    for (;;) {
        if (__atomic_load_n(&r->h->ack_seq, __ATOMIC_ACQUIRE) == id)
            return true;
        if (!process_exists(r->pid)) {
            *gone = true;
            return false;
        }
        if (clock_ms(CLOCK_MONOTONIC) > deadline)
            return false;
        sleep_ms(1);
    }
}

/* The same compare-and-swap the ACE thread claims a request with: true
 * if the request was still pending (it never will be applied now). */
static bool withdraw(struct hakmem_region_header *h, uint64_t id)
{
    uint64_t expect = id;
    return __atomic_compare_exchange_n(&h->req_seq, &expect, id + 1, false,
                                       __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

/* The request this run is waiting on: a signal that would end acectl
 * (Ctrl-C, a `timeout`'s SIGTERM, a closed terminal) withdraws it first,
 * or the process would apply it whenever it next looked, unconfirmed.
 * (SIGKILL cannot be caught: such a request stays pending.) */
static struct hakmem_region_header *volatile pending_region;
static volatile uint64_t pending_id;

static void on_end_signal(int sig)
{
    if (pending_region)
        withdraw(pending_region, pending_id);
    signal(sig, SIG_DFL);       /* then ends by it, as it would have */
    raise(sig);
}

static const int end_signals[] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT };
static struct sigaction end_saved[sizeof end_signals / sizeof end_signals[0]];

/* A signal the caller ignores (nohup's SIGHUP, a background job's SIGINT)
 * stays ignored: it would not have ended acectl.  Each goes back to what
 * it was. */
static void watch_end_signals(bool on)
{
    for (size_t i = 0; i < sizeof end_signals / sizeof end_signals[0]; i++) {
        if (!on) {
            sigaction(end_signals[i], &end_saved[i], NULL);
            continue;
        }
        struct sigaction sa = { .sa_handler = on_end_signal };
        sigemptyset(&sa.sa_mask);
        sigaction(end_signals[i], NULL, &end_saved[i]);
        if (end_saved[i].sa_handler != SIG_IGN)
            sigaction(end_signals[i], &sa, NULL);
    }
}

/* Writes one request and waits for the answer.  On timeout the request is
 * withdrawn, so a timed-out request is never applied later; if the thread
 * had claimed it already, its answer comes soon and is waited for. */
static int send_request(struct region *r, uint32_t cmd, uint32_t cls, uint32_t value,
                        struct answer *a)
{
    int rc = lock_region(r);
    if (rc != EXIT_OK)
        return rc;
    struct hakmem_region_header *h = r->h;
    uint64_t id = (__atomic_load_n(&h->req_seq, __ATOMIC_ACQUIRE) & ~1ull) + 2;
    pending_id = id;
    pending_region = h;
    watch_end_signals(true);
    post_request(h, id, cmd, cls, value);

    bool gone = false;
    bool answered = wait_answer(r, id, clock_ms(CLOCK_MONOTONIC) + ANSWER_WAIT_MS, &gone);
    if (!answered && !gone) {
        if (withdraw(h, id)) {
            pending_region = NULL;
            watch_end_signals(false);
            return fail(EXIT_TIMEOUT, "process %d did not answer within %d ms (stopped?); "
                        "the request was withdrawn", (int)r->pid, ANSWER_WAIT_MS);
        }
        /* Taken: a trim may still be at work. */
        int more_ms = cmd == HAKMEM_REGION_CMD_TRIM ? TRIM_WAIT_MS : 1000;
        answered = wait_answer(r, id, clock_ms(CLOCK_MONOTONIC) + more_ms, &gone);
    }
    pending_region = NULL;
    watch_end_signals(false);
    if (gone)
        return fail(EXIT_NO_PROCESS, "process %d exited before it answered", (int)r->pid);
    if (!answered)
        return fail(EXIT_TIMEOUT, "process %d took the request but did not answer",
                    (int)r->pid);
    a->status = __atomic_load_n(&h->ack_status, __ATOMIC_RELAXED);
    a->reason = __atomic_load_n(&h->ack_reason, __ATOMIC_RELAXED);
    return EXIT_OK;
}

static const char *reason_text(uint32_t reason)
{
    switch (reason) {
    case HAKMEM_REGION_BAD_COMMAND:   return "unknown command";
    case HAKMEM_REGION_BAD_CLASS:     return "no such class";
    case HAKMEM_REGION_OUT_OF_BOUNDS: return "count outside the class's [min, max]";
    case HAKMEM_REGION_BAD_VALUE:     return "malformed request";
    default:                          return "unknown reason";
    }
}

/* CLASS: an index, "all" (when allowed), or a size "64B": the smallest
 * class whose blocks hold that many bytes, as malloc would choose. */
static int parse_class(const char *arg, const struct snapshot *s, bool allow_all, uint32_t *out)
{
    uint64_t v;
    size_t len = strlen(arg);
    if (allow_all && !strcmp(arg, "all")) {
        *out = HAKMEM_REGION_ALL_CLASSES;
        return EXIT_OK;
    }
    if (parse_u64(arg, UINT32_MAX - 1, &v)) {
        *out = (uint32_t)v;      /* the process checks the range */
        return EXIT_OK;
    }
    char num[32];
    if (len < 2 || len >= sizeof num || (arg[len - 1] != 'B' && arg[len - 1] != 'b'))
        return usage("CLASS must be a class index or a size like 64B");
    memcpy(num, arg, len - 1);
    num[len - 1] = '\0';
    if (!parse_u64(num, UINT32_MAX, &v))
        return usage("CLASS must be a class index or a size like 64B");
    for (unsigned i = 0; i < s->n; i++)
        if (s->cls[i].block_size >= v && (v > 0 || i == 0)) {
            *out = i;
            return EXIT_OK;
        }
    return fail(EXIT_USAGE, "no class holds %llu bytes (the largest holds %u)",
                (unsigned long long)v, s->n ? s->cls[s->n - 1].block_size : 0);
}

static void describe_done(pid_t pid, uint32_t cmd, uint32_t cls, uint32_t value,
                          const struct snapshot *s, long rss_before_kb)
{
    char what[64] = "every class";
    if (cls != HAKMEM_REGION_ALL_CLASSES)
        snprintf(what, sizeof what, "class %u (%u B)", cls,
                 cls < s->n ? s->cls[cls].block_size : 0);
    switch (cmd) {
    case HAKMEM_REGION_CMD_FREEZE:   printf("pid %d: learning frozen\n", (int)pid); break;
    case HAKMEM_REGION_CMD_UNFREEZE: printf("pid %d: learning resumed\n", (int)pid); break;
    case HAKMEM_REGION_CMD_RESET:    printf("pid %d: %s reset to default\n", (int)pid, what); break;
    case HAKMEM_REGION_CMD_PIN:      printf("pid %d: %s pinned at %u\n", (int)pid, what, value); break;
    case HAKMEM_REGION_CMD_TRIM: {
        char before[32], after[32];
        long rss_after_kb = process_rss_kb(pid);
        if (rss_before_kb < 0 || rss_after_kb < 0)
            printf("pid %d: trimmed\n", (int)pid);
        else
            printf("pid %d: trimmed, resident %s -> %s\n", (int)pid,
                   human_bytes((uint64_t)rss_before_kb << 10, before, sizeof before),
                   human_bytes((uint64_t)rss_after_kb << 10, after, sizeof after));
        break;
    }
    }
}

static int report_refusal(pid_t pid, uint32_t cmd, uint32_t cls, uint32_t value,
                          uint32_t reason, const struct snapshot *s)
{
    if (reason == HAKMEM_REGION_OUT_OF_BOUNDS && cls < s->n)
        return fail(EXIT_REFUSED, "pid %d refused: count %u is outside class %u's "
                    "bounds [%u, %u]", (int)pid, value, cls, s->cls[cls].count_min,
                    s->cls[cls].count_max);
    if (reason == HAKMEM_REGION_BAD_COMMAND && cmd == HAKMEM_REGION_CMD_TRIM)
        return fail(EXIT_REFUSED, "pid %d refused: unknown command (its hakmem predates "
                    "trim)", (int)pid);
    if (reason == HAKMEM_REGION_BAD_CLASS)
        return fail(EXIT_REFUSED, "pid %d refused: no class %u (classes are 0 to %u)",
                    (int)pid, cls, s->n - 1);
    return fail(EXIT_REFUSED, "pid %d refused the request: %s", (int)pid, reason_text(reason));
}

/* argv after the command: PID [CLASS [COUNT]], as the command takes them. */
static int cmd_request(uint32_t cmd, int argc, char **argv)
{
    int want_min = cmd == HAKMEM_REGION_CMD_PIN ? 3 : 1;
    int want_max = cmd == HAKMEM_REGION_CMD_PIN ? 3 : cmd == HAKMEM_REGION_CMD_RESET ? 2 : 1;
    if (argc < want_min || argc > want_max)
        return usage(cmd == HAKMEM_REGION_CMD_PIN ? "usage: acectl pin PID CLASS COUNT"
                     : cmd == HAKMEM_REGION_CMD_RESET ? "usage: acectl reset PID [CLASS]"
                     : "this command takes one PID");
    pid_t pid;
    if (!parse_pid(argv[0], &pid))
        return usage("PID must be a positive decimal number");
    uint64_t value = 0;
    if (cmd == HAKMEM_REGION_CMD_PIN && !parse_u64(argv[2], UINT32_MAX, &value))
        return usage("COUNT must be a decimal number");

    struct region r;
    int rc = region_open(&r, pid, true);
    if (rc != EXIT_OK)
        return rc;
    uint32_t cls = HAKMEM_REGION_ALL_CLASSES;
    struct answer a = { 0, 0 };
    rc = read_snapshot(&r, &snap_a);                 /* for CLASS sizes and messages */
    if (rc == EXIT_OK && argc >= 2)
        rc = parse_class(argv[1], &snap_a, cmd == HAKMEM_REGION_CMD_RESET, &cls);
    long rss_before_kb = process_rss_kb(pid);
    if (rc == EXIT_OK)
        rc = send_request(&r, cmd, cls, (uint32_t)value, &a);
    region_close(&r);
    if (rc != EXIT_OK)
        return rc;
    if (a.status != HAKMEM_REGION_APPLIED)
        return report_refusal(pid, cmd, cls, (uint32_t)value, a.reason, &snap_a);
    describe_done(pid, cmd, cls, (uint32_t)value, &snap_a, rss_before_kb);
    return EXIT_OK;
}

/* ---- list -------------------------------------------------------------- */

/* "hakmem.<digits>" -> pid; 0 for any other name. */
static pid_t region_name_pid(const char *name)
{
    size_t plen = strlen(HAKMEM_REGION_PREFIX);
    pid_t pid;
    if (strncmp(name, HAKMEM_REGION_PREFIX, plen) != 0 || !parse_pid(name + plen, &pid))
        return 0;
    return pid;
}

static void list_row(const struct snapshot *s, bool json, bool first)
{
    char comm[64], mapped[32];
    process_comm(s->h.pid, comm, sizeof comm);
    struct totals t = sum_classes(s);
    if (json) {
        printf("%s  {\"pid\": %d, \"command\": ", first ? "" : ",\n", (int)s->h.pid);
        json_string(comm);
        printf(", \"frozen\": %s, \"pinned_classes\": %u, \"classes_in_use\": %u, "
               "\"bytes_mapped\": %llu, \"age_ms\": %llu}", s->h.frozen ? "true" : "false",
               s->h.pinned_classes, t.active, (unsigned long long)s->h.bytes_mapped,
               (unsigned long long)snapshot_age_ms(s));
        return;
    }
    printf("%8d  %-16s %-8s %6u %7u %11s %8.2fs\n", (int)s->h.pid, comm,
           s->h.frozen ? "frozen" : "on", s->h.pinned_classes, t.active,
           human_bytes(s->h.bytes_mapped, mapped, sizeof mapped),
           (double)snapshot_age_ms(s) / 1000);
}

/* Opens and reads the region at path of a live pid; reports what is wrong.
 * EXIT_NO_PROCESS when the region turns out to be an earlier process's. */
static int list_read(pid_t pid, const char *path, struct snapshot *s)
{
    struct region r;
    int rc = region_open_file(&r, pid, false, path);
    if (rc == EXIT_OK && region_is_stale(r.h, pid))
        rc = EXIT_NO_PROCESS;
    if (rc == EXIT_OK)
        rc = read_snapshot(&r, s);
    region_close(&r);
    return rc;
}

/* One directory entry.  Only our own regular files named like a region are
 * looked at.  A stale one (its process is gone, valid or not: it is ours)
 * is removed; a bad one of a live process is reported and skipped.  True
 * when a row was printed. */
static bool list_entry(int dirfd, const char *name, bool json, bool first)
{
    pid_t pid = region_name_pid(name);
    struct stat st;
    if (!pid || fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(st.st_mode) || st.st_uid != getuid())
        return false;
    char path[96];
    region_path(pid, path, sizeof path);
    int rc = process_exists(pid) ? list_read(pid, path, &snap_a) : EXIT_NO_PROCESS;
    if (rc == EXIT_NO_PROCESS) {
        if (unlinkat(dirfd, name, 0) == 0)
            fprintf(stderr, "acectl: removed %s (process %d is gone)\n", path, (int)pid);
        return false;
    }
    if (rc != EXIT_OK)
        return false;   /* already reported */
    list_row(&snap_a, json, first);
    return true;
}

static int cmd_list(bool json)
{
    DIR *d = opendir(HAKMEM_REGION_DIR);
    if (!d)
        return fail(EXIT_NO_REGION, "cannot read %s: %s", HAKMEM_REGION_DIR, strerror(errno));
    if (json)
        printf("[\n");
    else
        printf("%8s  %-16s %-8s %6s %7s %11s %9s\n", "PID", "COMMAND", "LEARNING",
               "PINNED", "CLASSES", "MAPPED", "UPDATED");
    unsigned rows = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        rows += list_entry(dirfd(d), e->d_name, json, rows == 0);
    closedir(d);
    if (json)
        printf("%s]\n", rows ? "\n" : "");
    return EXIT_OK;
}

/* ---- arguments --------------------------------------------------------- */

struct args {
    const char *command;
    char *pos[8];
    int npos;
    bool json, all;
    double interval;
    long count;
};

static bool parse_interval(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = s ? strtod(s, &end) : 0;
    if (!s || errno || end == s || *end || !(v >= 0.1 && v <= 3600))
        return false;
    *out = v;
    return true;
}

/* Options may come anywhere after the command; the rest are positional. */
static int parse_args(int argc, char **argv, struct args *a)
{
    *a = (struct args){ .interval = 1.0 };
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(s, "--json")) {
            a->json = true;
        } else if (!strcmp(s, "--all")) {
            a->all = true;
        } else if (!strcmp(s, "--interval")) {
            if (!parse_interval(next, &a->interval))
                return usage("--interval takes seconds from 0.1 to 3600");
            i++;
        } else if (!strcmp(s, "--count")) {
            uint64_t v;
            if (!parse_u64(next, LONG_MAX, &v) || v == 0)
                return usage("--count takes a positive number");
            a->count = (long)v;
            i++;
        } else if (s[0] == '-' && s[1] != '\0') {
            return fail(EXIT_USAGE, "unknown option %s (acectl --help)", s);
        } else if (!a->command) {
            a->command = s;
        } else if (a->npos < 8) {
            a->pos[a->npos++] = argv[i];
        } else {
            return usage("too many arguments");
        }
    }
    if (!a->command)
        return usage("no command given");
    return EXIT_OK;
}

static int run_pid_command(const struct args *a, int (*fn)(pid_t, const struct args *))
{
    if (a->npos != 1)
        return usage("this command takes one PID");
    pid_t pid;
    if (!parse_pid(a->pos[0], &pid))
        return usage("PID must be a positive decimal number");
    return fn(pid, a);
}

static int do_show(pid_t pid, const struct args *a)
{
    return cmd_show(pid, a->json, a->all);
}

static int do_watch(pid_t pid, const struct args *a)
{
    if (a->json)
        return usage("watch has no --json: use show --json in a loop");
    return cmd_watch(pid, a->interval, a->count, a->all);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(help_text, stdout);
            return EXIT_OK;
        }
        if (!strcmp(argv[i], "--version")) {
            printf("acectl %s (region layout version %u)\n", ACECTL_VERSION,
                   HAKMEM_REGION_VERSION);
            return EXIT_OK;
        }
    }
    struct args a;
    int rc = parse_args(argc, argv, &a);
    if (rc != EXIT_OK)
        return rc;
    signal(SIGBUS, on_sigbus);
    signal(SIGPIPE, SIG_DFL);

    const char *c = a.command;
    if (!strcmp(c, "list"))
        return a.npos ? usage("list takes no arguments") : cmd_list(a.json);
    if (!strcmp(c, "show"))
        return run_pid_command(&a, do_show);
    if (!strcmp(c, "watch"))
        return run_pid_command(&a, do_watch);
    if (a.json || a.all)
        return usage("--json and --all go with list, show and watch");
    if (!strcmp(c, "freeze"))
        return cmd_request(HAKMEM_REGION_CMD_FREEZE, a.npos, a.pos);
    if (!strcmp(c, "unfreeze"))
        return cmd_request(HAKMEM_REGION_CMD_UNFREEZE, a.npos, a.pos);
    if (!strcmp(c, "reset"))
        return cmd_request(HAKMEM_REGION_CMD_RESET, a.npos, a.pos);
    if (!strcmp(c, "pin"))
        return cmd_request(HAKMEM_REGION_CMD_PIN, a.npos, a.pos);
    if (!strcmp(c, "trim"))
        return cmd_request(HAKMEM_REGION_CMD_TRIM, a.npos, a.pos);
    return fail(EXIT_USAGE, "unknown command '%s' (acectl --help)", c);
}
