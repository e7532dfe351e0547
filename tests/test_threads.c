/* Threads: stress with content checks, cross-thread frees at volume,
 * thread churn without RSS growth, and fork while other threads are busy. */
#include "test_util.h"

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <signal.h>
#include <sys/mman.h>
#include <sched.h>
#include <unistd.h>
#include <sys/syscall.h>

#include "hakmem.h"
#include "hot/hot.h"
#include "process/process.h"
#include "refill/heap_internal.h"
#include "refill/refill.h"

/* HAKMEM_TEST_QUICK=1 (sanitizer runs) divides the work by ten. */
static int scaled(int n)
{
    const char *q = getenv("HAKMEM_TEST_QUICK");
    return q && q[0] == '1' ? n / 10 : n;
}

static size_t rand_size(uint64_t *s)
{
    uint64_t r = next_rand(s);
    switch (r % 16) {
    case 0: return 1 + (r >> 8) % 300000;         /* sometimes large */
    case 1: case 2: return 1 + (r >> 8) % 32768;
    default: return 1 + (r >> 8) % 512;
    }
}

/* Each slot's block is stamped with its slot and size: an overlap shows up
 * as a wrong stamp. */
struct slot {
    unsigned char *p;
    size_t n;
    unsigned tag;
};

static void stamp(struct slot *s)
{
    fill(s->p, s->n < 256 ? s->n : 256, s->tag);
    if (s->n >= 512)                        /* the tail too, apart from the head */
        fill(s->p + s->n - 16, 16, s->tag);
}

static int verify(const struct slot *s)
{
    if (!check(s->p, s->n < 256 ? s->n : 256, s->tag))
        return 0;
    return s->n < 512 || check(s->p + s->n - 16, 16, s->tag);
}

struct stress_arg {
    unsigned id;
    int ops;
    atomic_int *errors;
};

static void *stress(void *argp)
{
    struct stress_arg *a = argp;
    enum { SLOTS = 512 };
    struct slot slots[SLOTS] = { 0 };
    uint64_t seed = a->id * 7919u + 1;
    for (int i = 0; i < a->ops; i++) {
        struct slot *s = &slots[next_rand(&seed) % SLOTS];
        if (s->p) {
            if (!verify(s))
                atomic_fetch_add(a->errors, 1);
            hakmem_free(s->p);
        }
        s->n = rand_size(&seed);
        s->p = hakmem_malloc(s->n);
        s->tag = a->id * 1000003u + (unsigned)i;
        stamp(s);
    }
    for (int i = 0; i < SLOTS; i++) {
        if (slots[i].p && !verify(&slots[i]))
            atomic_fetch_add(a->errors, 1);
        hakmem_free(slots[i].p);
    }
    return NULL;
}

/* Runs fn on four threads, each with its own id and `ops`, and joins them;
 * the checks they failed add up in *errors. */
static void run_four(void *(*fn)(void *), int ops, atomic_int *errors)
{
    enum { T = 4 };
    pthread_t t[T];
    struct stress_arg args[T];
    for (unsigned i = 0; i < T; i++) {
        args[i] = (struct stress_arg){ i, ops, errors };
        pthread_create(&t[i], NULL, fn, &args[i]);
    }
    for (unsigned i = 0; i < T; i++)
        pthread_join(t[i], NULL);
}

static void stress_no_overlap(void **state)
{
    (void)state;
    atomic_int errors = 0;
    run_four(stress, scaled(200000), &errors);
    assert_int_equal(atomic_load(&errors), 0);
}

/* Threads that work in bursts and idle between them, with a 2 ms purge
 * delay: the other threads' purge passes tidy each idle heap (collect its
 * remote frees, empty its stashes, compact its spans) while its owner
 * sleeps, and the owner then finds its heap changed under it.  One free in
 * eight goes through a shared array to whichever thread takes it. */
enum { NAP_SHARED = 64 };
static struct slot nap_shared[NAP_SHARED];
static pthread_mutex_t nap_lock = PTHREAD_MUTEX_INITIALIZER;

static void swap_shared(struct slot *s, uint64_t *seed, atomic_int *errors)
{
    pthread_mutex_lock(&nap_lock);
    struct slot *x = &nap_shared[next_rand(seed) % NAP_SHARED], old = *x;
    *x = *s;
    pthread_mutex_unlock(&nap_lock);
    if (old.p) {
        if (!verify(&old))
            atomic_fetch_add(errors, 1);
        hakmem_free(old.p);
    }
    s->p = NULL;
}

static void *bursts_and_naps(void *argp)
{
    struct stress_arg *a = argp;
    enum { SLOTS = 2048 };
    static __thread struct slot slots[SLOTS];
    uint64_t seed = a->id * 104729u + 3;
    for (int round = 0; round < a->ops; round++) {
        for (int i = 0; i < 3000; i++) {
            struct slot *s = &slots[next_rand(&seed) % SLOTS];
            if (s->p) {
                if (next_rand(&seed) % 8 == 0) {
                    swap_shared(s, &seed, a->errors);
                } else {
                    if (!verify(s))
                        atomic_fetch_add(a->errors, 1);
                    hakmem_free(s->p);
                }
            }
            s->n = rand_size(&seed);
            s->p = hakmem_malloc(s->n);
            s->tag = a->id * 1000003u + (unsigned)(round * 3000 + i);
            stamp(s);
        }
        if (round % 4 == 3) {           /* shrink to a quarter, then idle */
            for (int i = 0; i < SLOTS; i++)
                if (slots[i].p && i % 4) {
                    if (!verify(&slots[i]))
                        atomic_fetch_add(a->errors, 1);
                    hakmem_free(slots[i].p);
                    slots[i].p = NULL;
                }
        }
        struct timespec nap = { 0, (long)(1000000 + next_rand(&seed) % 4000000) };
        nanosleep(&nap, NULL);
    }
    for (int i = 0; i < SLOTS; i++) {
        if (slots[i].p && !verify(&slots[i]))
            atomic_fetch_add(a->errors, 1);
        hakmem_free(slots[i].p);
        slots[i].p = NULL;
    }
    return NULL;
}

static void idle_and_busy_threads_no_overlap(void **state)
{
    (void)state;
    uint64_t delay = hm_options.purge_delay_ns;
    hm_options.purge_delay_ns = 2000000;
    struct hm_heap_counters c0, c1;
    hm_heap_counters(&c0);
    atomic_int errors = 0;
    run_four(bursts_and_naps, scaled(120), &errors);
    for (int i = 0; i < NAP_SHARED; i++) {
        if (nap_shared[i].p && !verify(&nap_shared[i]))
            atomic_fetch_add(&errors, 1);
        hakmem_free(nap_shared[i].p);
        nap_shared[i].p = NULL;
    }
    hm_heap_counters(&c1);
    hm_options.purge_delay_ns = delay;
    print_message("heaps tidied while their threads napped: %llu\n",
                  (unsigned long long)(c1.heaps_tidied - c0.heaps_tidied));
    assert_int_equal(atomic_load(&errors), 0);
    assert_true(c1.heaps_tidied > c0.heaps_tidied);
}

/* Live sets that grow, then shrink to 1% (three frees per malloc), in
 * phases of different sizes, as a server's load changes: bins start and
 * stop draining, spans empty and their pages go to other classes.  One
 * free in eight is handed to the other thread, so remote frees land in
 * spans while they drain.  Every block is checked before it is freed. */
enum { PHASE_SLOTS = 20000, PASS_MAX = 256 };

struct phase_arg {
    unsigned id;
    atomic_int *errors;
    struct slot *pass;          /* blocks the other thread will free */
    atomic_int *passed;
    pthread_mutex_t *lock;
};

