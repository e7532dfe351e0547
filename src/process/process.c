/* Process-wide set-up, fork handlers, and the bootstrap arena. */
#define _GNU_SOURCE
#include "process.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/single_threaded.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../include/hakmem.h"
#include "../ace/ace.h"
#include "../diag/diag.h"
#include "../hot/hot.h"
#include "../refill/refill.h"
#include "../segment/segment.h"

_Atomic int hm_process_state;
struct hm_options hm_options;
void (*hm_init_test_hook)(void);

/* Set while this thread runs phase 1: a malloc it makes then must not wait
 * for itself. */
static __thread bool in_phase1 __attribute__((tls_model("initial-exec")));

static bool env_flag(const char *name)
{
    const char *v = getenv(name);   /* reads environ; never allocates */
    return v && v[0] == '1' && v[1] == '\0';
}

/* glibc's lock of its list of open FILEs (recursive; GLIBC_2.2.5).
 * Weak: a C library without them leaves them NULL. */
extern void _IO_list_lock(void) __attribute__((weak));
extern void _IO_list_unlock(void) __attribute__((weak));

/* Whether the outer fork's prepare took the FILE list lock, and whether
 * glibc's fork takes it too and resets it in the child before the child
 * handlers: it does in a process that has had a second thread, as it
 * reads __libc_single_threaded before the prepare handlers (so a prepare
 * handler run before ours that starts the process's first thread is
 * misread: that child keeps the lock).  Where glibc reset it the child
 * leaves it alone; else it lets it go, as the parent does, with a wake
 * for a thread an earlier child handler started that waits on it.  (A
 * reset of our own in the child took the lock from such a thread, or
 * left it asleep: a reset stores 0 and wakes nobody.)  The same for a
 * fork made from another library's handler inside ours (nested): its
 * child, where glibc reset the lock we hold, forgets it holds it, so that
 * the outer fork's handlers it runs next do not let it go again. */
static bool io_list_taken, io_list_reset_in_child, nested_reset_in_child;

/* Every lock of the allocator is held across fork(), so the child finds
 * none taken by a thread it does not have.  The registry lock also keeps
 * the purger (which holds it while it holds segment locks) out.  Other
 * libraries' fork handlers that run while they are held may allocate (see
 * hm_fork_hold_begin).
 *
 * glibc's FILE list lock comes first.  glibc's fork takes it after the
 * prepare handlers, and its own malloc's locks after it, since a thread
 * may allocate while it holds a FILE's lock (getdelim, a stream's first
 * buffer) and fflush(NULL) holds the list lock while it takes each FILE's.
 * Taking ours first made a cycle: the forking thread held ours and
 * waited for the list lock, held by a thread in fflush(NULL) waiting for
 * stdout's lock, held by a thread in malloc waiting for ours. */
static void fork_prepare(void)
{
    if (hm_fork_hold_nested()) {
        nested_reset_in_child = !__libc_single_threaded;
        return;
    }
    io_list_taken = _IO_list_lock && _IO_list_unlock;
    io_list_reset_in_child = !__libc_single_threaded;
    if (io_list_taken)
        _IO_list_lock();
    hm_refill_fork_prepare();
    hm_segment_fork_prepare();
    hm_large_fork_prepare();
    hm_fork_hold_begin();
}

/* The same in parent and child: the forking thread holds the locks in
 * both.  The refill box's last: heaps_lock is what the first malloc of a
 * thread that an earlier child handler started waits on. */
static void release_locks(void)
{
    hm_large_fork_release();
    hm_segment_fork_release();
    hm_refill_fork_release();
}

static void fork_parent(void)
{
    if (hm_fork_hold_end()) {
        release_locks();
        if (io_list_taken)
            _IO_list_unlock();
    }
}

/* Every reset before the locks go: they wake threads that an earlier
 * child handler started, whose refills push ACE events (a push into the
 * queue while it was reset left a slot that stopped every later push).
 * The child of a fork made inside the window (from another library's
 * handler) is a process of one thread too, so it is reset as well, but
 * keeps the locks: the outer fork's handlers let them go, in each process
 * that gets there. */
static void fork_child(void)
{
    bool outer = hm_fork_hold_end();
    if (!outer && nested_reset_in_child)
        io_list_taken = false;          /* see io_list_taken */
    hm_ace_fork_child();
    hm_segment_fork_child();
    hm_refill_fork_child(hm_tcache_self());
    if (outer) {
        release_locks();
        if (io_list_taken && !io_list_reset_in_child)
            _IO_list_unlock();
    }
}

/* A decimal number from the environment (capped at 2^40), or def. */
static uint64_t env_u64(const char *name, uint64_t def)
{
    const char *v = getenv(name);
    if (!v || *v < '0' || *v > '9')
        return def;
    uint64_t n = 0;
    for (; *v >= '0' && *v <= '9' && n < ((uint64_t)1 << 40); v++)
        n = n * 10 + (uint64_t)(*v - '0');
    return n;
}

