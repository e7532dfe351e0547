/* hakmem_region.h: the shared region through which acectl inspects and
 * steers what a running process's ACE thread has learned.
 *
 * With HAKMEM_ACE=1 the ACE thread of process P creates the file
 * /dev/shm/hakmem.<P> (mode 0600, owned by P's effective uid), maps it
 * MAP_SHARED and keeps a snapshot of the per-class refill counts and
 * counters in it.  The file is removed when P exits normally.  The layout
 * below is shared by the library (src/ace/region.c) and the tool
 * (tools/acectl/acectl.c); it is plain data, the same on every x86-64
 * compiler, and never changes within a version: a reader checks magic,
 * version and the three sizes before it trusts anything else.
 *
 *   offset 0                     struct hakmem_region_header
 *   offset header_size           class_count x struct hakmem_region_class
 *   total_size                   (page-rounded; the file is that long)
 *
 * Snapshot (seqlock).  Only the ACE thread writes the snapshot: it makes
 * `seq` odd, writes the process fields and every class record, then makes
 * `seq` even again.  A reader copies everything between two reads of an
 * even, equal `seq`.
 *
 * Control (one request at a time).  A tool that holds an exclusive flock()
 * on the file (so two tools never interleave) writes a request:
 *     id = (req_seq & ~1) + 2        (even, never used before)
 *     req_seq = id - 1               (odd: "being written")
 *     req_cmd, req_class, req_value
 *     req_seq = id                   (release: the request is ready)
 *     doorbell += 1, futex-wake the doorbell
 * The ACE thread (which sleeps on the doorbell between its ticks) sees an
 * even, nonzero req_seq, reads the fields and claims the request by moving
 * req_seq from id to id + 1 with a compare-and-swap.  It validates the
 * request, applies or refuses it, republishes the snapshot, writes
 * ack_status and ack_reason and last ack_seq = id (release).  A tool that
 * gives up waiting withdraws its request with the same compare-and-swap;
 * whoever wins the swap owns the request, so a withdrawn request is never
 * applied and a claimed one is always answered.
 *
 * All shared words are naturally aligned and accessed with the __atomic
 * builtins on both sides. */
#ifndef HAKMEM_REGION_H
#define HAKMEM_REGION_H

#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>

#define HAKMEM_REGION_MAGIC   0x47524d454d4b4148ull   /* "HAKMEMRG" in memory */
#define HAKMEM_REGION_VERSION 1u
#define HAKMEM_REGION_DIR     "/dev/shm"
#define HAKMEM_REGION_PREFIX  "hakmem."                /* then the decimal pid */

/* req_class for "every class" (reset only). */
#define HAKMEM_REGION_ALL_CLASSES 0xffffffffu

enum hakmem_region_cmd {
    HAKMEM_REGION_CMD_FREEZE   = 1,   /* class ALL, value 0: learning stops */
    HAKMEM_REGION_CMD_UNFREEZE = 2,   /* class ALL, value 0 */
    HAKMEM_REGION_CMD_RESET    = 3,   /* class or ALL, value 0: default count, unpinned */
    HAKMEM_REGION_CMD_PIN      = 4,   /* class, value in [min, max]: fixed count */
    HAKMEM_REGION_CMD_TRIM     = 5,   /* class ALL, value 0: malloc_trim(0), run by the
                                       * ACE thread; answered when it is done */
};

enum hakmem_region_status {
    HAKMEM_REGION_PENDING = 0,
    HAKMEM_REGION_APPLIED = 1,
    HAKMEM_REGION_REFUSED = 2,
};

enum hakmem_region_reason {
    HAKMEM_REGION_OK            = 0,
    HAKMEM_REGION_BAD_COMMAND   = 1,   /* unknown req_cmd */
    HAKMEM_REGION_BAD_CLASS     = 2,   /* no such class (or ALL where not allowed) */
    HAKMEM_REGION_OUT_OF_BOUNDS = 3,   /* pin count outside [min, max] */
    HAKMEM_REGION_BAD_VALUE     = 4,   /* a value or class where none is taken */
};