static size_t phase_size(uint64_t *seed, int phase)
{
    uint64_t r = next_rand(seed) >> 8;
    switch (phase % 3) {
    case 0: return 16 + r % 241;
    case 1: return 1024 + r % 7169;
    default: return 16 + (r % 2 ? r % 1024 : r % 65536);
    }
}

static void free_checked(struct slot *s, atomic_int *errors)
{
    if (!verify(s))
        atomic_fetch_add(errors, 1);
    hakmem_free(s->p);
}

/* Frees what the other thread handed over. */
static void take_passed(struct phase_arg *a)
{
    pthread_mutex_lock(a->lock);
    for (int i = 0; i < *a->passed; i++)
        free_checked(&a->pass[i], a->errors);
    *a->passed = 0;
    pthread_mutex_unlock(a->lock);
}

static void release(struct phase_arg *a, struct phase_arg *other, struct slot *s, int n)
{
    if (n % 8 == 0) {
        pthread_mutex_lock(other->lock);
        if (*other->passed < PASS_MAX) {
            other->pass[(*other->passed)++] = *s;
            pthread_mutex_unlock(other->lock);
            return;
        }
        pthread_mutex_unlock(other->lock);
    }
    free_checked(s, a->errors);
}

static struct phase_arg phase_args[2];

static uint64_t total_drained(void)
{
    uint64_t n = 0;
    struct hakmem_class_info ci;
    for (unsigned c = 0; hakmem_class_info(c, &ci) == 0; c++)
        n += ci.blocks_drained;
    return n;
}

static void *phases(void *argp)
{
    struct phase_arg *a = argp, *other = &phase_args[a->id ^ 1];
    /* The shrink may allocate before it frees: room above the target. */
    static struct slot live[2][2 * PHASE_SLOTS];
    struct slot *l = live[a->id];
    uint64_t seed = a->id + 99;
    int n = 0, frees = 0, target = scaled(PHASE_SLOTS);
    for (int phase = 0; phase < 6; phase++) {
        while (n < target) {                        /* grow */
            l[n].n = phase_size(&seed, phase);
            l[n].p = hakmem_malloc(l[n].n);
            l[n].tag = a->id * 7777u + (unsigned)n + (unsigned)phase * 100003u;
            stamp(&l[n++]);
        }
        while (n > target / 100) {                  /* shrink */
            if (next_rand(&seed) % 4) {
                int i = (int)(next_rand(&seed) % (uint64_t)n);
                release(a, other, &l[i], ++frees);
                l[i] = l[--n];
                if (frees % 1024 == 0)
                    take_passed(a);
            } else {
                l[n].n = phase_size(&seed, phase);
                l[n].p = hakmem_malloc(l[n].n);
                l[n].tag = a->id * 5555u + (unsigned)n;
                stamp(&l[n++]);
            }
        }
    }
    while (n > 0)
        free_checked(&l[--n], a->errors);
    take_passed(a);
    return NULL;
}

static void shrinking_phases_no_overlap(void **state)
{
    (void)state;
    atomic_int errors = 0;
    static struct slot pass[2][PASS_MAX];
    static atomic_int passed[2];
    static pthread_mutex_t locks[2] = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER };
    uint64_t drained = total_drained();
    pthread_t t[2];
    for (unsigned i = 0; i < 2; i++)
        phase_args[i] = (struct phase_arg){ i, &errors, pass[i], &passed[i], &locks[i] };
    for (unsigned i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, phases, &phase_args[i]);
    for (unsigned i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    for (unsigned i = 0; i < 2; i++)         /* what a thread passed after the other ended */
        take_passed(&phase_args[i]);
    assert_int_equal(atomic_load(&errors), 0);
    if (scaled(PHASE_SLOTS) == PHASE_SLOTS)  /* quick runs shrink too little */
        assert_true(total_drained() > drained + PHASE_SLOTS);
}

/* A thread's own blocks freed after its heap went away (by a key
 * destructor that runs after hakmem's in the last round, as glibc's own
 * thread clean-up does) go straight to their spans: no new heap is left
 * registered for a thread that is gone. */
static pthread_key_t late_key;
enum { LATE_BLOCKS = 4 };   /* glibc runs the destructors 4 rounds at most */

struct late {
    void *blocks[LATE_BLOCKS];
    atomic_int freed;   /* atomic: TSan does not order key destructors before the join */
};

static void late_free(void *arg)
{
    struct late *l = arg;
    int i = atomic_fetch_add(&l->freed, 1);
    hakmem_free(l->blocks[i]);
    if (i + 1 < LATE_BLOCKS)             /* again next round, while glibc runs them */
        pthread_setspecific(late_key, l);
}

static void *allocate_late(void *arg)
{
    struct late *l = arg;
    for (int i = 0; i < LATE_BLOCKS; i++)
        l->blocks[i] = hakmem_malloc(48);
    pthread_setspecific(late_key, l);
    return NULL;
}

static void frees_after_thread_exit_leave_no_heap(void **state)
{
    (void)state;
    hakmem_free(hakmem_malloc(1));          /* hakmem's exit key comes first */
    assert_int_equal(pthread_key_create(&late_key, late_free), 0);
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    static struct late l[4];
    for (int i = 0; i < 4; i++) {
        pthread_t t;
        pthread_create(&t, NULL, allocate_late, &l[i]);
        pthread_join(t, NULL);
        assert_int_equal(atomic_load(&l[i].freed), LATE_BLOCKS);
    }
    hakmem_stats(&s1);
    assert_int_equal(s1.threads_live, s0.threads_live);
    assert_int_equal(s1.threads_exited, s0.threads_exited + 4);
    pthread_key_delete(late_key);
}

/* Producer/consumer through a ring: every free is a cross-thread free. */
enum { RING = 4096 };
static struct slot ring[RING];
static atomic_uint ring_head, ring_tail;
static atomic_int xerrors;
static int xcount;

static void *producer(void *arg)
{
    (void)arg;
    uint64_t seed = 42;
    for (unsigned i = 0; i < (unsigned)xcount; i++) {
        while (atomic_load(&ring_head) - atomic_load(&ring_tail) >= RING)
            sched_yield();
        struct slot *s = &ring[atomic_load(&ring_head) % RING];
        s->n = 1 + next_rand(&seed) % 2048;
        s->p = hakmem_malloc(s->n);
        s->tag = i;
        stamp(s);
        atomic_fetch_add(&ring_head, 1);
    }
    return NULL;
}

static void *consumer(void *arg)
{
    (void)arg;
    for (unsigned i = 0; i < (unsigned)xcount; i++) {
        while (atomic_load(&ring_tail) == atomic_load(&ring_head))
            sched_yield();
        struct slot *s = &ring[atomic_load(&ring_tail) % RING];
        if (!verify(s))
            atomic_fetch_add(&xerrors, 1);
        hakmem_free(s->p);
        atomic_fetch_add(&ring_tail, 1);
    }
    return NULL;
}

static void cross_thread_frees_at_volume(void **state)
{
    (void)state;
    struct hakmem_class_info ci;
    uint64_t remote_before = 0, remote_after = 0;
    for (unsigned c = 0; c < hakmem_class_count(); c++) {
        hakmem_class_info(c, &ci);
        remote_before += ci.remote_frees;
    }
    xcount = scaled(300000);
    pthread_t p, c;
    pthread_create(&p, NULL, producer, NULL);
    pthread_create(&c, NULL, consumer, NULL);
    pthread_join(p, NULL);
    pthread_join(c, NULL);
    assert_int_equal(atomic_load(&xerrors), 0);
    for (unsigned k = 0; k < hakmem_class_count(); k++) {
        hakmem_class_info(k, &ci);
        remote_after += ci.remote_frees;
    }
    /* Most of them were collected by the producer (the rest by whoever
     * adopted its segments). */
    assert_true(remote_after - remote_before > (uint64_t)xcount / 3);
}