/* What stderr was at start (our copy of it too), so that the report at
 * exit goes to a descriptor only if it still is that: a daemon that closes
 * every descriptor and opens its own files may reuse either number, and
 * the report would land in one of them. */
static struct stat stats_file;
static bool stats_file_noted;

static void stats_file_note(void)
{
    stats_file_noted = fstat(STDERR_FILENO, &stats_file) == 0;
}

static bool is_stats_file(int fd)
{
    struct stat now;
    return stats_file_noted && fd >= 0 && fstat(fd, &now) == 0 &&
           now.st_dev == stats_file.st_dev && now.st_ino == stats_file.st_ino;
}

/* Our copy if it still is stderr's file, else descriptor 2 if that is
 * (a program that closed ours), else none: a daemon that closed both may
 * have a file of its own on either number.  -1: no report. */
static int stats_file_fd(void)
{
    if (is_stats_file(hm_options.stats_fd))
        return hm_options.stats_fd;
    return is_stats_file(STDERR_FILENO) ? STDERR_FILENO : -1;
}

static void phase1(void)
{
    in_phase1 = true;
    if (hm_segment_module_init() != 0)
        hm_fatal("malloc", "cannot reserve the segment map, size", (void *)HM_SEGMENT_SIZE);
    hm_options.stats = env_flag("HAKMEM_STATS");
    hm_options.purge_delay_ns = env_u64("HAKMEM_PURGE_DELAY_MS", 1000) * 1000000u;
    hm_options.tcache_max_bytes = env_u64("HAKMEM_TCACHE_MAX_KB", 32768) << 10;
    hm_options.huge_pages = env_u64("HAKMEM_THP", 1) != 0;
    hm_large_cache_config(hm_options.purge_delay_ns);
    /* Programs may close stderr before exit (coreutils do): keep our own
     * copy for the report, close-on-exec so children do not inherit it. */
    hm_options.stats_fd = hm_options.stats ? fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 100) : -1;
    if (hm_options.stats)
        stats_file_note();
    hm_refill_module_init();
    hm_ace_module_init();
    if (hm_init_test_hook)
        hm_init_test_hook();
    in_phase1 = false;
}

bool hm_process_init(void)
{
    int state = atomic_load_explicit(&hm_process_state, memory_order_acquire);
    if (__builtin_expect(state == HM_PROCESS_READY, 1))
        return true;
    if (in_phase1)
        return false;
    int expected = 0;
    if (atomic_compare_exchange_strong(&hm_process_state, &expected, 1)) {
        phase1();
        atomic_store_explicit(&hm_process_state, HM_PROCESS_READY, memory_order_release);
        /* Phase 2: may allocate, which now works. */
        pthread_atfork(fork_prepare, fork_parent, fork_child);
        return true;
    }
    while (atomic_load_explicit(&hm_process_state, memory_order_acquire) != HM_PROCESS_READY)
        sched_yield();
    return true;
}

/* Set up at load time too, so the fork handlers exist before main. */
__attribute__((constructor)) static void hm_on_load(void)
{
    hm_process_init();
    hm_ace_loaded();
}

/* At exit (or an unload): the exiting thread's drained batch goes back,
 * so that an invalid free waiting there is diagnosed, and the counters
 * below see it.  Other threads' batches stay: they may be in use. */
__attribute__((destructor)) static void hm_on_unload(void)
{
    hm_drained_put_at_exit(hm_tcache_self());
    int fd = hm_options.stats ? stats_file_fd() : -1;
    if (fd >= 0)
        hakmem_stats_print(fd);
}

/* ---- bootstrap arena --------------------------------------------------- */

#define BOOTSTRAP_SIZE (64 * 1024)
static char bootstrap[BOOTSTRAP_SIZE] __attribute__((aligned(4096)));
static _Atomic size_t bootstrap_used;

/* Each block is preceded by 16 bytes holding its size, so realloc can copy. */
void *hm_bootstrap_alloc(size_t size, size_t alignment)
{
    if (alignment < 16)
        alignment = 16;
    if (size > BOOTSTRAP_SIZE || alignment > 4096)
        return NULL;
    size_t need = (size + 15) & ~(size_t)15;
    size_t old = atomic_load_explicit(&bootstrap_used, memory_order_relaxed);
    size_t at, end;
    do {
        at = (old + 16 + alignment - 1) & ~(alignment - 1);
        end = at + need;
        if (end > BOOTSTRAP_SIZE)
            return NULL;
    } while (!atomic_compare_exchange_weak(&bootstrap_used, &old, end));
    memcpy(bootstrap + at - 16, &size, sizeof size);
    return bootstrap + at;
}

bool hm_bootstrap_owns(const void *p)
{
    return (const char *)p >= bootstrap && (const char *)p < bootstrap + BOOTSTRAP_SIZE;
}

size_t hm_bootstrap_usable_size(const void *p)
{
    size_t size;
    memcpy(&size, (const char *)p - 16, sizeof size);
    return size;
}
