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
 *   2. Refill pace, from the mean interval between a thread's consecutive
 *      refills of the class (when no event of the window carries one, the
 *      window's aggregate rate stands in):
 *        frequent: under 1 ms (more than 1000 refills/s per thread);
 *        rare:     4 ms or more (fewer than 250 refills/s per thread).
 *   3. Frequent refills: grow x2, not above max, whatever the overflow.  A
 *      thread that allocates and frees in bursts larger than its bin
 *      refills and flushes the same blocks (flushed ~= refilled); a bigger
 *      batch, and so a bigger bin cap, is what ends that thrash.  Except
 *      when more than half the blocks refilled came back as other threads'
 *      frees (remote_collected > blocks_refilled / 2, both real blocks over
 *      the same refills): a producer whose blocks go to consumers moves
 *      every block the same trip whatever the batch, and a bigger one
 *      holds more of them in flight (xmalloc with ACE: counts of 256, peak
 *      RSS 13-15% higher, no faster).  Keep.
 *   4. Rare refills with heavy overflow (blocks_flushed > blocks_refilled /
 *      2: more than half of what the refills put in the bins came back
 *      through overflows):
 *      the cache holds more than the thread uses; shrink by a quarter,
 *      cur - max(1, cur / 4), not below min.
 *   5. Otherwise keep.
 *
 * Convergence.  For a constant window the trajectory is monotone (the same
 * case applies at every step) and stops at a fixed point: max, min, def or
 * current.  Under feedback (a bigger batch means fewer refills) the two
 * pace gates are 4x apart while a step changes the pace by at most 2x: a
 * doubling from "frequent" (< 1 ms) lands under 2 ms, never "rare"; a
 * shrink from "rare" (>= 4 ms) lands above 3 ms, never "frequent".  So the
 * count never turns back: it settles after a monotone run.  (The remote
 * case keeps: a fixed point too.) */
#include "ace.h"

#define HM_ACE_GROW_INTERVAL_NS 1000000ull      /* 1 ms: > 1000 refills/s */
#define HM_ACE_SHRINK_INTERVAL_NS 4000000ull   /* 4 ms: < 250 refills/s */
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

    /* 2. Refill pace. */
    bool often, rare;
    if (w->interval_count > 0) {
        often = w->interval_ns_sum < (u128)w->interval_count * HM_ACE_GROW_INTERVAL_NS;
        rare = w->interval_ns_sum >= (u128)w->interval_count * HM_ACE_SHRINK_INTERVAL_NS;
    } else {
        often = (u128)w->refills * 1000000000ull > (u128)w->window_ns * HM_ACE_GROW_RATE;
        rare = (u128)w->refills * 1000000000ull * 4 <= (u128)w->window_ns * HM_ACE_GROW_RATE;
    }

    /* 3. Frequent refills: grow, unless they mostly take back other
     * threads' frees. */
    if (often && (u128)w->remote_collected * 2 > w->blocks_refilled)
        return cur;
    if (often)
        return cur > hi / 2 ? hi : cur * 2;

    /* 4. Rare refills, heavy overflow: shrink. */
    if (rare && (u128)w->blocks_flushed * 2 > w->blocks_refilled) {
        uint32_t next = cur - (cur / 4 ? cur / 4 : 1);   /* cur >= 1 */
        return next < lo ? lo : next;
    }

    /* 5. Keep. */
    return cur;
}
