/* ACE box: the background thread that learns refill counts.
 *
 * Off unless HAKMEM_ACE=1.  The refill path reports its refills, one event
 * per batch of HM_EVENT_BATCH refills of a class by a thread,
 * through hm_ace_record(); the ACE thread drains them on a cadence, folds
 * them into per-class windows, and publishes new refill counts with one
 * atomic store each (hm_refill_count_store), which the refill engine reads
 * at the next refill only (Contract B).  It never touches thread caches. */
#ifndef HM_ACE_H
#define HM_ACE_H

#include <stdbool.h>
#include <stdint.h>

#include "../queue/queue.h"
#include "../refill/refill.h"

/* The idle window: a class with no refills for this long decays toward its
 * default (the rule), and a window this long is judged however few refills
 * it saw (the ACE thread). */
#define HM_ACE_IDLE_NS 1000000000ull   /* 1 s */

extern bool hm_ace_on;   /* set once at process init from HAKMEM_ACE */

/* Reads HAKMEM_ACE and HAKMEM_ACE_INTERVAL_MS.  Called during process init,
 * before anything may allocate: it must not allocate. */
void hm_ace_module_init(void);

/* Starts the ACE thread if it has not started (one load once it has; a
 * no-op without HAKMEM_ACE=1).  Called when the library is loaded, and by
 * the refill path at every refill and page-block allocation, outside its
 * locks (pthread_create may allocate): the thread purges for every thread,
 * so it must run however few refills make a report.  Never from a free:
 * glibc frees a joined thread's DTV while holding its stack-cache lock,
 * which pthread_create takes (tests/programs/fork_join.c); it never mallocs
 * under that lock.  Before the library's constructor ran (a malloc from
 * the dynamic loader or an earlier constructor), it does nothing: libc may
 * not be ready to create threads. */
void hm_ace_start(void);

/* Pushes a refill event for the ACE thread (only when hm_ace_on), after
 * the refill is done and the allocator's state is consistent.  False:
 * dropped. */
bool hm_ace_record(const struct hm_event *ev);

/* The library's constructor: from now on hm_ace_start may start the
 * thread, and it does. */
void hm_ace_loaded(void);

/* Fork: the child has no ACE thread; it starts its own at its next refill. */
void hm_ace_fork_child(void);

/* What the learner sees of one class over one window. */
struct hm_ace_window {
    uint64_t window_ns;         /* length of the window */
    uint64_t refills;
    uint64_t blocks_refilled;   /* blocks the refills put in the bins (not count x refills) */
    uint64_t blocks_flushed;
    uint64_t interval_ns_sum;   /* sum of events' nonzero intervals */
    uint64_t interval_count;
    uint64_t remote_collected;
};

/* The learning rule, a pure function: the next refill count of a class. */
uint32_t hm_ace_next_count(uint32_t current, const struct hm_ace_window *w,
                           struct hm_refill_bounds bounds);

/* In-process view for tests and acectl. */
struct hm_ace_counters {
    uint64_t events, drops, decisions, changes;
    bool running;
};
void hm_ace_counters(struct hm_ace_counters *out);
uint64_t hm_ace_class_events(unsigned cls);

/* Test hook: run one drain-and-decide step now, on the caller's thread. */
void hm_ace_step(void);

/* ---- acectl's shared region (src/ace/region.c, include/hakmem_region.h) ----
 * The ACE thread publishes a snapshot to /dev/shm/hakmem.<pid> and answers
 * acectl's requests (freeze, unfreeze, reset, pin).  Never on the hot path. */

/* ACE thread, under ace_lock, after each tick: creates the region (once),
 * answers a pending request, publishes the snapshot when due. */
void hm_ace_region_tick(void);
/* ACE thread: sleeps up to ns (at most 1 s) on the region's doorbell, which
 * acectl rings.  False when there is no region: the caller sleeps itself. */
bool hm_ace_region_sleep(uint64_t ns);
/* Under ace_lock: true when learning must leave cls alone (frozen/pinned). */
bool hm_ace_region_holds(unsigned cls);
/* Fork child: unmaps the parent's region; the child creates its own. */
void hm_ace_region_fork_child(void);

#endif
