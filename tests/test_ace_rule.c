/* ACE rule tests: hm_ace_next_count is pure, so synthetic windows give
 * exact trajectories.  Grows under frequent refills, shrinks under heavy
 * overflow, decays when idle, never leaves its bounds (100k random windows),
 * and settles on a constant count under steady input, with or without
 * feedback from the count to the window. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>

#include "ace/ace.h"

#define MS 1000000ull
#define SEC 1000000000ull
#define STEPS 64

static const struct hm_refill_bounds B = { .min = 4, .def = 32, .max = 512 };

/* A window of `refills` refills of `count` blocks each over window_ns, with
 * a per-thread mean interval of interval_ns (0: no intervals) and a share
 * of flushed blocks (per mille). */
static struct hm_ace_window win(uint64_t window_ns, uint64_t refills, uint32_t count,
                                uint64_t interval_ns, unsigned flushed_permille)
{
    struct hm_ace_window w = {
        .window_ns = window_ns,
        .refills = refills,
        .blocks_refilled = refills * count,
        .blocks_flushed = refills * count * flushed_permille / 1000,
        .interval_ns_sum = interval_ns ? refills * interval_ns : 0,
        .interval_count = interval_ns ? refills : 0,
    };
    return w;
}

/* Runs the rule STEPS times with the same window from `start`. */
static void trajectory(uint32_t start, const struct hm_ace_window *w,
                       struct hm_refill_bounds b, uint32_t out[STEPS + 1])
{
    out[0] = start;
    for (int i = 0; i < STEPS; i++)
        out[i + 1] = hm_ace_next_count(out[i], w, b);
}

static void assert_nondecreasing(const uint32_t *t, int n)
{
    for (int i = 1; i < n; i++)
        assert_true(t[i] >= t[i - 1]);
}

static void assert_nonincreasing(const uint32_t *t, int n)
{
    for (int i = 1; i < n; i++)
        assert_true(t[i] <= t[i - 1]);
}

/* Steps until the trajectory stops changing for good; STEPS+1 if never. */
static int settled_at(const uint32_t *t)
{
    int k = STEPS;
    while (k > 0 && t[k - 1] == t[STEPS])
        k--;
    return k;
}

static void test_rule_grows_under_frequent_refills(void **state)
{
    (void)state;
    uint32_t t[STEPS + 1];

    /* 5000 refills/s aggregate, 200 us mean interval per thread, no overflow:
     * 32 -> 64 -> 128 -> 256 -> 512, then stays at max. */
    struct hm_ace_window w = win(100 * MS, 500, 32, 200000, 0);
    trajectory(B.def, &w, B, t);
    assert_nondecreasing(t, STEPS + 1);
    assert_int_equal(t[1], 64);
    assert_int_equal(t[4], 512);
    assert_int_equal(settled_at(t), 4);
    assert_int_equal(t[STEPS], B.max);

    /* The same from min. */
    trajectory(B.min, &w, B, t);
    assert_nondecreasing(t, STEPS + 1);
    assert_int_equal(t[STEPS], B.max);

    /* No intervals (each thread's first refill): the aggregate rate decides. */
    w = win(100 * MS, 500, 32, 0, 0);
    trajectory(B.def, &w, B, t);
    assert_nondecreasing(t, STEPS + 1);
    assert_int_equal(t[STEPS], B.max);

    /* Low overflow (10%) does not stop growth. */
    w = win(100 * MS, 500, 32, 200000, 100);
    trajectory(B.def, &w, B, t);
    assert_int_equal(t[STEPS], B.max);

    /* Many threads refilling rarely each (mean interval 5 ms) do not grow
     * the class even though the aggregate rate is high. */
    w = win(100 * MS, 5000, 32, 5 * MS, 0);
    trajectory(B.def, &w, B, t);
    assert_int_equal(t[STEPS], B.def);
    assert_int_equal(settled_at(t), 0);
}

/* Frequent refills that mostly take back other threads' frees (a
 * producer's, all of whose blocks other threads free) keep the count: a
 * bigger batch would only hold more blocks in flight. */
static void test_rule_keeps_when_refills_take_back_remote_frees(void **state)
{
    (void)state;
    uint32_t t[STEPS + 1];
    struct hm_ace_window w = win(100 * MS, 500, 32, 200000, 0);
    w.remote_collected = w.blocks_refilled * 6 / 10;
    trajectory(B.def, &w, B, t);
    assert_int_equal(settled_at(t), 0);
    assert_int_equal(t[STEPS], B.def);
    trajectory(B.max, &w, B, t);            /* nor shrinks it */
    assert_int_equal(t[STEPS], B.max);

    /* Exactly half is not "more than half": it grows. */
    w.remote_collected = w.blocks_refilled / 2;
    trajectory(B.def, &w, B, t);
    assert_int_equal(t[1], 64);
    assert_int_equal(t[STEPS], B.max);
}

