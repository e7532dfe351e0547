/* ACE box: the learning rule (see ace.h and docs/contracts.md).
 *
 * hm_ace_next_count(current, w, bounds) is a pure function of its arguments:
 * no state, no clock, no globals.  It returns the next refill count of one
 * class from what the class did over one window w:
 *
 *   0. Bounds are normalised (min >= 1, max >= min, def clamped into
 *      [min, max]) and current is clamped into [min, max].  Every result is
 *      within [min, max].
 *   1. Idle: w->refills == 0.  If the window lasted at least 1 s
 *      (HM_ACE_IDLE_NS) and current > def, the count decays a quarter of the
 *      way back to def (at least 1): cur - ceil((cur - def) / 4).  It never
 *      decays below def, and an idle class at or below def keeps its count
 *      (an idle class costs nothing; the next activity decides).  A window
 *      shorter than 1 s with no refills says nothing: keep.
 *   2. "Frequent" refills: the mean interval between a thread's consecutive
 *      refills of the class is under 1 ms (HM_ACE_GROW_INTERVAL_NS, i.e.
 *      more than 1000 refills/s per thread).  When no event of the window
 *      carries an interval (each was its thread's first refill of the
 *      class), the window's aggregate rate stands in: refills / window >
 *      1000/s.
 *   3. Overflow: blocks_flushed > blocks_refilled / 2 (more than half of
 *      what was carved came back through bin overflows).  If refills are
 *      not frequent: shrink by a quarter, cur - max(1, cur / 4), not below
 *      min.  If they are frequent, keep: a thread that allocates and frees
 *      in bursts larger than its bin refills and flushes the same blocks
 *      (flushed ~= refilled whatever the count), and shrinking would only
 *      multiply its refills.
 *   4. Frequent refills with low overflow (blocks_flushed <= blocks_refilled
 *      / 8): grow x2, not above max.
 *   5. Otherwise keep: overflow between 1/8 and 1/2 is the hysteresis band,
 *      and a low refill rate alone is no reason to change.
 *
 * Convergence.  For a constant window the trajectory is monotone (the same
 * case applies at every step) and stops at a fixed point: max, min, def or
 * current, within about 80 steps from any 32-bit count (x2 up, x3/4 down).
 * Under feedback (the window depends on the count) the rate falls as the
 * count grows (a bigger batch means fewer refills): growth stops at the
 * first count whose rate is under the threshold, and a low rate never
 * shrinks.  A shrink raises the rate, and once refills are frequent overflow
 * no longer shrinks.  For the overflow ratio, a cycle needs it to cross both
 * gates: from <= 1/8 to > 1/2 across one doubling (or back across one x3/4
 * step), a jump of more than 4x.  As long as the ratio grows no faster than
 * the count, a doubling lands in the band (<= 1/4) and a shrink from above
 * 1/2 stays above 3/8: the count settles after at most one overshoot.
 * remote_collected is not used by the rule. */
#include "ace.h"

#define HM_ACE_IDLE_NS          1000000000ull   /* idle window: 1 s */
#define HM_ACE_GROW_INTERVAL_NS 1000000ull      /* 1 ms: > 1000 refills/s */
#define HM_ACE_GROW_RATE        1000ull         /* refills/s, aggregate */

__extension__ typedef unsigned __int128 u128;

uint32_t hm_ace_next_count(uint32_t current, const struct hm_ace_window *w,
                           struct hm_refill_bounds bounds)
{
    uint32_t lo = bounds.min ? bounds.min : 1;
    uint32_t hi = bounds.max > lo ? bounds.max : lo;
    uint32_t def = bounds.def < lo ? lo : bounds.def > hi ? hi : bounds.def;
    uint32_t cur = current < lo ? lo : current > hi ? hi : current;

    if (!w)
        return cur;

    /* 1. Idle. */
    if (w->refills == 0) {
        if (w->window_ns >= HM_ACE_IDLE_NS && cur > def)
            cur -= (cur - def + 3) / 4;          /* ceil, so at least 1 */
        return cur;
    }

    /* 2. Frequent refills. */
    bool often;
    if (w->interval_count > 0)
        often = w->interval_ns_sum < (u128)w->interval_count * HM_ACE_GROW_INTERVAL_NS;
    else
        often = (u128)w->refills * 1000000000ull > (u128)w->window_ns * HM_ACE_GROW_RATE;

    /* 3. Overflow: shrink, unless refills are frequent (thrash: keep). */
    if ((u128)w->blocks_flushed * 2 > w->blocks_refilled) {
        if (often)
            return cur;
        uint32_t next = cur - (cur / 4 ? cur / 4 : 1);   /* cur >= 1 */
        return next < lo ? lo : next;
    }

    /* 4. Frequent refills, low overflow: grow. */
    if (often && (u128)w->blocks_flushed * 8 <= w->blocks_refilled)
        return cur > hi / 2 ? hi : cur * 2;

    /* 5. Hysteresis: keep. */
    return cur;
}
