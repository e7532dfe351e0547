/* ACE box: the shared region that acectl reads and steers.
 *
 * The layout and both protocols (seqlock snapshot, one-request control
 * area) are described in include/hakmem_region.h, which the tool shares.
 * Everything here runs on the ACE thread, under ace_lock (ace.c calls
 * hm_ace_region_tick after each drain-and-decide step), except the exit
 * destructor and the fork-child hook:
 *
 *   - Creation: once per process, about REGION_DELAY_NS after the ACE
 *     thread first drained an event (a short-lived process, or a fork
 *     child that _exits soon, never leaves a file behind; nor does a
 *     process that learns nothing, such as a shell under LD_PRELOAD that
 *     execs another program: exec runs no destructor, and the thread
 *     starts at load).  open/ftruncate/fallocate/
 *     mmap only: the ACE thread never calls malloc or stdio.
 *   - Snapshot: gathered at most every REGION_GATHER_NS, written only when
 *     it changed or REGION_HEARTBEAT_NS passed, and right after a request
 *     was applied (so a tool that saw the ack sees its effect).
 *   - Control: each tick claims and answers at most one request; the ACE
 *     thread sleeps on the region's doorbell (a futex), so a tool's request
 *     is answered within microseconds instead of at the next wake.
 *   - Learning holds: a frozen process, or a pinned class, is skipped by
 *     the decide step (hm_ace_region_holds).  A fork child inherits the
 *     holds together with the counts they hold.
 *
 * The application's threads never see any of this: they only read the
 * refill counts, which a request changes with hm_refill_count_store. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE   /* fallocate */
#endif
#include "ace.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "hakmem_region.h"
#include "../../include/hakmem.h"

#define REGION_DELAY_NS      500000000ull    /* thread age before the file appears */
#define REGION_GATHER_NS     100000000ull    /* at most one snapshot per 100 ms */
#define REGION_HEARTBEAT_NS 1000000000ull    /* and at least one a second */
#define REGION_MAX_SLEEP_NS 1000000000ull    /* so the heartbeat holds for long intervals */

enum { REGION_NONE, REGION_CREATING, REGION_READY, REGION_FAILED, REGION_EXITING };

/* Creation/exit handshake between the ACE thread and the exit destructor. */
static atomic_int region_state;
static char region_path[64];
static pid_t region_pid;

/* The ACE thread's own state (the fork-child hook resets it). */
static struct hakmem_region_header *region;
static size_t region_size;
static uint64_t region_first_event, region_last_gather, region_last_publish;
static uint64_t region_seq;          /* the seqlock's value, kept here, not read back */
static uint32_t region_bell_seen;

/* The last snapshot gathered and the one last written, to see changes. */
struct region_snap {
    uint32_t frozen, pinned_classes;
    uint64_t bytes_mapped, segments, large_blocks, large_bytes;
    uint64_t threads_live, threads_exited;
    uint64_t ace_events, ace_drops, ace_decisions, ace_changes;
    struct hakmem_region_class cls[HM_NUM_CLASSES];
};
static struct region_snap snap_now, snap_written;

/* Learning holds: under ace_lock. */
static bool hold_frozen;
static bool hold_pinned[HM_NUM_CLASSES];

static uint64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- creation ---------------------------------------------------------- */

/* Appends the decimal v at p; returns the end.  No snprintf: glibc's may
 * allocate, and the ACE thread must not. */
