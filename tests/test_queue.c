/* Queue box tests: FIFO order, drop-on-full (Contract A), wraparound, many
 * producers with the consumer paused or draining, and no allocation on the
 * push/drain paths (Contract C).  Must also pass under -fsanitize=thread. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "queue/queue.h"

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define TQ_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define TQ_SANITIZER 1
#endif
#endif

#define CAP HM_QUEUE_CAPACITY
#define NPROD 4

/* Contract C: the ring is a fixed array owned by the queue, declared
 * statically by its owner; the tests use a static queue like the ACE box. */
static struct hm_queue q;

_Static_assert(sizeof(((struct hm_queue *)0)->slots) ==
               HM_QUEUE_CAPACITY * sizeof(struct hm_queue_slot),
               "the ring is the fixed array inside struct hm_queue");

static struct hm_event make_event(uint32_t producer, uint64_t seq)
{
    struct hm_event ev = {
        .size_class = producer,
        .refill_count = (uint32_t)seq,
        .interval_ns = seq,
        .blocks_flushed = (uint32_t)(seq * 7u + producer),
        .remote_collected = (uint32_t)~seq,
    };
    return ev;
}

static void check_event(const struct hm_event *ev, uint32_t producer, uint64_t seq)
{
    assert_int_equal(ev->size_class, producer);
    assert_int_equal(ev->refill_count, (uint32_t)seq);
    assert_int_equal(ev->interval_ns, seq);
    assert_int_equal(ev->blocks_flushed, (uint32_t)(seq * 7u + producer));
    assert_int_equal(ev->remote_collected, (uint32_t)~seq);
}

static int setup(void **state)
{
    (void)state;
    hm_queue_init(&q);
    return 0;
}

static struct hm_event buf[CAP];

/* One producer: events come out in push order, with their content. */
static void test_queue_fifo_single_producer(void **state)
{
    (void)state;
    for (uint64_t i = 0; i < 1000; i++) {
        struct hm_event ev = make_event(3, i);
        assert_true(hm_queue_push(&q, &ev));
    }
    assert_int_equal(hm_queue_pushed(&q), 1000);
    assert_int_equal(hm_queue_dropped(&q), 0);

    /* Partial drains keep the order. */
    size_t n = hm_queue_drain(&q, buf, 10);
    assert_int_equal(n, 10);
    for (uint64_t i = 0; i < 10; i++)
        check_event(&buf[i], 3, i);
    n = hm_queue_drain(&q, buf, CAP);
    assert_int_equal(n, 990);
    for (uint64_t i = 0; i < 990; i++)
        check_event(&buf[i], 3, i + 10);
    assert_int_equal(hm_queue_drain(&q, buf, CAP), 0);
}

/* A ring in zeroed static memory is empty and ready without hm_queue_init
 * (the ACE thread's ring is never initialised in a fresh process), over
 * more than one lap; and init puts a used ring back in that state. */
static struct hm_queue zeroed;

static void test_queue_zeroed_is_empty(void **state)
{
    (void)state;
    assert_int_equal(hm_queue_drain(&zeroed, buf, CAP), 0);
    for (uint64_t lap = 0; lap < 2; lap++) {
        for (uint64_t i = 0; i < CAP; i++) {
            struct hm_event ev = make_event(1, lap * CAP + i);
            assert_true(hm_queue_push(&zeroed, &ev));
        }
        struct hm_event ev = make_event(1, 0);
        assert_false(hm_queue_push(&zeroed, &ev));          /* full */
        assert_int_equal(hm_queue_drain(&zeroed, buf, CAP), CAP);
        for (uint64_t i = 0; i < CAP; i++)
            check_event(&buf[i], 1, lap * CAP + i);
    }
    struct hm_event ev = make_event(2, 5);
    assert_true(hm_queue_push(&zeroed, &ev));
    hm_queue_init(&zeroed);
    assert_int_equal(hm_queue_drain(&zeroed, buf, CAP), 0);
    for (size_t i = 0; i < CAP; i++)
        assert_int_equal(zeroed.slots[i].seq, 0);       /* all zeros again */
}

/* Contract A: a full ring drops and counts; it never blocks. */
static void test_queue_full_drops(void **state)
{
    (void)state;
    for (uint64_t i = 0; i < CAP; i++) {
        struct hm_event ev = make_event(1, i);
        assert_true(hm_queue_push(&q, &ev));
    }
    struct hm_event extra = make_event(1, CAP);
    assert_false(hm_queue_push(&q, &extra));
    assert_int_equal(hm_queue_dropped(&q), 1);
    assert_int_equal(hm_queue_pushed(&q), CAP);

    /* The dropped event is not in the ring; the rest is intact. */
    assert_int_equal(hm_queue_drain(&q, buf, CAP), CAP);
    for (uint64_t i = 0; i < CAP; i++)
        check_event(&buf[i], 1, i);
    assert_int_equal(hm_queue_drain(&q, buf, CAP), 0);

    /* After a drain, pushes succeed again. */
    assert_true(hm_queue_push(&q, &extra));
    assert_int_equal(hm_queue_drain(&q, buf, CAP), 1);
    check_event(&buf[0], 1, CAP);
    assert_int_equal(hm_queue_dropped(&q), 1);
    assert_int_equal(hm_queue_pushed(&q), CAP + 1);
}

