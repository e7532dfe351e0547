/* ACE box: the background thread that learns refill counts (see ace.h).
 *
 * Producers (refill paths, any thread) only push onto the static queue; the
 * consumer side (the ACE thread, or hm_ace_step() in tests) holds ace_lock
 * while it drains and decides, so the two never consume at once.  Producers
 * never take the lock.
 *
 * Cadence.  The thread sleeps one interval (HAKMEM_ACE_INTERVAL_MS, default
 * 10 ms), drains every event and folds them into per-class windows.  Every
 * decision period (ACE_DECIDE_INTERVALS intervals: 100 ms by default) it
 * calls the rule for each class whose window
 *   - had refills, lasted a period, and holds ACE_MIN_REFILLS refills or
 *     lasted HM_ACE_IDLE_NS (so a sporadic class is judged on 1 s of evidence,
 *     not on one noisy event), or
 *   - had no refills for HM_ACE_IDLE_NS (1 s): an idle window,
 * publishes a changed count with hm_refill_count_store (one atomic store; the
 * refill engine reads it at its next refill: Contract B), and starts a new
 * window for that class.  After ACE_BACKOFF_AFTER wakes in a row that drained
 * nothing, the sleep doubles, up to max(1 s, interval), so an idle process
 * sees about one wake a second; any event resets the sleep to one interval.
 *
 * The thread never allocates: its buffer and windows are static, and it
 * calls only clock_gettime, clock_nanosleep, the mutex and the refill box's
 * count/bounds accessors.  pthread_create (at start) may allocate; it runs
 * in the library's constructor, or in a fork child on a thread whose
 * refill or page-block allocation finished (see hm_ace_start). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE   /* pthread_setname_np */
#endif
#include "ace.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../process/process.h"
#include "../refill/refill.h"
#include "../segment/segment.h"
#include "../trace/trace.h"

#define ACE_DEFAULT_INTERVAL_MS 10u
#define ACE_MAX_INTERVAL_MS     10000u
#define ACE_DECIDE_INTERVALS    10u
#define ACE_MIN_REFILLS         4u
#define ACE_BACKOFF_AFTER       10u
#define ACE_MAX_SLEEP_NS        1000000000ull
#define ACE_DRAIN_BATCH         256u
#define ACE_PURGE_NS            100000000ull    /* purge pass: every 100 ms */
#define ACE_DRAIN_MAX           (4u * HM_QUEUE_CAPACITY)   /* per tick */

bool hm_ace_on;

enum { ACE_IDLE, ACE_STARTING, ACE_RUNNING, ACE_FAILED };

/* Contract C: the ring is this static object, never malloc'd. */
static struct hm_queue ace_queue;
static atomic_int ace_state;
static uint64_t ace_interval_ns = ACE_DEFAULT_INTERVAL_MS * 1000000ull;

/* Consumer side: only under ace_lock. */
static pthread_mutex_t ace_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hm_event ace_buf[ACE_DRAIN_BATCH];
static struct hm_ace_window ace_win[HM_NUM_CLASSES];
static uint64_t ace_win_start[HM_NUM_CLASSES];
static uint64_t ace_last_decide;
static bool ace_windows_open;

/* Written by the consumer, read by anyone. */
static _Atomic uint64_t ace_events, ace_decisions, ace_changes;
static _Atomic uint64_t ace_class_ev[HM_NUM_CLASSES];

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000ull),
                           .tv_nsec = (long)(ns % 1000000000ull) };
    while (clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, &ts) == EINTR) {
    }
}