struct hakmem_region_header {
    /* Identity: written before the magic, never changed afterwards. */
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;           /* sizeof(struct hakmem_region_header) */
    uint64_t total_size;            /* bytes of the file */
    uint32_t class_count;
    uint32_t class_size;            /* sizeof(struct hakmem_region_class) */
    int32_t  pid;
    uint32_t uid;                   /* effective uid of the creator */
    uint64_t start_time;            /* /proc/<pid>/stat field 22: tells a reused pid */

    /* Control: written by the tool (req_*) and the ACE thread (the rest). */
    uint64_t req_seq;
    uint32_t req_cmd;
    uint32_t req_class;
    uint32_t req_value;
    uint32_t doorbell;              /* futex word the ACE thread sleeps on */
    uint64_t ack_seq;
    uint32_t ack_status;            /* enum hakmem_region_status */
    uint32_t ack_reason;            /* enum hakmem_region_reason */
    uint64_t requests_applied;
    uint64_t requests_refused;      /* malformed or out of range: never applied */

    /* Snapshot: under the seqlock. */
    uint64_t seq;                   /* odd while the ACE thread writes */
    uint64_t publishes;             /* snapshots written so far */
    uint64_t publish_time_ns;       /* CLOCK_REALTIME of this snapshot */
    uint32_t frozen;                /* 1: learning is frozen */
    uint32_t pinned_classes;
    uint64_t bytes_mapped;          /* struct hakmem_stats */
    uint64_t segments;
    uint64_t large_blocks;
    uint64_t large_bytes;
    uint64_t threads_live;
    uint64_t threads_exited;
    uint64_t ace_events;            /* struct hm_ace_counters */
    uint64_t ace_drops;
    uint64_t ace_decisions;
    uint64_t ace_changes;
};

struct hakmem_region_class {
    uint32_t block_size;
    uint32_t count;                 /* refill count now */
    uint32_t count_default;
    uint32_t count_min;
    uint32_t count_max;
    uint32_t pinned;                /* 1: learning leaves this class alone */
    uint64_t refills;
    uint64_t blocks_refilled;
    uint64_t flushes;
    uint64_t blocks_flushed;
    uint64_t remote_frees;
    uint64_t blocks_cached;         /* in thread caches (bins as last refilled or flushed) */
    uint64_t events;                /* refill events the ACE thread received */
    uint64_t drops;                 /* refill events dropped (queue full) */
};

/* Field 22 of a /proc/PID/stat line (the start time, in clock ticks after
 * boot): region.pid_start is compared with it to tell whether a pid still
 * names the process that wrote the region.  0 if the line is malformed.
 * The command name in parentheses may hold anything: parse from its end. */
static inline uint64_t hakmem_region_stat_start_time(const char *stat_line)
{
    const char *p = stat_line, *close = 0;
    for (; *p; p++)
        if (*p == ')')
            close = p;
    if (!close)
        return 0;
    p = close;
    for (int field = 2; field < 22 && *p; p++)   /* each space starts a field */
        if (*p == ' ')
            field++;
    uint64_t v = 0;
    for (; *p >= '0' && *p <= '9'; p++)
        v = v * 10 + (uint64_t)(*p - '0');
    return v;
}

/* The start time of the process whose stat file is stat_path
 * ("/proc/self/stat", "/proc/PID/stat"); 0 when it cannot be read.  Only
 * open/read/close: safe inside the allocator. */
static inline uint64_t hakmem_region_start_time_of(const char *stat_path)
{
    char buf[1024];
    int fd = open(stat_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    return hakmem_region_stat_start_time(buf);
}

/* The layout is part of the version: a change here needs a new version. */
#ifdef __cplusplus
static_assert(sizeof(struct hakmem_region_header) == 216, "region header layout");
static_assert(sizeof(struct hakmem_region_class) == 88, "region class layout");
#else
_Static_assert(sizeof(struct hakmem_region_header) == 216, "region header layout");
_Static_assert(sizeof(struct hakmem_region_class) == 88, "region class layout");
#endif

#endif