static void test_rule_shrinks_under_overflow(void **state)
{
    (void)state;
    uint32_t t[STEPS + 1];

    /* 90% of the refilled blocks come back by overflow, refills not
     * frequent (5 ms per thread): x3/4 each step, down to min. */
    struct hm_ace_window w = win(100 * MS, 20, 32, 5 * MS, 900);
    trajectory(B.max, &w, B, t);
    assert_nonincreasing(t, STEPS + 1);
    assert_int_equal(t[1], 384);
    assert_int_equal(t[2], 288);
    assert_int_equal(t[STEPS], B.min);
    assert_true(settled_at(t) < 20);

    /* Overflow shrinks below the default. */
    trajectory(B.def, &w, B, t);
    assert_nonincreasing(t, STEPS + 1);
    assert_int_equal(t[STEPS], B.min);

    /* Just above one half shrinks; exactly one half does not. */
    w = win(100 * MS, 10, 100, 0, 501);
    assert_int_equal(hm_ace_next_count(100, &w, B), 75);
    w = win(100 * MS, 10, 100, 0, 500);
    assert_int_equal(hm_ace_next_count(100, &w, B), 100);

    /* Overflow with frequent refills is thrash (bursts larger than the bin:
     * flushed ~= refilled): grow, so the bin can hold the burst. */
    w = win(100 * MS, 500, 32, 200000, 900);
    for (uint32_t c = B.min; c <= B.max; c += 7)
        assert_int_equal(hm_ace_next_count(c, &w, B), c > B.max / 2 ? B.max : 2 * c);
    w = win(100 * MS, 500, 32, 0, 1000);           /* aggregate 5000/s */
    assert_int_equal(hm_ace_next_count(100, &w, B), 200);

    /* Between frequent and rare (2 ms), heavy overflow keeps the count. */
    w = win(100 * MS, 50, 32, 2 * MS, 900);
    assert_int_equal(hm_ace_next_count(100, &w, B), 100);
}

static void test_rule_decays_when_idle(void **state)
{
    (void)state;
    uint32_t t[STEPS + 1];

    /* No refills for a whole 1 s window: a quarter of the way back to def. */
    struct hm_ace_window idle = win(1 * SEC, 0, 0, 0, 0);
    trajectory(B.max, &idle, B, t);
    assert_nonincreasing(t, STEPS + 1);
    assert_int_equal(t[1], 512 - (512 - 32 + 3) / 4);
    assert_int_equal(t[STEPS], B.def);
    for (int i = 0; i <= STEPS; i++)
        assert_true(t[i] >= B.def);
    assert_true(settled_at(t) < 40);

    /* At or below def, idle keeps the count. */
    assert_int_equal(hm_ace_next_count(B.def, &idle, B), B.def);
    assert_int_equal(hm_ace_next_count(B.min, &idle, B), B.min);
    assert_int_equal(hm_ace_next_count(33, &idle, B), 32);

    /* A window shorter than 1 s without refills says nothing. */
    struct hm_ace_window short_idle = win(999 * MS, 0, 0, 0, 0);
    assert_int_equal(hm_ace_next_count(B.max, &short_idle, B), B.max);
    struct hm_ace_window empty = { 0 };
    assert_int_equal(hm_ace_next_count(100, &empty, B), 100);
}

static void test_rule_hysteresis(void **state)
{
    (void)state;
    /* Overflow up to one half: keep, even with rare refills. */
    for (unsigned pm = 0; pm <= 500; pm += 17) {
        struct hm_ace_window w = win(100 * MS, 10, 100, 5 * MS, pm);
        assert_int_equal(hm_ace_next_count(100, &w, B), 100);
    }
    /* Slow refills with no overflow: keep, above or below def. */
    struct hm_ace_window slow = win(100 * MS, 50, 100, 2 * MS, 0);
    assert_int_equal(hm_ace_next_count(100, &slow, B), 100);
    assert_int_equal(hm_ace_next_count(8, &slow, B), 8);
    slow = win(1 * SEC, 999, 100, 0, 0);          /* 999/s aggregate */
    assert_int_equal(hm_ace_next_count(100, &slow, B), 100);
    slow = win(1 * SEC, 1001, 100, 0, 0);         /* 1001/s aggregate */
    assert_int_equal(hm_ace_next_count(100, &slow, B), 200);
}