static void count_add(_Atomic uint64_t *c, uint64_t v)
{
    atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

static void fold(const struct hm_event *ev)
{
    if (ev->size_class >= HM_NUM_CLASSES)
        return;
    struct hm_ace_window *w = &ace_win[ev->size_class];
    uint32_t refills = ev->refills ? ev->refills : 1;
    w->refills += refills;
    /* The blocks the refills put in the bins, not count x refills: a
     * refill takes a span's whole free list (often 2-8 times the count),
     * and the flushed and remote blocks it is weighed against are real. */
    w->blocks_refilled += ev->blocks;
    w->blocks_flushed += ev->blocks_flushed;
    w->remote_collected += ev->remote_collected;
    if (refills > 1) {                  /* interval_ns spans refills - 1 intervals */
        w->interval_ns_sum += ev->interval_ns;
        w->interval_count += refills - 1;
    }
    count_add(&ace_class_ev[ev->size_class], 1);
}

/* One drain-and-decide step; the caller holds ace_lock.  force: decide now
 * for every class that had events (hm_ace_step).  Returns events drained. */
static uint64_t ace_tick(uint64_t now, bool force)
{
    if (!ace_windows_open) {
        for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
            ace_win_start[c] = now;
        ace_last_decide = now;
        ace_windows_open = true;
    }

    uint64_t drained = 0;
    while (drained < ACE_DRAIN_MAX) {
        size_t n = hm_queue_drain(&ace_queue, ace_buf, ACE_DRAIN_BATCH);
        for (size_t i = 0; i < n; i++)
            fold(&ace_buf[i]);
        drained += n;
        if (n < ACE_DRAIN_BATCH)
            break;
    }
    count_add(&ace_events, drained);

    uint64_t period = ACE_DECIDE_INTERVALS * ace_interval_ns;
    if (!force && now - ace_last_decide < period)
        return drained;
    ace_last_decide = now;

    for (unsigned c = 0; c < HM_NUM_CLASSES; c++) {
        struct hm_ace_window *w = &ace_win[c];
        uint64_t len = now - ace_win_start[c];
        bool decide;
        if (w->refills > 0)
            decide = force || (len >= period &&
                               (w->refills >= ACE_MIN_REFILLS || len >= HM_ACE_IDLE_NS));
        else
            decide = len >= HM_ACE_IDLE_NS;
        if (!decide)
            continue;
        if (hm_ace_region_holds(c)) {     /* acectl froze learning or pinned c */
            memset(w, 0, sizeof(*w));
            ace_win_start[c] = now;
            continue;
        }

        w->window_ns = len;
        uint32_t cur = hm_refill_count_load(c);
        uint32_t next = hm_ace_next_count(cur, w, hm_refill_bounds(c));
        count_add(&ace_decisions, 1);
        if (next != cur || w->refills)  /* not the idle windows' keeps */
            HM_TRACE_ACE_DECISION(c, cur, next, HM_TRACE_REASON(cur, next, w->refills));
        if (next != cur) {
            hm_refill_count_store(c, next);
            count_add(&ace_changes, 1);
        }
        memset(w, 0, sizeof(*w));
        ace_win_start[c] = now;
    }
    return drained;
}

static void *ace_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "hakmem-ace");   /* prctl: no allocation */

    uint64_t base = ace_interval_ns;
    uint64_t max_sleep = base > ACE_MAX_SLEEP_NS ? base : ACE_MAX_SLEEP_NS;
    /* Idle or not, wake often enough to purge within 1.5x the delay. */
    if (hm_options.purge_delay_ns / 2 < max_sleep)
        max_sleep = hm_options.purge_delay_ns / 2 > base ? hm_options.purge_delay_ns / 2 : base;
    uint64_t nap = base;
    unsigned empty = 0;
    uint64_t last_purge = 0;

    for (;;) {
        if (!hm_ace_region_sleep(nap))    /* acectl's doorbell may end it early */
            sleep_ns(nap);
        pthread_mutex_lock(&ace_lock);
        uint64_t now = hm_clock_precise_ns();
        uint64_t n = ace_tick(now, false);
        hm_ace_region_tick();             /* acectl: requests and snapshot */
        pthread_mutex_unlock(&ace_lock);
        /* Decay for every thread, off the application's threads: free pages
         * and cached large blocks unused for the purge delay go back. */
        if (now - last_purge >= ACE_PURGE_NS) {
            last_purge = now;
            hm_heaps_tidy_idle(hm_options.purge_delay_ns);
            hm_segment_purge_all(hm_clock_ns(), hm_options.purge_delay_ns, HM_PURGE_ALL);
        }
        if (n > 0) {
            empty = 0;
            nap = base;
        } else if (++empty >= ACE_BACKOFF_AFTER) {
            nap = nap > max_sleep / 2 ? max_sleep : nap * 2;
        }
    }
    return NULL;
}

