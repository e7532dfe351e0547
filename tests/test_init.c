/* Set-up re-entrancy: a malloc made while the process is being set up (as
 * dlsym, pthread_create or stdio may do) is served from the bootstrap
 * arena instead of recursing or deadlocking. */
#include "test_util.h"

#include <errno.h>

#include "hakmem.h"
#include "process/process.h"

static void *during_init[3];
static size_t during_init_usable;
static void *aligned_during_init[2];
static void *too_big_during_init = (void *)1;
static int too_big_errno;

static void reenter(void)
{
    during_init[0] = hakmem_malloc(100);
    during_init[1] = hakmem_calloc(10, 10);
    during_init[2] = hakmem_malloc(1 << 20);        /* a large size too */
    during_init_usable = hakmem_malloc_usable_size(during_init[0]);
    /* Aligned: from the arena too, aligned as asked (they were 16-aligned
     * class blocks of the arena). */
    aligned_during_init[0] = hakmem_memalign(4096, 100);
    aligned_during_init[1] = hakmem_aligned_alloc(1024, 200);
    /* More than the arena holds: NULL and ENOMEM (errno was left alone). */
    errno = 0;
    too_big_during_init = hakmem_malloc(100000);
    too_big_errno = errno;
}

/* Runs before the library's own load-time set-up. */
__attribute__((constructor(101))) static void install_hook(void)
{
    hm_init_test_hook = reenter;
}

static void reentrant_malloc_uses_bootstrap_arena(void **state)
{
    (void)state;
    assert_int_equal(hm_process_state, HM_PROCESS_READY);
    for (int i = 0; i < 3; i++) {
        assert_non_null(during_init[i]);
        assert_true(hm_bootstrap_owns(during_init[i]) == (i < 2));
        assert_int_equal((uintptr_t)during_init[i] % 16, 0);
    }
    assert_true(during_init_usable >= 100);
    assert_non_null(aligned_during_init[0]);
    assert_int_equal((uintptr_t)aligned_during_init[0] % 4096, 0);
    assert_non_null(aligned_during_init[1]);
    assert_int_equal((uintptr_t)aligned_during_init[1] % 1024, 0);
    assert_null(too_big_during_init);
    assert_int_equal(too_big_errno, ENOMEM);
    unsigned char *z = during_init[1];
    for (int i = 0; i < 100; i++)
        assert_int_equal(z[i], 0);
    /* Those blocks can be used, resized and freed like any other. */
    memset(during_init[0], 1, 100);
    char *moved = hakmem_realloc(during_init[0], 5000);
    assert_false(hm_bootstrap_owns(moved));
    assert_int_equal(moved[99], 1);
    hakmem_free(moved);
    hakmem_free(during_init[1]);
    hakmem_free(during_init[2]);
    /* And after set-up, malloc is the real thing. */
    void *p = hakmem_malloc(100);
    assert_false(hm_bootstrap_owns(p));
    hakmem_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(reentrant_malloc_uses_bootstrap_arena),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
