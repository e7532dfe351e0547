/* Memory goes back to the OS: free pages after the purge delay (run with
 * HAKMEM_PURGE_DELAY_MS=50), everything free at malloc_trim, empty
 * segments of exited threads at once. */
#include "test_util.h"

#include <pthread.h>
#include <time.h>

#include "hakmem.h"

enum { BLOCKS = 50 * 1024, BLOCK = 1000 };   /* about 50 MiB */
static void *blocks[BLOCKS];

static void fill_heap(void)
{
    for (int i = 0; i < BLOCKS; i++) {
        blocks[i] = hakmem_malloc(BLOCK);
        memset(blocks[i], 1, BLOCK);
    }
}

static void free_heap(void)
{
    for (int i = 0; i < BLOCKS; i++)
        hakmem_free(blocks[i]);
}

static void nap_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };
    nanosleep(&ts, NULL);
}

static void trim_returns_free_memory(void **state)
{
    (void)state;
    long base = rss_kb();
    fill_heap();
    long full = rss_kb();
    assert_true(full - base > 40 * 1024);
    free_heap();
    assert_int_equal(hakmem_trim(), 1);
    long trimmed = rss_kb();
    assert_true(trimmed < base + 4 * 1024);
    /* And the memory is usable again. */
    fill_heap();
    free_heap();
}

static void free_pages_decay_after_the_delay(void **state)
{
    (void)state;
    hakmem_trim();
    long base = rss_kb();
    struct hakmem_stats s0, s;
    hakmem_stats(&s0);
    fill_heap();
    free_heap();
    long freed = rss_kb();
    /* Not all at once: a few empty segments stay for reuse, resident
     * until the delay has passed. */
    assert_true(freed - base > 12 * 1024);
    nap_ms(120);
    /* A little slow-path activity (refills of another class, under 100 KB
     * live) runs the purge. */
    for (int round = 0; round < 200; round++) {
        void *p[12];
        for (int i = 0; i < 12; i++)
            p[i] = hakmem_malloc(5000);
        for (int i = 0; i < 12; i++)
            hakmem_free(p[i]);
    }
    long later = rss_kb();
    assert_true(later < base + 8 * 1024);
    hakmem_stats(&s);
    assert_true(s.bytes_purged - s0.bytes_purged >= 12u << 20);
}

static void *alloc_free_exit(void *arg)
{
    (void)arg;
    fill_heap();
    free_heap();
    return NULL;
}

static void exited_threads_leave_nothing_resident(void **state)
{
    (void)state;
    hakmem_trim();
    long base = rss_kb();
    struct hakmem_stats s0, s1;
    hakmem_stats(&s0);
    pthread_t t;
    pthread_create(&t, NULL, alloc_free_exit, NULL);
    pthread_join(t, NULL);
    hakmem_stats(&s1);
    assert_true(rss_kb() < base + 4 * 1024);
    assert_true(s1.bytes_mapped <= s0.bytes_mapped);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(trim_returns_free_memory),
        cmocka_unit_test(free_pages_decay_after_the_delay),
        cmocka_unit_test(exited_threads_leave_nothing_resident),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