/* Threads that exit while their blocks live abandon their segments; later
 * threads free those blocks (into the abandoned segments, which they take
 * over) and, out of room, adopt segments; a thread that only frees leaves
 * its frees waiting in segments nobody owns; meanwhile another thread
 * sweeps the abandoned stack (malloc_trim's whole sweep, and a slow path's
 * two) without pause.  Every block is checked before it is freed. */
enum { LEAVE_POOL = 2048, LEAVE_EACH = 600 };
static struct slot leave_pool[LEAVE_POOL];
static pthread_mutex_t leave_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int leave_errors;
static atomic_bool sweeping;

static void *allocate_swap_and_exit(void *arg)
{
    uint64_t seed = (uintptr_t)arg;
    for (int i = 0; i < LEAVE_EACH; i++) {
        struct slot mine = { NULL, rand_size(&seed) % 4096 + 1, (unsigned)next_rand(&seed) };
        mine.p = hakmem_malloc(mine.n);
        stamp(&mine);
        pthread_mutex_lock(&leave_lock);
        struct slot *s = &leave_pool[next_rand(&seed) % LEAVE_POOL];
        struct slot old = *s;
        *s = mine;
        pthread_mutex_unlock(&leave_lock);
        if (old.p) {
            if (!verify(&old))
                atomic_fetch_add(&leave_errors, 1);
            hakmem_free(old.p);         /* mostly another exited thread's */
        }
    }
    return NULL;                        /* its blocks in the pool stay live */
}

static void *free_some_and_exit(void *arg)
{
    uint64_t seed = (uintptr_t)arg;
    for (int i = 0; i < LEAVE_EACH; i++) {
        pthread_mutex_lock(&leave_lock);
        struct slot *s = &leave_pool[next_rand(&seed) % LEAVE_POOL];
        struct slot old = *s;
        s->p = NULL;
        pthread_mutex_unlock(&leave_lock);
        if (old.p) {
            if (!verify(&old))
                atomic_fetch_add(&leave_errors, 1);
            hakmem_free(old.p);         /* remote: this thread owns no segment */
        }
    }
    return NULL;
}

static void *free_pool_and_exit(void *arg)
{
    (void)arg;
    for (int i = 0; i < LEAVE_POOL; i++) {
        if (leave_pool[i].p) {
            if (!verify(&leave_pool[i]))
                atomic_fetch_add(&leave_errors, 1);
            hakmem_free(leave_pool[i].p);
            leave_pool[i].p = NULL;
        }
    }
    return NULL;
}

static void *sweep_without_pause(void *arg)
{
    (void)arg;
    while (atomic_load(&sweeping)) {
        hakmem_trim();
        hm_abandoned_sweep(2, false);
    }
    return NULL;
}

static void sweeps_race_exits_frees_and_adoption(void **state)
{
    (void)state;
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    pthread_t sweeper;
    atomic_store(&sweeping, true);
    pthread_create(&sweeper, NULL, sweep_without_pause, NULL);
    int rounds = scaled(100);
    for (int r = 0; r < rounds; r++) {
        pthread_t t[3];
        for (uintptr_t i = 0; i < 2; i++)
            pthread_create(&t[i], NULL, allocate_swap_and_exit, (void *)(r * 3 + i + 1));
        pthread_create(&t[2], NULL, free_some_and_exit, (void *)(uintptr_t)(r * 3 + 3));
        for (int i = 0; i < 3; i++)
            pthread_join(t[i], NULL);
    }
    atomic_store(&sweeping, false);
    pthread_join(sweeper, NULL);
    /* The last threads' blocks, freed by a thread that takes no segment
     * over: the trim's sweep gives their segments back. */
    run_thread(free_pool_and_exit, NULL);
    hakmem_trim();
    hakmem_stats(&s1);
    struct hm_heap_counters h;
    hm_heap_counters(&h);
    print_message("%d rounds: abandoned %llu, adopted %llu, swept %llu, segments %llu\n", rounds,
                  (unsigned long long)(s1.segments_abandoned - s0.segments_abandoned),
                  (unsigned long long)(s1.segments_adopted - s0.segments_adopted),
                  (unsigned long long)h.segments_swept, (unsigned long long)s1.segments);
    assert_int_equal(atomic_load(&leave_errors), 0);
    assert_true(s1.segments_abandoned - s0.segments_abandoned >= (uint64_t)rounds);
    assert_true(h.segments_swept > 0);
    /* Everything was freed and trimmed: what is left is this thread's. */
    assert_true(s1.segments <= s0.segments + 2);
}

static void *short_life(void *arg)
{
    void **handoff = arg;
    hakmem_free(*handoff);                  /* the previous thread's block */
    void *keep[64];
    for (int i = 0; i < 64; i++)
        keep[i] = hakmem_malloc(16 + (size_t)i * 40);
    for (int i = 0; i < 63; i++)
        hakmem_free(keep[i]);
    *handoff = keep[63];
    return NULL;
}

static void thread_churn_keeps_rss_bounded(void **state)
{
    (void)state;
    skip_unless_rss_meaningful();
    void *handoff = NULL;
    long rss_after_warmup = 0;
    struct hakmem_stats s;
    int threads = scaled(10000);
    for (int i = 0; i < threads; i++) {
        pthread_t t;
        pthread_create(&t, NULL, short_life, &handoff);
        pthread_join(t, NULL);
        if (i == threads / 10)
            rss_after_warmup = rss_kb();
    }
    hakmem_free(handoff);
    long rss_end = rss_kb();
    hakmem_stats(&s);
    /* 9000 more threads must not have grown what we hold. */
    assert_true(rss_end < rss_after_warmup + 4096);
    assert_true(s.segments <= 8 + 4);       /* the empty pool, and what runs */
}

/* Threads that each allocate a few hundred blocks, hand half of them on
 * to later threads through a pool (whose old blocks they free) and exit:
 * a server's short-lived workers.  Their segments, abandoned with live
 * blocks, are emptied mostly by other threads' frees, which only a sweep
 * or an adopter collects.  The later threads must reuse that room before
 * they map fresh segments: collected too slowly (a couple of segments a
 * quarter of the purge delay), the segments the pool's frees emptied sat
 * deep in the abandoned stack, behind those just abandoned, and the
 * process mapped half a megabyte more a thread, for good. */
enum { HANDOFF_POOL = 4096, HANDOFF_BATCH = 8 };
static struct slot handoff_pool[HANDOFF_POOL];
static pthread_mutex_t handoff_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int handoff_errors;

static void *allocate_hand_half_on_and_exit(void *arg)
{
    uint64_t seed = (uintptr_t)arg;
    struct slot mine[256];
    int n = 64 + (int)(next_rand(&seed) % 192);
    for (int i = 0; i < n; i++) {
        uint64_t r = next_rand(&seed);
        mine[i].n = r % 8 == 0 ? 16384 + (r >> 8) % 100000 : 16 + (r >> 8) % 2000;
        mine[i].tag = (unsigned)r;
        mine[i].p = hakmem_malloc(mine[i].n);
        stamp(&mine[i]);
    }
    for (int i = 0; i < n; i++) {
        struct slot old = mine[i];
        if (i & 1) {
            pthread_mutex_lock(&handoff_lock);
            struct slot *s = &handoff_pool[next_rand(&seed) % HANDOFF_POOL];
            old = *s;
            *s = mine[i];
            pthread_mutex_unlock(&handoff_lock);
        }
        if (old.p) {
            if (!verify(&old))
                atomic_fetch_add(&handoff_errors, 1);
            hakmem_free(old.p);
        }
    }
    return NULL;
}

