/* Which segments ask for transparent huge pages: a heap's first four stay
 * on small pages, those it maps once it holds four do (HAKMEM_THP=0: none).
 * Its own program: the main thread's heap starts with no segment, and no
 * exited thread left any to adopt. */
#include "test_util.h"

#include <pthread.h>
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

/* A thread that adopts exited threads' segments holds many at once, but
 * only the fresh ones it takes count: its own stay on small pages until it
 * took four (short-lived threads that each adopted their predecessors'
 * segments left a huge half resident apiece for a few live blocks). */
enum { LEFT_BLOCKS = 15 };                  /* 1 MiB each: five segments */
static void *left_blocks[LEFT_BLOCKS];

static void *leave_segments(void *arg)
{
    (void)arg;
    for (unsigned i = 0; i < LEFT_BLOCKS; i++)
        left_blocks[i] = hakmem_malloc(BLOCK);
    return NULL;                            /* its segments go to the abandoned stack */
}

static bool left_segment(const struct hm_segment *seg)
{
    for (unsigned i = 0; i < LEFT_BLOCKS; i++)
        if (hm_segment_of((uintptr_t)left_blocks[i]) == seg)
            return true;
    return false;
}

/* What the adopting thread saw at its first fresh segment (checked on the
 * test's thread: cmocka's asserts belong there). */
struct adopter {
    void *blocks[MAX_BLOCKS];
    unsigned nblocks, held;
    unsigned halves;
};

static void *map_after_adopting(void *arg)
{
    struct adopter *a = arg;
    while (a->nblocks < MAX_BLOCKS) {
        void *p = a->blocks[a->nblocks++] = hakmem_malloc(BLOCK);
        struct hm_segment *seg = p ? hm_segment_of((uintptr_t)p) : NULL;
        if (seg && !left_segment(seg)) {    /* the first segment it took fresh */
            a->held = heap_segments();
            a->halves = atomic_load(&seg->huge_halves);
            break;
        }
    }
    return NULL;
}

static void adopted_segments_do_not_make_a_heap_big(void **state)
{
    (void)state;
    const char *env = getenv("HAKMEM_THP");
    if ((env && strcmp(env, "0") == 0) || !huge_pages_supported())
        skip();
    pthread_t t;
    pthread_create(&t, NULL, leave_segments, NULL);
    pthread_join(t, NULL);
    for (unsigned i = 0; i < LEFT_BLOCKS; i++)
        assert_non_null(left_blocks[i]);
    static struct adopter a;
    pthread_create(&t, NULL, map_after_adopting, &a);
    pthread_join(t, NULL);
    assert_true(a.held > 4);                /* it held the adopted ones */
    assert_int_equal(a.halves, 0);
    for (unsigned i = 0; i < a.nblocks; i++)
        hakmem_free(a.blocks[i]);
    for (unsigned i = 0; i < LEFT_BLOCKS; i++)
        hakmem_free(left_blocks[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(big_heaps_ask_for_huge_pages),
        cmocka_unit_test(adopted_segments_do_not_make_a_heap_big),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