static void test_rule_clamps(void **state)
{
    (void)state;
    struct hm_ace_window keep = win(100 * MS, 50, 100, 2 * MS, 300);
    assert_int_equal(hm_ace_next_count(0, &keep, B), B.min);
    assert_int_equal(hm_ace_next_count(1, &keep, B), B.min);
    assert_int_equal(hm_ace_next_count(100000, &keep, B), B.max);
    assert_int_equal(hm_ace_next_count(UINT32_MAX, &keep, B), B.max);

    /* Growth stops at max even when max is not a power of two times cur. */
    struct hm_ace_window grow = win(100 * MS, 500, 32, 200000, 0);
    struct hm_refill_bounds b = { .min = 3, .def = 10, .max = 100 };
    assert_int_equal(hm_ace_next_count(60, &grow, b), 100);
    assert_int_equal(hm_ace_next_count(UINT32_MAX / 2 + 7, &grow,
                                       (struct hm_refill_bounds){ 1, 1, UINT32_MAX }),
                     UINT32_MAX);

    /* Degenerate bounds are normalised: min 0 -> 1, max < min -> min. */
    struct hm_ace_window shrink = win(100 * MS, 500, 32, 200000, 900);
    assert_int_equal(hm_ace_next_count(1, &shrink, (struct hm_refill_bounds){ 0, 0, 0 }), 1);
    assert_int_equal(hm_ace_next_count(50, &grow, (struct hm_refill_bounds){ 20, 5, 10 }), 20);
}

/* xorshift64*: fixed seed, reproducible. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}

/* Mostly plausible magnitudes, sometimes anything. */
static uint64_t rnd_mag(void)
{
    switch (rnd() % 4) {
    case 0: return 0;
    case 1: return rnd() % 100;
    case 2: return rnd() % 100000000;
    default: return rnd() >> (rnd() % 64);
    }
}

static void test_rule_fuzz_bounds(void **state)
{
    (void)state;
    for (int i = 0; i < 100000; i++) {
        struct hm_refill_bounds b;
        uint32_t v[3] = { (uint32_t)(rnd() % 4096), (uint32_t)(rnd() % 4096),
                          (uint32_t)(rnd() % 4096) };
        if (i % 100 == 0)
            v[rnd() % 3] = (uint32_t)rnd();
        /* sort: min <= def <= max */
        for (int a = 0; a < 2; a++)
            for (int c = 0; c < 2 - a; c++)
                if (v[c] > v[c + 1]) {
                    uint32_t x = v[c];
                    v[c] = v[c + 1];
                    v[c + 1] = x;
                }
        b.min = v[0] ? v[0] : 1;
        b.def = v[1] < b.min ? b.min : v[1];
        b.max = v[2] < b.def ? b.def : v[2];

        struct hm_ace_window w = {
            .window_ns = rnd_mag(), .refills = rnd_mag(),
            .blocks_refilled = rnd_mag(), .blocks_flushed = rnd_mag(),
            .interval_ns_sum = rnd_mag(), .interval_count = rnd_mag(),
            .remote_collected = rnd_mag(),
        };
        uint32_t cur = (rnd() % 8 == 0) ? (uint32_t)rnd() : b.min + (uint32_t)(rnd() % (b.max - b.min + 1ull));
        uint32_t next = hm_ace_next_count(cur, &w, b);
        if (next < b.min || next > b.max)
            fail_msg("iteration %d: %u -> %u outside [%u, %u]", i, cur, next, b.min, b.max);
        assert_int_equal(hm_ace_next_count(cur, &w, b), next);     /* pure */

        /* A constant window gives a monotone trajectory to a fixed point. */
        if (i % 50 == 0) {
            uint32_t t[201];
            t[0] = next;
            for (int k = 0; k < 200; k++) {
                t[k + 1] = hm_ace_next_count(t[k], &w, b);
                assert_true(t[k + 1] >= b.min && t[k + 1] <= b.max);
            }
            if (t[1] >= t[0])
                assert_nondecreasing(t, 201);
            else
                assert_nonincreasing(t, 201);
            assert_int_equal(t[199], t[200]);
        }
    }
}

/* No value repeats after a different one: rules out A-B-A oscillation. */
static void assert_no_oscillation(const uint32_t *t, int n)
{
    for (int i = 2; i < n; i++)
        if (t[i] == t[i - 2] && t[i] != t[i - 1])
            fail_msg("oscillation at step %d: %u %u %u", i, t[i - 2], t[i - 1], t[i]);
}