/* Many laps of the ring with batches of every size, overflowing some. */
static void test_queue_wraparound(void **state)
{
    (void)state;
    uint64_t next_in = 0, next_out = 0, drops = 0, pushes = 0;
    uint32_t rng = 12345;

    for (int round = 0; round < 2000; round++) {
        rng = rng * 1103515245u + 12345u;
        size_t k = (rng >> 8) % (CAP + CAP / 8);   /* sometimes more than fits */
        for (size_t i = 0; i < k; i++) {
            struct hm_event ev = make_event(7, next_in);
            if (hm_queue_push(&q, &ev)) {
                next_in++;
                pushes++;
            } else {
                drops++;
            }
        }
        rng = rng * 1103515245u + 12345u;
        size_t want = (round & 1) ? CAP : 1 + (rng >> 8) % CAP;
        size_t n = hm_queue_drain(&q, buf, want);
        for (size_t i = 0; i < n; i++)
            check_event(&buf[i], 7, next_out++);
    }
    size_t n;
    while ((n = hm_queue_drain(&q, buf, CAP)) > 0)
        for (size_t i = 0; i < n; i++)
            check_event(&buf[i], 7, next_out++);

    assert_int_equal(next_out, next_in);
    assert_true(next_in > 100u * CAP);          /* many laps */
    assert_true(drops > 0);
    assert_int_equal(hm_queue_pushed(&q), pushes);
    assert_int_equal(hm_queue_dropped(&q), drops);
}

/* ---- many producers ---- */

struct producer {
    pthread_t tid;
    uint32_t id;
    uint64_t attempts;
    uint64_t ok;
    bool *accepted;               /* accepted[seq]: the push returned true */
    pthread_barrier_t *start;
};

static atomic_uint producers_done;

static void *producer_main(void *arg)
{
    struct producer *p = arg;
    pthread_barrier_wait(p->start);
    for (uint64_t i = 0; i < p->attempts; i++) {
        struct hm_event ev = make_event(p->id, i);
        bool r = hm_queue_push(&q, &ev);
        if (p->accepted)
            p->accepted[i] = r;
        p->ok += r;
    }
    atomic_fetch_add(&producers_done, 1);
    return NULL;
}

/* Contract A: with the consumer paused, producers at full speed fill the
 * ring and then drop; every producer finishes (none waits for space). */
static void test_queue_producers_never_wait(void **state)
{
    (void)state;
    enum { ATTEMPTS = 20000 };
    struct producer prod[NPROD];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, NPROD);

    for (uint32_t i = 0; i < NPROD; i++) {
        prod[i] = (struct producer){ .id = i, .attempts = ATTEMPTS, .start = &start };
        assert_int_equal(pthread_create(&prod[i].tid, NULL, producer_main, &prod[i]), 0);
    }
    uint64_t ok = 0;
    for (uint32_t i = 0; i < NPROD; i++) {
        assert_int_equal(pthread_join(prod[i].tid, NULL), 0);   /* they complete */
        ok += prod[i].ok;
    }
    pthread_barrier_destroy(&start);

    uint64_t pushed = hm_queue_pushed(&q), dropped = hm_queue_dropped(&q);
    assert_int_equal(pushed + dropped, (uint64_t)NPROD * ATTEMPTS);
    assert_int_equal(pushed, CAP);
    assert_int_equal(ok, pushed);

    /* What is in the ring: CAP events, in each producer's order. */
    int64_t last[NPROD];
    for (int i = 0; i < NPROD; i++)
        last[i] = -1;
    assert_int_equal(hm_queue_drain(&q, buf, CAP), CAP);
    for (size_t i = 0; i < CAP; i++) {
        uint32_t id = buf[i].size_class;
        assert_true(id < NPROD);
        check_event(&buf[i], id, buf[i].interval_ns);
        assert_true((int64_t)buf[i].interval_ns > last[id]);
        last[id] = (int64_t)buf[i].interval_ns;
    }
    assert_int_equal(hm_queue_drain(&q, buf, CAP), 0);
}

/* Producers push while the consumer drains: every accepted event comes out
 * exactly once, in its producer's order; nothing else comes out. */