static void handoff_threads(int first, int count)
{
    for (int t = first; t < first + count; t += HANDOFF_BATCH) {
        pthread_t th[HANDOFF_BATCH];
        for (uintptr_t i = 0; i < HANDOFF_BATCH; i++)
            pthread_create(&th[i], NULL, allocate_hand_half_on_and_exit,
                           (void *)(t + i + 1));
        for (int i = 0; i < HANDOFF_BATCH; i++)
            pthread_join(th[i], NULL);
    }
}

static void handed_on_blocks_leave_reusable_segments(void **state)
{
    (void)state;
    struct hakmem_stats warm, end;
    /* Not scaled down: after 50 threads the pool is still filling, and
     * the count grows with the live set whatever the sweeps do. */
    int threads = 2000;
    handoff_threads(0, threads / 2);
    hakmem_stats(&warm);
    handoff_threads(threads / 2, threads - threads / 2);
    hakmem_stats(&end);
    for (int i = 0; i < HANDOFF_POOL; i++) {
        if (handoff_pool[i].p && !verify(&handoff_pool[i]))
            atomic_fetch_add(&handoff_errors, 1);
        hakmem_free(handoff_pool[i].p);
        handoff_pool[i].p = NULL;
    }
    print_message("segments after %d threads: %llu, after %d: %llu\n", threads / 2,
                  (unsigned long long)warm.segments, threads, (unsigned long long)end.segments);
    assert_int_equal(atomic_load(&handoff_errors), 0);
    /* The pool's live set is steady after the first half (after the
     * first quarter it was still filling in some runs: 23 segments, then
     * 36 at the end, where most runs went from 27-31 to 32-36). */
    assert_true(end.segments <= warm.segments + warm.segments / 4 + 4);
}

static atomic_int busy_stop;

static void *busy(void *arg)
{
    uint64_t seed = (uintptr_t)arg;
    void *held[64] = { 0 };
    while (!atomic_load(&busy_stop)) {
        unsigned i = next_rand(&seed) % 64;
        hakmem_free(held[i]);
        held[i] = hakmem_malloc(rand_size(&seed));
    }
    for (int i = 0; i < 64; i++)
        hakmem_free(held[i]);
    return NULL;
}