static char *put_u64(char *p, uint64_t v)
{
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static void make_path(pid_t pid)
{
    static const char prefix[] = HAKMEM_REGION_DIR "/" HAKMEM_REGION_PREFIX;
    memcpy(region_path, prefix, sizeof prefix - 1);
    *put_u64(region_path + sizeof prefix - 1, (uint64_t)pid) = '\0';
}

/* Field 22 of /proc/self/stat (start time in clock ticks since boot), which
 * tells acectl whether the pid in the region still names this process.
 * 0 when /proc is not there. */
static uint64_t start_time(void)
{
    return hakmem_region_start_time_of("/proc/self/stat");
}

/* Our pid is ours now, so a file already at our name is left by an earlier
 * process with this pid (or by this one before an exec): remove it if it
 * is ours.  Anything else (a symlink, another user's file) stays and the
 * region is not created. */
static bool remove_stale(void)
{
    struct stat st;
    if (lstat(region_path, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid())
        return false;
    return unlink(region_path) == 0;
}

static int open_exclusive(void)
{
    int flags = O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
    int fd = open(region_path, flags, 0600);
    if (fd < 0 && errno == EEXIST && remove_stale())
        fd = open(region_path, flags, 0600);
    return fd;
}

static void publish(uint64_t now);

/* Creates, sizes and maps the file, writes identity and a first snapshot,
 * and only then the magic, so a reader never trusts a half-made region.
 * fallocate reserves the tmpfs pages now: a full /dev/shm fails here
 * rather than with SIGBUS at a later store. */
static bool region_create(uint64_t now)
{
    region_pid = getpid();
    make_path(region_pid);
    size_t need = sizeof(struct hakmem_region_header)
                + HM_NUM_CLASSES * sizeof(struct hakmem_region_class);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t size = (need + page - 1) / page * page;

    int fd = open_exclusive();
    if (fd < 0)
        return false;
    void *p = MAP_FAILED;
    if (ftruncate(fd, (off_t)size) == 0 &&
        (fallocate(fd, 0, 0, (off_t)size) == 0 || errno == EOPNOTSUPP))
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        unlink(region_path);
        return false;
    }

    region = p;
    region_size = size;
    region->version = HAKMEM_REGION_VERSION;
    region->header_size = sizeof(struct hakmem_region_header);
    region->total_size = size;
    region->class_count = HM_NUM_CLASSES;
    region->class_size = sizeof(struct hakmem_region_class);
    region->pid = region_pid;
    region->uid = geteuid();
    region->start_time = start_time();
    publish(now);
    __atomic_store_n(&region->magic, HAKMEM_REGION_MAGIC, __ATOMIC_RELEASE);
    return true;
}

/* NONE -> CREATING -> READY (or FAILED: never retried).  If the process
 * began to exit meanwhile (the destructor moved the state to EXITING), the
 * file it could not see is removed here. */
static void region_try_create(uint64_t now)
{
    int expect = REGION_NONE;
    if (!atomic_compare_exchange_strong(&region_state, &expect, REGION_CREATING))
        return;
    bool ok = region_create(now);
    expect = REGION_CREATING;
    if (!atomic_compare_exchange_strong(&region_state, &expect,
                                        ok ? REGION_READY : REGION_FAILED) && ok)
        unlink(region_path);
}

/* ---- snapshot ---------------------------------------------------------- */

static void gather(struct region_snap *s)
{
    memset(s, 0, sizeof *s);
    struct hakmem_stats st;
    hakmem_stats(&st);
    struct hm_ace_counters ac;
    hm_ace_counters(&ac);
    s->frozen = hold_frozen;
    s->bytes_mapped = st.bytes_mapped;
    s->segments = st.segments;
    s->large_blocks = st.large_blocks;
    s->large_bytes = st.large_bytes;
    s->threads_live = st.threads_live;
    s->threads_exited = st.threads_exited;
    s->ace_events = ac.events;
    s->ace_drops = ac.drops;
    s->ace_decisions = ac.decisions;
    s->ace_changes = ac.changes;
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++) {
        struct hakmem_class_info ci;
        hakmem_class_info(c, &ci);
        struct hakmem_region_class *r = &s->cls[c];
        r->block_size = ci.block_size;
        r->count = ci.refill_count;
        r->count_default = ci.refill_default;
        r->count_min = ci.refill_min;
        r->count_max = ci.refill_max;
        r->pinned = hold_pinned[c];
        r->refills = ci.refills;
        r->blocks_refilled = ci.blocks_refilled;
        r->flushes = ci.flushes;
        r->blocks_flushed = ci.blocks_flushed;
        r->remote_frees = ci.remote_frees;
        r->blocks_cached = ci.blocks_cached;
        r->events = ci.ace_events;
        r->drops = ci.ace_drops;
        s->pinned_classes += r->pinned;
    }
}

/* Writes snap_now under the seqlock (this thread is the only writer).  The
 * odd value goes in with an acquire read-modify-write, which keeps every
 * data store after it; the even value with a release store, which keeps
 * them before it.  (No fences: ThreadSanitizer builds do not support them.) */