static void test_queue_concurrent_exactly_once(void **state)
{
    (void)state;
    enum { PER = 200000 };
    struct producer prod[NPROD];
    bool *accepted[NPROD], *seen[NPROD];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, NPROD);
    atomic_store(&producers_done, 0);

    for (uint32_t i = 0; i < NPROD; i++) {
        accepted[i] = calloc(PER, sizeof(bool));
        seen[i] = calloc(PER, sizeof(bool));
        assert_non_null(accepted[i]);
        assert_non_null(seen[i]);
        prod[i] = (struct producer){ .id = i, .attempts = PER,
                                     .accepted = accepted[i], .start = &start };
        assert_int_equal(pthread_create(&prod[i].tid, NULL, producer_main, &prod[i]), 0);
    }

    int64_t last[NPROD];
    for (int i = 0; i < NPROD; i++)
        last[i] = -1;
    uint64_t consumed = 0;
    bool done = false;
    while (!done) {
        /* Check "done" before the drain so the final drain sees everything. */
        done = atomic_load(&producers_done) == NPROD;
        size_t n;
        while ((n = hm_queue_drain(&q, buf, 1 + (consumed % CAP))) > 0) {
            for (size_t k = 0; k < n; k++) {
                uint32_t id = buf[k].size_class;
                uint64_t s = buf[k].interval_ns;
                assert_true(id < NPROD);
                assert_true(s < PER);
                check_event(&buf[k], id, s);
                assert_false(seen[id][s]);          /* exactly once */
                seen[id][s] = true;
                assert_true((int64_t)s > last[id]); /* producer order */
                last[id] = (int64_t)s;
            }
            consumed += n;
        }
    }
    for (int i = 0; i < NPROD; i++)
        assert_int_equal(pthread_join(prod[i].tid, NULL), 0);
    pthread_barrier_destroy(&start);

    uint64_t pushed = hm_queue_pushed(&q), dropped = hm_queue_dropped(&q);
    assert_int_equal(pushed + dropped, (uint64_t)NPROD * PER);
    assert_int_equal(pushed, consumed);
    uint64_t ok = 0;
    for (int i = 0; i < NPROD; i++) {
        ok += prod[i].ok;
        for (uint64_t s = 0; s < PER; s++)
            if (accepted[i][s] != seen[i][s])
                fail_msg("producer %d event %llu: accepted %d, consumed %d", i,
                         (unsigned long long)s, accepted[i][s], seen[i][s]);
        free(accepted[i]);
        free(seen[i]);
    }
    assert_int_equal(ok, pushed);
    print_message("  %llu pushed, %llu dropped\n", (unsigned long long)pushed,
                  (unsigned long long)dropped);
}

/* ---- Contract C: no allocation on push or drain ---- */

#ifndef TQ_SANITIZER
/* Interpose the allocator for this test binary; sanitizers interpose it
 * themselves, so the test is skipped under them. */
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static volatile int tracking;
static volatile unsigned long alloc_calls;

void *malloc(size_t n)
{
    if (tracking)
        alloc_calls++;
    return __libc_malloc(n);
}

void *calloc(size_t n, size_t s)
{
    if (tracking)
        alloc_calls++;
    return __libc_calloc(n, s);
}

void *realloc(void *p, size_t n)
{
    if (tracking)
        alloc_calls++;
    return __libc_realloc(p, n);
}

void *memalign(size_t a, size_t n)
{
    if (tracking)
        alloc_calls++;
    return __libc_memalign(a, n);
}

static void *leak_check;
#endif

static void test_queue_no_malloc(void **state)
{
    (void)state;
#ifdef TQ_SANITIZER
    skip();
#else
    /* The interposer works: */
    tracking = 1;
    leak_check = malloc(16);
    tracking = 0;
    free(leak_check);
    assert_int_equal(alloc_calls, 1);

    alloc_calls = 0;
    tracking = 1;
    for (uint64_t i = 0; i < 3 * CAP; i++) {      /* fills, drops, drains */
        struct hm_event ev = make_event(2, i);
        (void)hm_queue_push(&q, &ev);
        if (i % 1000 == 999)
            (void)hm_queue_drain(&q, buf, 500);
    }
    while (hm_queue_drain(&q, buf, CAP) > 0) {
    }
    hm_queue_init(&q);
    tracking = 0;
    assert_int_equal(alloc_calls, 0);
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_queue_zeroed_is_empty),
        cmocka_unit_test_setup(test_queue_fifo_single_producer, setup),
        cmocka_unit_test_setup(test_queue_full_drops, setup),
        cmocka_unit_test_setup(test_queue_wraparound, setup),
        cmocka_unit_test_setup(test_queue_producers_never_wait, setup),
        cmocka_unit_test_setup(test_queue_concurrent_exactly_once, setup),
        cmocka_unit_test_setup(test_queue_no_malloc, setup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