static void fork_while_busy(void **state)
{
    (void)state;
    pthread_t t[3];
    for (uintptr_t i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, busy, (void *)(i + 1));
    for (int k = 0; k < scaled(50); k++) {
        pid_t pid = fork();
        if (pid == 0) {
            /* The child allocates, frees, starts a thread, and exits. */
            uint64_t seed = 9;
            void *p[100];
            for (int i = 0; i < 100; i++)
                p[i] = hakmem_malloc(rand_size(&seed));
            for (int i = 0; i < 100; i++)
                hakmem_free(p[i]);
            void *h = hakmem_malloc(10);
            /* Not under the sanitizers: TSan cannot start threads in such a
             * child, and ASan's own allocator keeps the lock a parent
             * thread held at the fork (the new thread's set-up frees
             * through it and waits for good, 1 to 5 runs in 30 here).  The
             * release and debug builds start the thread. */
#if !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
            pthread_t ct;
            pthread_create(&ct, NULL, short_life, &h);
            pthread_join(ct, NULL);
#endif
            hakmem_free(h);
            _exit(0);
        }
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
    atomic_store(&busy_stop, 1);
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
}

/* Fork handlers registered before hakmem's (another library's, set up by
 * its constructor before ours) run while our prepare handler holds every
 * allocator lock: their prepare after ours, their parent and child before
 * ours.  glibc's malloc works in them, and so must ours: these take every
 * such lock (reports, a large block, the segment registry).  They hung
 * the process (prepare, parent) or the child before the forking thread
 * skipped locks it holds. */
static atomic_int early_on, early_ran;

static void early_handler(void)
{
    if (!atomic_load(&early_on))
        return;
    struct hakmem_stats s;
    hakmem_stats(&s);                               /* heaps, abandoned */
    void *small = hakmem_malloc(100), *large = hakmem_malloc(3 << 20);
    memset(large, 1, 4096);
    hakmem_free(large);                             /* the large-block cache */
    hakmem_free(small);
    struct hm_segment_usage u;
    hm_segment_usage(&u);                           /* the registry */
    atomic_fetch_add(&early_ran, 1);
}

/* A thread the child handler starts allocates (heaps_lock, the large
 * cache) at once, while our child handler has yet to run: it waited for
 * ever on the locks the child handler re-initialised without waking it.
 * Not under the sanitizers, which cannot start threads in a fork child
 * (see fork_while_busy). */
static pthread_t early_thread;
static bool early_thread_made;

static atomic_int early_go;

static void *early_thread_body(void *arg)
{
    void *p = hakmem_malloc(100);
    hakmem_free(hakmem_malloc(3 << 20));
    while (!atomic_load(&early_go))     /* alive through our child handler */
        usleep(1000);
    hakmem_free(p);
    return arg;
}

/* A child handler may itself fork (glibc lets it): that fork's handlers
 * must leave the locks to ours of the outer fork, or the outer child's
 * thread started below would take heaps_lock early and our child handler
 * would count its live heap among the parent's. */
static int early_depth;     /* 1 in the nested fork's child */

static void early_child(void)
{
    if (!atomic_load(&early_on) || early_depth++)
        return;
    alarm(30);                  /* the child's own: a hang there dies of SIGALRM */
    early_handler();
    pid_t nested = fork();      /* runs early_handler as prepare and parent too */
    if (nested == 0) {
        hakmem_free(hakmem_malloc(100));
        _exit(0);
    }
    waitpid(nested, NULL, 0);
#if !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
    early_thread_made = pthread_create(&early_thread, NULL, early_thread_body, NULL) == 0;
    usleep(20000);              /* it waits on the locks before our handler runs */
#endif
}

__attribute__((constructor(101))) static void register_early_handlers(void)
{
    pthread_atfork(early_handler, early_handler, early_child);
}

static void fork_handlers_registered_before_ours_allocate(void **state)
{
    (void)state;
    hakmem_free(hakmem_malloc(3 << 20));            /* a block in the large cache */
    atomic_store(&early_on, 1);
    alarm(30);                                      /* a hang dies of SIGALRM */
    pid_t pid = fork();
    if (pid == 0) {
        void *p = hakmem_malloc(5000);
        hakmem_free(p);
        atomic_store(&early_go, 1);
        if (early_thread_made)
            pthread_join(early_thread, NULL);
        struct hakmem_stats s;
        hakmem_stats(&s);
        if (s.threads_live != 1)    /* this thread's heap, and none of the one joined */
            _exit(4);
        /* prepare, child, and the nested fork's prepare and parent */
        _exit(atomic_load(&early_ran) == 4 ? 0 : 3);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    alarm(0);
    atomic_store(&early_on, 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(atomic_load(&early_ran), 2);  /* prepare, parent */
}

/* A fork child gives up the segments of its parent's other threads (at
 * a tidying step or a trim): its frees into them are then collected, and
 * their emptied segments reused or given back.  Before, those frees went
 * to spans that no thread of the child ever collected. */
enum { FORKED_BLOCKS = 32768, FORKED_SIZE = 256 };     /* 8 MiB: two segments at least */
static void **forked_blocks;
static pthread_barrier_t forked_ready, forked_done;

static void *hold_blocks(void *arg)
{
    for (int i = 0; i < FORKED_BLOCKS; i++)
        forked_blocks[i] = hakmem_malloc(FORKED_SIZE);
    pthread_barrier_wait(&forked_ready);
    pthread_barrier_wait(&forked_done);
    for (int i = 0; i < FORKED_BLOCKS; i++)
        hakmem_free(forked_blocks[i]);
    return arg;
}

static void free_parent_threads_blocks(void)
{
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    for (int i = 0; i < FORKED_BLOCKS; i++)
        hakmem_free(forked_blocks[i]);
    hakmem_trim();
    hakmem_stats(&s1);
    fprintf(stderr, "segments %llu -> %llu\n", (unsigned long long)s0.segments,
            (unsigned long long)s1.segments);
    _exit(s1.segments + 2 <= s0.segments ? 0 : 3);
}

static void fork_child_gives_up_other_threads_segments(void **state)
{
    (void)state;
    forked_blocks = hakmem_malloc(FORKED_BLOCKS * sizeof *forked_blocks);
    pthread_barrier_init(&forked_ready, NULL, 2);
    pthread_barrier_init(&forked_done, NULL, 2);
    pthread_t t;
    pthread_create(&t, NULL, hold_blocks, NULL);
    pthread_barrier_wait(&forked_ready);
    char buf[256];
    int status = run_child(free_parent_threads_blocks, buf, sizeof buf);
    pthread_barrier_wait(&forked_done);
    pthread_join(t, NULL);
    hakmem_free(forked_blocks);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("child: status %d: %s", status, buf);
}

/* A fork child has only the forking thread: the registry forgets the
 * other threads' heaps (their caches lived in threads the child does not
 * have), so reports count one live thread, and neither reports nor the
 * purge's tidying of idle heaps reach the parent's other threads' caches
 * (the tidier once read them and crashed the child). */
enum { STASHERS = 4 };
static pthread_barrier_t stashed, fork_done;

static void *stash_and_wait(void *arg)
{
    (void)arg;
    void *p[64];
    for (int i = 0; i < 64; i++)
        p[i] = hakmem_malloc(2000);
    for (int i = 0; i < 64; i++)
        hakmem_free(p[i]);      /* the bin overflows: its newer half goes to the stash */
    pthread_barrier_wait(&stashed);
    pthread_barrier_wait(&fork_done);
    return NULL;
}

static void *alloc_once(void *arg)
{
    hakmem_free(hakmem_malloc((size_t)(uintptr_t)arg));
    return NULL;
}

static void fork_child_forgets_other_threads_heaps(void **state)
{
    (void)state;
    pthread_t t[STASHERS];
    pthread_barrier_init(&stashed, NULL, STASHERS + 1);
    pthread_barrier_init(&fork_done, NULL, STASHERS + 1);
    for (int i = 0; i < STASHERS; i++)
        pthread_create(&t[i], NULL, stash_and_wait, NULL);
    pthread_barrier_wait(&stashed);
    hakmem_free(hakmem_malloc(100));        /* this thread has a heap */
    struct hakmem_stats parent;
    hakmem_stats(&parent);
    assert_true(parent.threads_live >= STASHERS + 1);
    pid_t pid = fork();
    if (pid == 0) {
        struct hakmem_stats child;
        hakmem_stats(&child);
        if (child.threads_live != 1)
            _exit(10);
#if !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
        for (uintptr_t k = 0; k < 4; k++) {     /* new threads reuse the dead ones' stacks */
            pthread_t x;
            pthread_create(&x, NULL, alloc_once, (void *)(100 + k));
            pthread_join(x, NULL);
        }
#endif
        /* Slow paths past a short purge delay: the purge tidies idle heaps. */
        hm_options.purge_delay_ns = 5000000;
        void *q[256] = { 0 };
        struct timespec nap = { 0, 1000000 };
        for (int r = 0; r < 40; r++) {
            for (int i = 0; i < 256; i++) {
                hakmem_free(q[i]);
                q[i] = hakmem_malloc(16 + (size_t)(r * 37 + i * 101) % 20000);
            }
            for (unsigned c = 0; c < hakmem_class_count(); c++) {
                struct hakmem_class_info ci;
                hakmem_class_info(c, &ci);
            }
            nanosleep(&nap, NULL);
        }
        for (int i = 0; i < 256; i++)
            hakmem_free(q[i]);
        _exit(0);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    pthread_barrier_wait(&fork_done);
    for (int i = 0; i < STASHERS; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&stashed);
    pthread_barrier_destroy(&fork_done);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

/* A key destructor that allocates in every round, past glibc's last:
 * the thread gets a heap again after its exit, for each allocation.  No
 * heap may stay (nothing would exit one attached in the last round: each
 * such thread once left a heap and a segment behind), and reports must
 * not read a dead thread's cache (they once crashed here). */
enum { LATE = 8 };
static pthread_key_t late_key;

static void late_dtor(void *v)
{
    long round = (long)v;
    void *p[64];
    for (int i = 0; i < 64; i++)
        p[i] = hakmem_malloc(2000);
    for (int i = 0; i < 64; i++)
        hakmem_free(p[i]);
    if (round < 8)
        pthread_setspecific(late_key, (void *)(round + 1));
}

/* A thread that allocates once, then gives *key a value (its destructor
 * runs at the thread's exit). */
static void *set_key(void *key)
{
    hakmem_free(hakmem_malloc(10));
    pthread_setspecific(*(pthread_key_t *)key, (void *)1);
    return NULL;
}

/* A test of key destructors that run after hakmem's: its key created
 * after hakmem's exit key, and the counters before. */
static void key_after_ours(pthread_key_t *key, void (*dtor)(void *), struct hakmem_stats *s0)
{
#ifdef __SANITIZE_THREAD__      /* TSan's own state of a thread is gone by its late rounds */
    skip();
#endif
    hakmem_free(hakmem_malloc(1));          /* hakmem's exit key comes first */
    assert_int_equal(pthread_key_create(key, dtor), 0);
    hakmem_stats(s0);
}

static void allocation_after_the_last_destructor_round(void **state)
{
    (void)state;
    struct hakmem_stats s0, s1;
    key_after_ours(&late_key, late_dtor, &s0);
    pthread_t t[LATE];
    for (int i = 0; i < LATE; i++)
        pthread_create(&t[i], NULL, set_key, &late_key);
    for (int i = 0; i < LATE; i++)
        pthread_join(t[i], NULL);
    for (int r = 0; r < 20; r++) {
        for (uintptr_t i = 0; i < LATE; i++) {     /* reuse the dead threads' memory */
            pthread_t x;
            pthread_create(&x, NULL, alloc_once, (void *)(100 + i));
            pthread_join(x, NULL);
        }
        for (unsigned c = 0; c < hakmem_class_count(); c++) {
            struct hakmem_class_info ci;
            hakmem_class_info(c, &ci);
            assert_true(ci.blocks_cached < 100000);
        }
    }
    hakmem_stats(&s1);
    assert_int_equal(s1.threads_live, s0.threads_live);
    assert_int_equal(s1.threads_exited, s0.threads_exited + LATE + 20 * LATE);
    assert_true(s1.segments <= s0.segments + 1);
    pthread_key_delete(late_key);
}

/* Key destructors run after ours (our key is among the first) allocate
 * from the heap for exited threads: no heap's set-up and exit at each
 * allocation (1.3 us each), no thread exit counted for them, nothing
 * abandoned.  Also for a thread whose first allocation of all comes in a
 * destructor, in every round: its heap, attached in the first round, goes
 * at our exit in the second, and none is left after the last (one that
 * stayed until "the next round" leaked a heap and a segment a thread). */
enum { DTOR_BLOCKS = 2000 };
static pthread_key_t dtor_key;

static void allocating_dtor(void *v)
{
    long round = (long)v;
    for (int i = 0; i < DTOR_BLOCKS; i++)
        hakmem_free(hakmem_malloc(64 + (size_t)i % 512));
    if (round < 4)                          /* glibc's rounds, all of them */
        pthread_setspecific(dtor_key, (void *)(round + 1));
}

static void *set_dtor_key_only(void *arg)
{
    pthread_setspecific(dtor_key, (void *)1);
    return arg;
}

/* A thread that gives *key a value and never allocates. */
static void *set_dtor_key_only_of(void *key)
{
    pthread_setspecific(*(pthread_key_t *)key, (void *)1);
    return NULL;
}

static void allocation_in_key_destructors_after_ours(void **state)
{
    (void)state;
    struct hakmem_stats s0, s1;
    key_after_ours(&dtor_key, allocating_dtor, &s0);
    for (int i = 0; i < 4; i++) {
        run_thread(set_key, &dtor_key);         /* allocated before its exit */
        run_thread(set_dtor_key_only, NULL);    /* first allocates in a destructor */
    }
    hakmem_stats(&s1);
    assert_int_equal(s1.threads_live, s0.threads_live);
    assert_int_equal(s1.threads_exited, s0.threads_exited + 8);
    assert_true(s1.segments_abandoned - s0.segments_abandoned <= 8);
    assert_true(s1.segments <= s0.segments + 2);
    /* What that heap's bins hold goes back at a trim, as a thread's own. */
    uint32_t held = 0;
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
        held += hm_bin_count(&hm_exited_tcache.bins[c]);
    assert_true(held > 0);
    hakmem_trim();
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
        assert_int_equal(hm_bin_count(&hm_exited_tcache.bins[c]), 0);
    pthread_key_delete(dtor_key);
}

/* A thread whose first allocation of all comes in glibc's last round of
 * key destructors attaches a heap that no exit of ours follows (no round
 * follows for hakmem's exit key).  Reports must not read its cache, which
 * is in the thread's TLS: here on a stack the test unmaps once the thread
 * is joined (reports read it, and crashed, before they read the counts
 * each thread notes at its slow paths).  The heap stays until the tidier
 * finds it idle and its thread gone, and exits it: not before (reports
 * then), and not the heap of a thread that is only idle, nor the heap of
 * this process's thread, which was forked (its parent's thread id is not
 * one here). */
enum { GONE = 4, GONE_STACK = 256 << 10 };
static pthread_key_t gone_key;

/* A key destructor's round: false (and the key set again, for the next
 * round) until glibc's last, the 4th. */
static bool last_round(pthread_key_t key, void *v)
{
    long round = (long)v;
    if (round < 4)
        pthread_setspecific(key, (void *)(round + 1));
    return round >= 4;
}

/* Runs a thread that only sets `key`, on a stack of its own (returned,
 * for the caller to unmap once reports no longer read it), to its end. */
static void *run_key_thread(pthread_key_t *key)
{
    void *stack = mmap(NULL, GONE_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstack(&attr, stack, GONE_STACK);
    pthread_t t;
    pthread_create(&t, &attr, set_dtor_key_only_of, key);
    pthread_join(t, NULL);
    pthread_attr_destroy(&attr);
    return stack;
}

static void last_round_dtor(void *v)
{
    if (!last_round(gone_key, v))
        return;
    void *p[100];
    for (int i = 0; i < 100; i++)
        p[i] = hakmem_malloc(100);
    for (int i = 0; i < 100; i++)
        hakmem_free(p[i]);
}

static pthread_barrier_t idle_barrier;

static void *allocate_and_idle(void *arg)
{
    void *p[100];
    for (int i = 0; i < 100; i++)
        p[i] = hakmem_malloc(100 + (size_t)i);
    pthread_barrier_wait(&idle_barrier);
    pthread_barrier_wait(&idle_barrier);
    for (int i = 0; i < 100; i++)
        hakmem_free(p[i]);
    return arg;
}

static uint64_t all_blocks_cached(void)
{
    uint64_t n = 0;
    for (unsigned c = 0; c < hakmem_class_count(); c++) {
        struct hakmem_class_info ci;
        assert_int_equal(hakmem_class_info(c, &ci), 0);
        n += ci.blocks_cached;
    }
    return n;
}

static void reports_after_last_round_threads(void)
{
    hakmem_free(hakmem_malloc(1));          /* hakmem's exit key comes first */
    pthread_key_create(&gone_key, last_round_dtor);
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    uint64_t base = all_blocks_cached();
    void *stacks[GONE];
    for (int i = 0; i < GONE; i++)
        stacks[i] = run_key_thread(&gone_key);
    hakmem_stats(&s1);
    if (s1.threads_live != s0.threads_live + GONE)  /* the case this test is about */
        _exit(3);
    uint64_t before = all_blocks_cached();
    if (before <= base)                     /* their bins count, as last noted */
        _exit(4);
    for (int i = 0; i < GONE; i++)
        munmap(stacks[i], GONE_STACK);
    if (all_blocks_cached() != before)
        _exit(5);

    pthread_barrier_init(&idle_barrier, NULL, 2);
    pthread_t idle;
    pthread_create(&idle, NULL, allocate_and_idle, NULL);
    pthread_barrier_wait(&idle_barrier);    /* it allocated; now it waits */
    struct hm_heap_counters h0, h1;
    hm_heap_counters(&h0);
    for (int pass = 0; pass < 3; pass++)   /* the first notes them idle */
        hm_heaps_tidy_idle(0);
    hm_heap_counters(&h1);
    hakmem_stats(&s1);
    if (h1.heaps_orphaned - h0.heaps_orphaned != GONE)
        _exit(6);
    if (s1.threads_live != s0.threads_live + 1 || s1.threads_exited != s0.threads_exited + GONE)
        _exit(7);
    pthread_barrier_wait(&idle_barrier);    /* its heap still works */
    pthread_join(idle, NULL);
    hakmem_free(hakmem_malloc(100));
    hakmem_stats(&s1);
    if (s1.threads_live != s0.threads_live || s1.threads_exited != s0.threads_exited + GONE + 1)
        _exit(8);
}

static void heaps_of_gone_threads(void **state)
{
    (void)state;
#ifdef __SANITIZE_THREAD__      /* TSan's own state of a thread is gone by its late rounds */
    skip();
#endif
    char buf[256];
    expect_exit(reports_after_last_round_threads, 0, buf, sizeof buf);
}

/* Frees into a draining bin wait in a batch in the heap (drain_defer):
 * when the heap's thread is gone without an exit of ours, the tidier
 * that exits the heap puts them back, so their spans can empty. */
static pthread_key_t drain_key;
static uint32_t gone_pending;
static pid_t gone_tid;

static void draining_last_round_dtor(void *v)
{
    if (!last_round(drain_key, v))
        return;
    enum { DCLS = 2, SIZE = 48, N = 4000 };
    static void *blocks[N];
    for (int i = 0; i < N; i++)
        blocks[i] = hakmem_malloc(SIZE);
    struct hm_tcache *tc = hm_tcache_self();
    int i = 0;
    while (i < N && tc->bins[DCLS].cap != HM_BIN_DRAINING)
        hakmem_free(blocks[i++]);
    while (i < N && tc->heap->drained_count != 5)
        hakmem_free(blocks[i++]);
    gone_pending = tc->heap->drained_count;     /* the rest stay live */
    gone_tid = (pid_t)syscall(SYS_gettid);
}

static void drained_batch_of_a_gone_thread(void)
{
    hakmem_free(hakmem_malloc(1));          /* hakmem's exit key comes first */
    pthread_key_create(&drain_key, draining_last_round_dtor);
    void *stack = run_key_thread(&drain_key);
    if (gone_pending != 5)
        _exit(3);
    /* The kernel clears the joined thread's id before the thread is gone
     * for tgkill; a tidier that still found it would leave its heap. */
    for (int i = 0; i < 100000 && syscall(SYS_tgkill, getpid(), gone_tid, 0) == 0; i++)
        sched_yield();
    struct hakmem_class_info c0, c1;
    struct hm_heap_counters h0, h1;
    hakmem_class_info(2, &c0);
    hm_heap_counters(&h0);
    for (int pass = 0; pass < 3; pass++)   /* the first notes it idle */
        hm_heaps_tidy_idle(0);
    hm_heap_counters(&h1);
    hakmem_class_info(2, &c1);
    if (h1.heaps_orphaned != h0.heaps_orphaned + 1)
        _exit(4);
    if (c1.blocks_drained != c0.blocks_drained + 5)
        _exit(5);
    munmap(stack, GONE_STACK);
}

static void drained_frees_of_gone_threads_go_back(void **state)
{
    (void)state;
#ifdef __SANITIZE_THREAD__      /* as heaps_of_gone_threads */
    skip();
#endif
    char buf[256];
    expect_exit(drained_batch_of_a_gone_thread, 0, buf, sizeof buf);
}

/* A vfork child shares our memory, not our thread ids: a tidier that ran
 * there (any malloc slow path of the child's) found every idle thread of
 * ours gone and exited its heap under it. */
static void idle_threads_stay_in_a_vfork_child(void **state)
{
    (void)state;
    pthread_barrier_init(&idle_barrier, NULL, 2);
    pthread_t idle;
    pthread_create(&idle, NULL, allocate_and_idle, NULL);
    pthread_barrier_wait(&idle_barrier);    /* it allocated; now it waits */
    hm_heaps_tidy_idle(0);                  /* notes it idle */
    struct hm_heap_counters h0, h1;
    hm_heap_counters(&h0);
    pid_t pid = vfork();
    if (pid == 0) {
        hm_heaps_tidy_idle(0);
        hm_heaps_tidy_idle(0);
        _exit(0);
    }
    waitpid(pid, NULL, 0);
    hm_heap_counters(&h1);
    assert_int_equal(h1.heaps_orphaned, h0.heaps_orphaned);
    assert_int_equal(h1.threads_live, h0.threads_live);
    pthread_barrier_wait(&idle_barrier);    /* its frees find its heap */
    pthread_join(idle, NULL);
    pthread_barrier_destroy(&idle_barrier);
}

/* A signal handler that allocates, on a thread that allocates after its
 * exit: each of those allocations takes the heap for exited threads,
 * which the handler must not find halfway through one (with signals not
 * blocked there, the child died of a broken list in every run). */
static pthread_key_t sig_key;
static atomic_int sig_in_dtor, sig_done;

static void alloc_in_handler(int sig)
{
    (void)sig;
    hakmem_free(hakmem_malloc(48));
}

static void busy_dtor(void *v)
{
    (void)v;
    atomic_store(&sig_in_dtor, 1);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        for (int i = 0; i < 1000; i++)
            hakmem_free(hakmem_malloc(16 + (size_t)i * 7 % 4000));
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) < 1000000000L);
    atomic_store(&sig_done, 1);
}

static void signals_while_allocating_after_exit(void)
{
    alarm(20);                              /* a hang dies of SIGALRM */
    struct sigaction sa = { .sa_handler = alloc_in_handler };
    sigaction(SIGUSR1, &sa, NULL);
    hakmem_free(hakmem_malloc(1));          /* hakmem's exit key comes first */
    pthread_key_create(&sig_key, busy_dtor);
    pthread_t t;
    pthread_create(&t, NULL, set_key, &sig_key);
    while (!atomic_load(&sig_in_dtor))
        usleep(100);
    while (!atomic_load(&sig_done)) {
        pthread_kill(t, SIGUSR1);
        usleep(200);
    }
    pthread_join(t, NULL);
}

static void signal_handler_allocates_after_thread_exit(void **state)
{
    (void)state;
#ifdef __SANITIZE_THREAD__      /* TSan's own state of a thread is gone by its late rounds */
    skip();
#endif
    char buf[256];
    expect_exit(signals_while_allocating_after_exit, 0, buf, sizeof buf);
}

/* A thread whose very first call is free(): its cache is not set up, so
 * no page can look like its own, whatever the block (small, a page
 * block, a large one).  Each goes back to its owner or the OS, and the
 * thread's own blocks work afterwards. */
static void *free_first(void *arg)
{
    void **blocks = arg;
    for (int i = 0; i < 3; i++)
        hakmem_free(blocks[i]);
    void *mine = hakmem_malloc(48);
    memset(mine, 1, 48);
    hakmem_free(mine);
    return NULL;
}

static void first_call_is_free(void **state)
{
    (void)state;
    void *blocks[3] = { hakmem_malloc(24), hakmem_malloc(300000), hakmem_malloc(8 << 20) };
    for (int i = 0; i < 3; i++)
        assert_non_null(blocks[i]);
    pthread_t t;
    pthread_create(&t, NULL, free_first, blocks);
    pthread_join(t, NULL);
    /* Nothing aborted, and this thread allocates on. */
    void *again = hakmem_malloc(24);
    assert_non_null(again);
    hakmem_free(again);
}

/* ---- double frees across threads end with a diagnostic -------------- */

static void *free_it(void *p)
{
    hakmem_free(p);
    return NULL;
}

static void free_on_thread(void *p)
{
    pthread_t t;
    pthread_create(&t, NULL, free_it, p);
    pthread_join(t, NULL);     /* its exit sends its batch of remote frees */
}

static void remote_free_twice(void)
{
    void *p = hakmem_malloc(40);
    free_on_thread(p);
    free_on_thread(p);
}

static void local_then_remote(void)
{
    void *p = hakmem_malloc(40);
    hakmem_free(p);
    free_on_thread(p);
}

static void remote_then_local(void)
{
    void *p = hakmem_malloc(40);
    free_on_thread(p);
    hakmem_free(p);
}

static void remote_page_block_twice(void)
{
    void *p = hakmem_malloc(300000);
    free_on_thread(p);
    free_on_thread(p);
}

/* A second free by another thread of a block waiting, unread, in its
 * owner's drained batch: the other thread finds no free key, so the block
 * goes to its span's remote list too.  Its span holds nothing else, and
 * the pages below are pinned, so that once a collection counts the remote
 * free, the span empties and a page block starts at the block.  The owner
 * must meet the block at its batch's put before that collection: else
 * the put would free the live page block, and the next malloc of its
 * size would hand it out again. */
static void *drained_victim;
static atomic_int drained_victim_go;

static void *free_drained_victim(void *arg)
{
    (void)arg;
    while (!atomic_load(&drained_victim_go))
        sched_yield();
    hakmem_free(drained_victim);
    return NULL;
}

/* Frees the victim into its draining class's batch, then has the other
 * thread free it again and exit. */
static void drained_victim_freed_twice(void)
{
    enum { N = 12 * 1024 };
    static void *blk[N];
    pthread_t b;                        /* first: its start allocates */
    pthread_create(&b, NULL, free_drained_victim, NULL);
    for (int i = 0; i < N; i++)
        blk[i] = hakmem_malloc(64);
    /* A block at a page's start, past the first page (where earlier
     * tests' blocks of the class may be): a span of its own.  Should the
     * layout have none, any block still tests the diagnostic. */
    int victim = N / 2;
    for (int i = N / 4; i < N; i++) {
        if (((uintptr_t)blk[i] & (HM_PAGE_SIZE - 1)) == 0) {
            victim = i;
            break;
        }
    }
    uintptr_t page = (uintptr_t)blk[victim] >> HM_PAGE_SHIFT;
    static bool pinned[64];
    for (int i = 0; i < N; i++) {
        uintptr_t pg = (uintptr_t)blk[i] >> HM_PAGE_SHIFT;
        if (i == victim || (pg < page && pg + 64 > page && !pinned[page - pg])) {
            pinned[page - pg] = true;
            continue;
        }
        hakmem_free(blk[i]);
    }
    hakmem_trim();
    drained_victim = blk[victim];
    hakmem_free(drained_victim);        /* into the draining class's batch */
    struct hm_heap *h = hm_tcache_self()->heap;
    if (!h->drained_count || h->drained[h->drained_count - 1] != drained_victim)
        _exit(4);                       /* not waiting in the batch: no test */
    atomic_store(&drained_victim_go, 1);
    pthread_join(b, NULL);              /* its exit sends its remote frees */
}

/* Where a signal handler's calls run, played by the marks they would
 * find: none; in a drain_defer (busy); in the put of the batch that
 * holds the victim (the batch taken, the put under way). */
enum handler_at { NO_HANDLER, IN_A_DEFER, IN_A_PUT };

static void handler_enter(struct hm_heap *h, enum handler_at at)
{
    h->drained_busy = at == IN_A_DEFER;
    h->drained_putting = at == IN_A_PUT;
    if (at == IN_A_PUT)
        h->drained_count--;             /* the victim, last in: taken by the put */
}

static void handler_leave(struct hm_heap *h, enum handler_at at)
{
    if (at == IN_A_PUT)
        h->drained_count++;
    h->drained_busy = 0;
    h->drained_putting = 0;
}

/* A page block's malloc (which collects remote frees; after a trim of
 * the caller's own, which collects too, when `trims`), then the batch's
 * put (the trim), then the same malloc again. */
static void page_blocks_around_the_put(enum handler_at at, bool trims)
{
    struct hm_heap *h = hm_tcache_self()->heap;
    handler_enter(h, at);
    if (trims)
        hakmem_trim();
    void *q = hakmem_malloc(150000);
    handler_leave(h, at);
    hakmem_trim();
    void *r = hakmem_malloc(150000);
    if (r == q)
        _exit(3);                       /* one live block, handed out twice */
}

static void drained_then_remote(void)
{
    drained_victim_freed_twice();
    page_blocks_around_the_put(NO_HANDLER, false);
}

/* The same when the page block's malloc is a handler's, which may not
 * put the batch (or whose put is the one it interrupted): it must not
 * collect either, nor a trim before it. */
static void drained_then_remote_then_a_handler(void)
{
    drained_victim_freed_twice();
    page_blocks_around_the_put(IN_A_DEFER, false);
}

static void drained_then_remote_then_a_handler_in_the_put(void)
{
    drained_victim_freed_twice();
    page_blocks_around_the_put(IN_A_PUT, false);
}

static void drained_then_remote_then_a_handler_trims(void)
{
    drained_victim_freed_twice();
    page_blocks_around_the_put(IN_A_DEFER, true);
}

/* The first free of each is fine: the block is live. */
static void remote_frees_of_reused_blocks(void)
{
    for (int i = 0; i < 1000; i++) {
        void *p = hakmem_malloc(40 + (size_t)(i % 3) * 300000);
        free_on_thread(p);
    }
}

/* Two threads free one large block at once.  The later of the two finds
 * it unregistered ("invalid pointer"), or, when both found it registered,
 * loses the exchange that unregisters it ("double free detected"); both
 * getting through cached it twice, and the next two mallocs of its size
 * returned the same block (about one race in twelve here). */
static atomic_int race_ready, race_go;

/* Spins rather than sleeps at the start line: a thread woken from a
 * futex comes microseconds late, and the two frees never meet. */
static void *free_at_the_start(void *p)
{
    atomic_fetch_add(&race_ready, 1);
    while (!atomic_load(&race_go))
        ;
    hakmem_free(p);
    return NULL;
}

static void large_freed_by_two_at_once(void)
{
    hakmem_free(hakmem_malloc(3u << 20));       /* the cache holds one: the frees' puts are alike */
    char *p = hakmem_malloc(3u << 20);
    memset(p, 1, 4096);
    pthread_t t;
    pthread_create(&t, NULL, free_at_the_start, p);
    while (!atomic_load(&race_ready))
        ;
    atomic_store(&race_go, 1);
    hakmem_free(p);
    pthread_join(t, NULL);
    void *a = hakmem_malloc(3u << 20), *b = hakmem_malloc(3u << 20);
    fprintf(stderr, "both frees passed: %p and %p\n", a, b);
    _exit(1);
}

static void large_block_freed_by_two_threads_at_once(void **state)
{
    (void)state;
#ifdef __SANITIZE_THREAD__      /* TSan cannot start threads in a forked child */
    skip();
#endif
    int races = 0;
    for (int i = 0; i < 200; i++) {
        char buf[512];
        int status = run_child(large_freed_by_two_at_once, buf, sizeof buf);
        if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGABRT || !strstr(buf, "hakmem: free(): "))
            fail_msg("child %d: status %#x: %s", i, status, buf);
        races += strstr(buf, "double free detected") != NULL;
    }
    print_message("200 children: %d frees met at once\n", races);
}

static void double_frees_across_threads_abort(void **state)
{
    (void)state;
#ifdef __SANITIZE_THREAD__      /* TSan cannot start threads in a forked child */
    skip();
#endif
    expect_abort(remote_free_twice, "hakmem: free(): double free detected 0x");
    expect_abort(local_then_remote, "hakmem: free(): double free detected 0x");
    expect_abort(remote_then_local, "hakmem: free(): double free detected 0x");
    expect_abort(remote_page_block_twice, "hakmem: free(): ");
    expect_abort(drained_then_remote, "hakmem: free(): double free detected 0x");
    expect_abort(drained_then_remote_then_a_handler, "hakmem: free(): double free detected 0x");
    expect_abort(drained_then_remote_then_a_handler_in_the_put,
                 "hakmem: free(): double free detected 0x");
    expect_abort(drained_then_remote_then_a_handler_trims,
                 "hakmem: free(): double free detected 0x");
    char buf[512];
    expect_exit(remote_frees_of_reused_blocks, 0, buf, sizeof buf);
    assert_string_equal(buf, "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(stress_no_overlap),
        cmocka_unit_test(shrinking_phases_no_overlap),
        cmocka_unit_test(idle_and_busy_threads_no_overlap),
        cmocka_unit_test(cross_thread_frees_at_volume),
        cmocka_unit_test(first_call_is_free),
        cmocka_unit_test(frees_after_thread_exit_leave_no_heap),
        cmocka_unit_test(double_frees_across_threads_abort),
        cmocka_unit_test(large_block_freed_by_two_threads_at_once),
        cmocka_unit_test(thread_churn_keeps_rss_bounded),
        cmocka_unit_test(sweeps_race_exits_frees_and_adoption),
        cmocka_unit_test(handed_on_blocks_leave_reusable_segments),
        cmocka_unit_test(fork_while_busy),
        cmocka_unit_test(fork_handlers_registered_before_ours_allocate),
        cmocka_unit_test(fork_child_gives_up_other_threads_segments),
        cmocka_unit_test(fork_child_forgets_other_threads_heaps),
        cmocka_unit_test(allocation_after_the_last_destructor_round),
        cmocka_unit_test(allocation_in_key_destructors_after_ours),
        cmocka_unit_test(signal_handler_allocates_after_thread_exit),
        cmocka_unit_test(heaps_of_gone_threads),
        cmocka_unit_test(drained_frees_of_gone_threads_go_back),
        cmocka_unit_test(idle_threads_stay_in_a_vfork_child),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