static void write_snapshot(void)
{
    struct hakmem_region_header *h = region;
    const struct region_snap *s = &snap_now;
    __atomic_exchange_n(&h->seq, ++region_seq, __ATOMIC_ACQ_REL);

    h->publishes++;
    h->publish_time_ns = clock_ns(CLOCK_REALTIME);
    h->frozen = s->frozen;
    h->pinned_classes = s->pinned_classes;
    h->bytes_mapped = s->bytes_mapped;
    h->segments = s->segments;
    h->large_blocks = s->large_blocks;
    h->large_bytes = s->large_bytes;
    h->threads_live = s->threads_live;
    h->threads_exited = s->threads_exited;
    h->ace_events = s->ace_events;
    h->ace_drops = s->ace_drops;
    h->ace_decisions = s->ace_decisions;
    h->ace_changes = s->ace_changes;
    /* Our own layout, never a field read back: anyone who can write the
     * file could otherwise point this write anywhere. */
    memcpy((char *)h + sizeof *h, s->cls, sizeof s->cls);

    __atomic_store_n(&h->seq, ++region_seq, __ATOMIC_RELEASE);
}

static void publish(uint64_t now)
{
    gather(&snap_now);
    write_snapshot();
    snap_written = snap_now;
    region_last_gather = region_last_publish = now;
}

/* The periodic path: gather at most every REGION_GATHER_NS, write only a
 * change or a heartbeat. */
static void maybe_publish(uint64_t now)
{
    if (now - region_last_gather < REGION_GATHER_NS)
        return;
    region_last_gather = now;
    gather(&snap_now);
    if (memcmp(&snap_now, &snap_written, sizeof snap_now) == 0 &&
        now - region_last_publish < REGION_HEARTBEAT_NS)
        return;
    write_snapshot();
    snap_written = snap_now;
    region_last_publish = now;
}

/* ---- control ----------------------------------------------------------- */

static void reset_class(unsigned c)
{
    hold_pinned[c] = false;
    hm_refill_count_store(c, hm_refill_bounds(c).def);
}

/* A request for the whole process takes class ALL and value 0. */
static uint32_t whole_process(uint32_t cls, uint32_t value)
{
    if (cls != HAKMEM_REGION_ALL_CLASSES)
        return HAKMEM_REGION_BAD_CLASS;
    return value != 0 ? HAKMEM_REGION_BAD_VALUE : HAKMEM_REGION_OK;
}

/* Validates and applies one request; returns HAKMEM_REGION_OK or the
 * reason it was refused.  Nothing is changed by a refused request. */
static uint32_t apply(uint32_t cmd, uint32_t cls, uint32_t value)
{
    switch (cmd) {
    case HAKMEM_REGION_CMD_FREEZE:
    case HAKMEM_REGION_CMD_UNFREEZE: {
        uint32_t reason = whole_process(cls, value);
        if (reason == HAKMEM_REGION_OK)
            hold_frozen = cmd == HAKMEM_REGION_CMD_FREEZE;
        return reason;
    }
    case HAKMEM_REGION_CMD_TRIM: {
        uint32_t reason = whole_process(cls, value);
        if (reason == HAKMEM_REGION_OK)
            hakmem_trim();      /* every thread's heap, in the tidier's steps; the
                                 * events wait in the ring meanwhile (full: dropped) */
        return reason;
    }
    case HAKMEM_REGION_CMD_RESET:
        if (value != 0)
            return HAKMEM_REGION_BAD_VALUE;
        if (cls == HAKMEM_REGION_ALL_CLASSES) {
            for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
                reset_class(c);
            return HAKMEM_REGION_OK;
        }
        if (cls >= HM_NUM_CLASSES)
            return HAKMEM_REGION_BAD_CLASS;
        reset_class(cls);
        return HAKMEM_REGION_OK;
    case HAKMEM_REGION_CMD_PIN: {
        if (cls >= HM_NUM_CLASSES)
            return HAKMEM_REGION_BAD_CLASS;
        struct hm_refill_bounds b = hm_refill_bounds(cls);
        if (value < b.min || value > b.max)
            return HAKMEM_REGION_OUT_OF_BOUNDS;
        hold_pinned[cls] = true;
        hm_refill_count_store(cls, value);
        return HAKMEM_REGION_OK;
    }
    default:
        return HAKMEM_REGION_BAD_COMMAND;
    }
}