/* One thread using 100k blocks/s in bursts (90% of them flushed again):
 * the refill rate falls as the count grows. */
static void bursts_trajectory(uint32_t start, struct hm_refill_bounds b, uint32_t t[STEPS + 1])
{
    t[0] = start;
    for (int i = 0; i < STEPS; i++) {
        uint64_t rate = 100000 / t[i];
        struct hm_ace_window w = win(100 * MS, rate / 10 ? rate / 10 : 1, t[i],
                                     SEC / rate, 900);
        t[i + 1] = hm_ace_next_count(t[i], &w, b);
    }
}

static void test_rule_converges(void **state)
{
    (void)state;
    const struct hm_refill_bounds b = { .min = 4, .def = 32, .max = 4096 };
    uint32_t t[STEPS + 1];

    /* Feedback through the rate: 4 threads each using 400k blocks/s, 100 ms
     * windows, 10% overflow (low).  A bigger batch means fewer
     * refills: growth stops at the first count whose per-thread refill rate
     * is under 1000/s (count >= 400): 512. */
    t[0] = b.def;
    for (int i = 0; i < STEPS; i++) {
        uint64_t per_thread_rate = 400000 / t[i];           /* refills/s */
        struct hm_ace_window w = win(100 * MS, 4 * per_thread_rate / 10, t[i],
                                     SEC / per_thread_rate, 100);
        t[i + 1] = hm_ace_next_count(t[i], &w, b);
    }
    assert_nondecreasing(t, STEPS + 1);
    assert_int_equal(t[STEPS], 512);
    assert_true(settled_at(t) <= 5);
    assert_no_oscillation(t, STEPS + 1);

    /* Frequent refills at a pace that does not depend on the count (a
     * synthetic worst case): monotone growth to max, then constant. */
    t[0] = b.def;
    for (int i = 0; i < STEPS; i++) {
        struct hm_ace_window w = win(100 * MS, 500, t[i], 200000,
                                     (unsigned)(t[i] * 1000ull / 2048));
        t[i + 1] = hm_ace_next_count(t[i], &w, b);
    }
    assert_no_oscillation(t, STEPS + 1);
    assert_nondecreasing(t, STEPS + 1);
    assert_true(settled_at(t) <= 8);
    assert_int_equal(t[STEPS], b.max);

    /* Feedback through overflow, down: slow refills (5 ms), same ratio:
     * from max (ratio 2) x3/4 until the ratio is <= 1/2, then stays. */
    t[0] = b.max;
    for (int i = 0; i < STEPS; i++) {
        struct hm_ace_window w = win(100 * MS, 20, t[i], 5 * MS,
                                     (unsigned)(t[i] * 1000ull / 2048));
        t[i + 1] = hm_ace_next_count(t[i], &w, b);
    }
    assert_no_oscillation(t, STEPS + 1);
    assert_nonincreasing(t, STEPS + 1);
    assert_true(settled_at(t) <= 8);
    assert_true(t[STEPS] <= 1024 && t[STEPS] > 1024 * 3 / 8);

    /* Feedback through the rate while overflowing (bursts: 90% overflow),
     * one thread using 100k blocks/s: grows while refills are frequent,
     * 32 -> 64 -> 128 (781 refills/s: neither frequent nor rare), stays. */
    bursts_trajectory(32, b, t);
    assert_no_oscillation(t, STEPS + 1);
    assert_nondecreasing(t, STEPS + 1);
    assert_int_equal(t[STEPS], 128);
    assert_int_equal(settled_at(t), 2);

    /* The same from above: 1024 refills every 10 ms (rare), overflowing:
     * shrinks by quarters until refills are no longer rare, then stays. */
    bursts_trajectory(1024, b, t);
    assert_no_oscillation(t, STEPS + 1);
    assert_nonincreasing(t, STEPS + 1);
    assert_true(t[STEPS] >= 100 && t[STEPS] <= 400);

    /* Steady moderate input (300 refills/s, 15% overflow): constant. */
    struct hm_ace_window w = win(100 * MS, 30, 64, 3333333, 150);
    trajectory(64, &w, b, t);
    assert_int_equal(settled_at(t), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rule_grows_under_frequent_refills),
        cmocka_unit_test(test_rule_keeps_when_refills_take_back_remote_frees),
        cmocka_unit_test(test_rule_shrinks_under_overflow),
        cmocka_unit_test(test_rule_decays_when_idle),
        cmocka_unit_test(test_rule_hysteresis),
        cmocka_unit_test(test_rule_clamps),
        cmocka_unit_test(test_rule_fuzz_bounds),
        cmocka_unit_test(test_rule_converges),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
