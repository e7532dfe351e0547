/* Size classes: the generated tables agree with the rule they come from. */
#include "test_util.h"

#include "size_class/size_class.h"

/* Steps of 16 up to 128 B, of an eighth of the power of two below up to
 * 8 KiB, of a quarter above: exactly, so the formula and the table agree
 * on where each group starts. */
static void classes_grow_by_an_eighth_then_a_quarter(void **state)
{
    (void)state;
    assert_int_equal(hm_size_class_size(0), 16);
    assert_int_equal(hm_size_class_size(HM_NUM_CLASSES - 1), HM_MAX_CLASS_SIZE);
    assert_int_equal(hm_size_class_size(HM_COARSE_FIRST - 1), (size_t)1 << HM_COARSE_SHIFT);
    for (unsigned c = 1; c < HM_NUM_CLASSES; c++) {
        size_t prev = hm_size_class_size(c - 1), cur = hm_size_class_size(c);
        size_t group = (size_t)1 << (63 - __builtin_clzll(cur - 1));   /* cur is in (group, 2 group] */
        size_t step = cur <= 128 ? 16 : c < HM_COARSE_FIRST ? group / 8 : group / 4;
        assert_int_equal(cur - prev, step);
    }
    assert_int_equal(HM_NUM_CLASSES, 8 + 8 * (HM_COARSE_SHIFT - 7) + 4 * (17 - HM_COARSE_SHIFT));
    /* The line is at 8 KiB (what the docs say, and what was measured). */
    assert_int_equal(HM_NUM_CLASSES, 72);
    assert_int_equal(hm_size_class_size(hm_size_class(8192)), 8192);
    assert_int_equal(hm_size_class_size(hm_size_class(8193)), 10240);
    assert_int_equal(hm_size_class_size(hm_size_class(7681)), 8192);
}

static void every_size_maps_to_the_smallest_class_that_fits(void **state)
{
    (void)state;
    unsigned expect = 0;
    for (size_t n = 0; n <= HM_MAX_CLASS_SIZE; n++) {
        while (hm_size_class_size(expect) < (n ? n : 1))
            expect++;
        assert_int_equal(hm_size_class(n), expect);
        if (n <= HM_SMALL_LOOKUP_MAX) {
            assert_int_equal(hm_small_size_class(n), expect);
            assert_int_equal(hm_small_size_slot(n), 2 * expect);
        }
    }
}

/* Eight blocks a span below 8 KiB, four up to 32 KiB, two above; in the
 * fewest pages that hold them. */
static void spans_hold_enough_blocks(void **state)
{
    (void)state;
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++) {
        size_t size = hm_size_class_size(c);
        size_t want = size < 8192 ? 8 : size <= 32768 ? 4 : 2;
        size_t bytes = (size_t)hm_class_span_pages[c] * 65536;
        assert_true(bytes / size >= want);
        if (hm_class_span_pages[c] > 1)
            assert_true((bytes - 65536) / size < want);
        /* A span's remote list carries its length in 16 bits (see
         * hm_remote_word): no span may hold 65536 blocks. */
        assert_true(bytes / size < 65536);
    }
    assert_int_equal(hm_class_span_pages[HM_NUM_CLASSES - 1], 4);   /* 128 KiB: two */
}

/* malloc_usable_size's check of a block start in a one-page span
 * multiplies by ceil(2^32 / size) instead of dividing: for every class and
 * every 16-byte offset into a 64 KiB page, the quotient it gives is the
 * division's. */
static void reciprocals_divide_exactly_within_a_page(void **state)
{
    (void)state;
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++) {
        uint32_t size = hm_class_size[c];
        for (uint32_t off = 0; off < 65536; off += 16)
            assert_int_equal((uint32_t)(((uint64_t)off * hm_class_recip32[c]) >> 32), off / size);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(classes_grow_by_an_eighth_then_a_quarter),
        cmocka_unit_test(every_size_maps_to_the_smallest_class_that_fits),
        cmocka_unit_test(spans_hold_enough_blocks),
        cmocka_unit_test(reciprocals_divide_exactly_within_a_page),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