/* Claims and answers the pending request, if any.  True when one was
 * answered (the snapshot was republished with its effect). */
static bool control(uint64_t now)
{
    struct hakmem_region_header *h = region;
    /* Read the doorbell before the request: a request written after this
     * load changes the doorbell, so the futex wait below returns at once. */
    region_bell_seen = __atomic_load_n(&h->doorbell, __ATOMIC_ACQUIRE);
    uint64_t id = __atomic_load_n(&h->req_seq, __ATOMIC_ACQUIRE);
    if (id == 0 || (id & 1))
        return false;            /* nothing yet, being written, or taken */
    uint32_t cmd = __atomic_load_n(&h->req_cmd, __ATOMIC_RELAXED);
    uint32_t cls = __atomic_load_n(&h->req_class, __ATOMIC_RELAXED);
    uint32_t value = __atomic_load_n(&h->req_value, __ATOMIC_RELAXED);
    /* The claim: fails if the tool withdrew the request or began another
     * (it only writes the fields while req_seq is odd). */
    if (!__atomic_compare_exchange_n(&h->req_seq, &id, id + 1, false,
                                     __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return false;

    uint32_t reason = apply(cmd, cls, value);
    if (reason == HAKMEM_REGION_OK)
        __atomic_store_n(&h->requests_applied, h->requests_applied + 1, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&h->requests_refused, h->requests_refused + 1, __ATOMIC_RELAXED);
    publish(now);
    __atomic_store_n(&h->ack_status, reason == HAKMEM_REGION_OK ? HAKMEM_REGION_APPLIED
                                                                : HAKMEM_REGION_REFUSED,
                     __ATOMIC_RELAXED);
    __atomic_store_n(&h->ack_reason, reason, __ATOMIC_RELAXED);
    __atomic_store_n(&h->ack_seq, id, __ATOMIC_RELEASE);
    return true;
}

/* ---- hooks for ace.c --------------------------------------------------- */

void hm_ace_region_tick(void)
{
    uint64_t now = clock_ns(CLOCK_MONOTONIC);
    if (!region) {
        if (region_first_event == 0) {
            struct hm_ace_counters ac;
            hm_ace_counters(&ac);
            if (ac.events)
                region_first_event = now;
        } else if (now - region_first_event >= REGION_DELAY_NS) {
            region_try_create(now);
        }
        return;
    }
    if (!control(now))
        maybe_publish(now);
}

bool hm_ace_region_sleep(uint64_t ns)
{
    if (!region)
        return false;
    if (ns > REGION_MAX_SLEEP_NS)
        ns = REGION_MAX_SLEEP_NS;
    struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000ull),
                           .tv_nsec = (long)(ns % 1000000000ull) };
    /* Shared futex (the word is in a MAP_SHARED file): acectl's FUTEX_WAKE
     * from another process reaches it.  EAGAIN (the doorbell rang since
     * control() read it), a wake, EINTR or the timeout all just end the
     * sleep early or on time: the caller's loop copes with either. */
    syscall(SYS_futex, &region->doorbell, FUTEX_WAIT, region_bell_seen, &ts, NULL, 0);
    return true;
}

bool hm_ace_region_holds(unsigned cls)
{
    return hold_frozen || (cls < HM_NUM_CLASSES && hold_pinned[cls]);
}

void hm_ace_region_fork_child(void)
{
    /* The mapping is the parent's file: never write or remove it here. */
    if (region)
        munmap(region, region_size);
    region = NULL;
    region_first_event = region_last_gather = region_last_publish = 0;
    region_bell_seen = 0;
    region_seq = 0;
    memset(&snap_written, 0, sizeof snap_written);
    atomic_store(&region_state, REGION_NONE);
}

/* Normal exit: remove the name (the detached ACE thread may still write the
 * mapping; it stays valid).  Only the creating process removes it: a fork
 * child that skipped the atfork handlers (a raw clone) must not. */
__attribute__((destructor)) static void region_at_exit(void)
{
    int was = atomic_exchange(&region_state, REGION_EXITING);
    if (was == REGION_READY && region_pid == getpid())
        unlink(region_path);
}