/* The caller that moves the state from IDLE to STARTING creates the thread;
 * everyone else (other threads, or this thread re-entering through a malloc
 * inside pthread_create) goes on without waiting. */
static void ace_start(void)
{
    int expect = ACE_IDLE;
    if (!atomic_compare_exchange_strong(&ace_state, &expect, ACE_STARTING))
        return;

    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);     /* inherited by the thread */

    pthread_attr_t attr;
    int rc = pthread_attr_init(&attr);
    if (rc == 0) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_t tid;
        rc = pthread_create(&tid, &attr, ace_main, NULL);
        pthread_attr_destroy(&attr);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    /* FAILED is not retried (each try would cost a clone): events still
     * queue until the ring is full and then count as drops. */
    atomic_store(&ace_state, rc == 0 ? ACE_RUNNING : ACE_FAILED);
}

/* Set by the library's constructor (see hm_ace_start); a fork child
 * keeps it. */
static atomic_bool ace_loaded;

void hm_ace_start(void)
{
    if (hm_ace_on && atomic_load_explicit(&ace_loaded, memory_order_relaxed) &&
        atomic_load_explicit(&ace_state, memory_order_relaxed) == ACE_IDLE)
        ace_start();
}

void hm_ace_loaded(void)
{
    atomic_store_explicit(&ace_loaded, true, memory_order_relaxed);
    hm_ace_start();
}

bool hm_ace_record(const struct hm_event *ev)
{
    return hm_queue_push(&ace_queue, ev);
}

/* Decimal only; anything else keeps the default. */
static unsigned parse_interval_ms(const char *s)
{
    if (!s || !*s)
        return ACE_DEFAULT_INTERVAL_MS;
    unsigned long v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return ACE_DEFAULT_INTERVAL_MS;
        if (v <= ACE_MAX_INTERVAL_MS)
            v = v * 10 + (unsigned long)(*s - '0');
    }
    if (v < 1)
        v = 1;
    if (v > ACE_MAX_INTERVAL_MS)
        v = ACE_MAX_INTERVAL_MS;
    return (unsigned)v;
}

void hm_ace_module_init(void)
{
    const char *on = getenv("HAKMEM_ACE");
    hm_ace_on = on && on[0] == '1' && on[1] == '\0';
    ace_interval_ns = parse_interval_ms(getenv("HAKMEM_ACE_INTERVAL_MS")) * 1000000ull;
    /* The static ring is all zeros, its initial state: its 40 KiB become
     * resident only as events reach them, and never without ACE. */
    atomic_store(&ace_state, ACE_IDLE);
}

void hm_ace_fork_child(void)
{
    /* Only this thread exists: the parent's ACE thread (which may have held
     * the lock) and any producer mid-push are gone. */
    pthread_mutex_init(&ace_lock, NULL);
    if (hm_ace_on)
        hm_queue_init(&ace_queue);
    memset(ace_win, 0, sizeof(ace_win));
    ace_windows_open = false;
    atomic_store_explicit(&ace_events, 0, memory_order_relaxed);
    atomic_store_explicit(&ace_decisions, 0, memory_order_relaxed);
    atomic_store_explicit(&ace_changes, 0, memory_order_relaxed);
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
        atomic_store_explicit(&ace_class_ev[c], 0, memory_order_relaxed);
    hm_ace_region_fork_child();
    atomic_store(&ace_state, ACE_IDLE);
}

void hm_ace_counters(struct hm_ace_counters *out)
{
    out->events = atomic_load_explicit(&ace_events, memory_order_relaxed);
    out->drops = hm_queue_dropped(&ace_queue);
    out->decisions = atomic_load_explicit(&ace_decisions, memory_order_relaxed);
    out->changes = atomic_load_explicit(&ace_changes, memory_order_relaxed);
    out->running = atomic_load(&ace_state) == ACE_RUNNING;
}

uint64_t hm_ace_class_events(unsigned cls)
{
    if (cls >= HM_NUM_CLASSES)
        return 0;
    return atomic_load_explicit(&ace_class_ev[cls], memory_order_relaxed);
}

void hm_ace_step(void)
{
    pthread_mutex_lock(&ace_lock);
    ace_tick(hm_clock_precise_ns(), true);
    pthread_mutex_unlock(&ace_lock);
}
