/* Which segments ask for transparent huge pages: a heap's first four stay
 * on small pages, those it maps once it holds four do (HAKMEM_THP=0: none).
 * Its own program: the main thread's heap starts with no segment, and no
 * exited thread left any to adopt. */
#include "test_util.h"

#include <stdbool.h>

#include "hakmem.h"
#include "hot/hot.h"
#include "refill/heap_internal.h"
#include "segment/segment.h"

enum { BLOCK = 1 << 20, MAX_BLOCKS = 64 };   /* page blocks: 3 to a segment */

static unsigned heap_segments(void)
{
    struct hm_heap *h = hm_tcache_self()->heap;
    unsigned n = 0;
    for (struct hm_segment *seg = h ? h->segments : NULL; seg; seg = seg->next)
        n++;
    return n;
}

/* Whether this kernel takes MADV_HUGEPAGE at all. */
static bool huge_pages_supported(void)
{
    struct hm_segment *seg = hm_segment_alloc(1, true);
    assert_non_null(seg);
    bool on = atomic_load(&seg->huge_halves) != 0;
    hm_segment_free(seg);
    return on;
}

static void big_heaps_ask_for_huge_pages(void **state)
{
    (void)state;
    hm_huge_fault_slow_ns = UINT64_MAX;     /* however slow this machine's are */
    const char *env = getenv("HAKMEM_THP");
    bool enabled = !(env && strcmp(env, "0") == 0);
    if (enabled && !huge_pages_supported())
        skip();

    void *blocks[MAX_BLOCKS];
    struct hm_segment *seen[MAX_BLOCKS];
    unsigned nblocks = 0, nseen = 0, small = 0, huge = 0;
    while (nseen < 7) {
        assert_true(nblocks < MAX_BLOCKS);
        unsigned before = heap_segments();
        void *p = hakmem_malloc(BLOCK);
        assert_non_null(p);
        blocks[nblocks++] = p;
        struct hm_segment *seg = hm_segment_of((uintptr_t)p);
        if (nseen && seen[nseen - 1] == seg)
            continue;
        seen[nseen++] = seg;               /* a segment mapped for this block */
        unsigned halves = atomic_load(&seg->huge_halves);
        if (before < 4 || !enabled) {
            assert_int_equal(halves, 0);
            small++;
        } else {
            assert_int_equal(halves, 3);
            huge++;
        }
    }
    assert_int_equal(small, enabled ? 4 : 7);
    assert_int_equal(huge, enabled ? 3 : 0);
    for (unsigned i = 0; i < nblocks; i++)
        hakmem_free(blocks[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(big_heaps_ask_for_huge_pages),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
