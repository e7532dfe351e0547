/* API conformance: every allocation function, as glibc defines it. */
#include "test_util.h"

#include <errno.h>
#include <pthread.h>
#include <malloc.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include "hakmem.h"
#include "size_class/size_class.h"

static bool aligned(const void *p, size_t a)
{
    return ((uintptr_t)p & (a - 1)) == 0;
}

static void malloc_zero_and_alignment(void **state)
{
    (void)state;
    void *z = hakmem_malloc(0);
    assert_non_null(z);
    assert_true(hakmem_malloc_usable_size(z) >= 1);
    hakmem_free(z);
    for (size_t n = 1; n <= 70000; n += (n < 1100 ? 1 : 997)) {
        void *p = hakmem_malloc(n);
        assert_non_null(p);
        assert_true(aligned(p, 16));
        size_t u = hakmem_malloc_usable_size(p);
        assert_true(u >= n);
        memset(p, 0x5a, u);             /* the whole usable size is ours */
        hakmem_free(p);
    }
}

static void every_class_boundary(void **state)
{
    (void)state;
    for (unsigned c = 0; c < hakmem_class_count(); c++) {
        struct hakmem_class_info ci;
        assert_int_equal(hakmem_class_info(c, &ci), 0);
        size_t s = ci.block_size;
        void *a = hakmem_malloc(s), *b = hakmem_malloc(s + 1);
        assert_int_equal(hakmem_malloc_usable_size(a), s);
        assert_true(hakmem_malloc_usable_size(b) > s);
        fill(a, s, c);
        fill(b, s + 1, c + 1);
        assert_true(check(a, s, c));
        assert_true(check(b, s + 1, c + 1));
        hakmem_free(a);
        hakmem_free(b);
    }
    assert_int_equal(hakmem_class_info(hakmem_class_count(), &(struct hakmem_class_info){0}), -1);
}

static void huge_sizes_fail_with_enomem(void **state)
{
    (void)state;
    size_t sizes[] = { SIZE_MAX, SIZE_MAX - 4096, (size_t)PTRDIFF_MAX + 1, (size_t)1 << 62 };
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        errno = 0;
        assert_null(hakmem_malloc(sizes[i]));
        assert_int_equal(errno, ENOMEM);
    }
    errno = 0;
    assert_null(hakmem_calloc(SIZE_MAX / 2, 3));
    assert_int_equal(errno, ENOMEM);
    errno = 0;
    assert_null(hakmem_calloc((size_t)1 << 33, (size_t)1 << 33));
    assert_int_equal(errno, ENOMEM);
}

static void calloc_zeroes_reused_blocks(void **state)
{
    (void)state;
    size_t sizes[] = { 1, 16, 100, 1024, 5000, 40000, 131072, 200000, 3 << 20 };
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        size_t n = sizes[i];
        void *p = hakmem_malloc(n);
        memset(p, 0xff, n);
        hakmem_free(p);
        unsigned char *q = hakmem_calloc(1, n);
        assert_non_null(q);
        for (size_t j = 0; j < n; j++)
            assert_int_equal(q[j], 0);
        hakmem_free(q);
    }
    unsigned char *z = hakmem_calloc(0, 10);
    assert_non_null(z);
    hakmem_free(z);
}

static void realloc_keeps_content(void **state)
{
    (void)state;
    size_t n = 1;
    char *p = hakmem_malloc(n);
    fill(p, n, 7);
    while (n < (6u << 20)) {
        size_t m = n + n / 3 + 1;
        p = hakmem_realloc(p, m);
        assert_non_null(p);
        assert_true(aligned(p, 16));
        assert_true(check(p, n, 7));
        fill(p, m, 7);
        n = m;
    }
    while (n > 1) {
        size_t m = n / 2;
        p = hakmem_realloc(p, m);
        assert_non_null(p);
        assert_true(check(p, m, 7));
        n = m;
    }
    hakmem_free(p);
}

/* A block grown a byte at a time moves to the class of the size asked
 * for up to 8 KiB, then to half again its size at least (up to the page
 * blocks' 2 MiB), so it moves once per class (56 up to 8 KiB) and then
 * about log1.5 times, not once per size class (16 more up to 128 KiB). */
static void realloc_growth_moves_by_half_again(void **state)
{
    (void)state;
    size_t n = 16;
    char *p = hakmem_malloc(n);
    fill(p, n, 5);
    unsigned moves = 0;
    while (n < (1u << 20)) {
        size_t old_usable = hakmem_malloc_usable_size(p);
        char *q = hakmem_realloc(p, n + 1);
        assert_non_null(q);
        assert_true(check(q, n, 5));
        if (q != p) {
            moves++;
            if (n + 1 <= 8192)
                assert_int_equal(hakmem_malloc_usable_size(q),
                                 hm_size_class_size(hm_size_class(n + 1)));
            else
                assert_true(hakmem_malloc_usable_size(q) >= old_usable + old_usable / 2);
        }
        q[n] = (char)(5 * 31u + n * 7u);    /* what fill() puts at n */
        p = q;
        n++;
        if (n % 64 == 0 && n < hakmem_malloc_usable_size(p)) {
            n = hakmem_malloc_usable_size(p);   /* skip ahead within the block */
            fill(p, n, 5);
        }
    }
    print_message("grown 16 B -> 1 MiB: %u moves\n", moves);
    assert_true(moves <= 55 + 12);  /* 56 classes, the first one p's; log1.5(128) = 12.0 */
    hakmem_free(p);
}

/* A buffer grown to a few KiB a step at a time and kept (a listpack, a
 * string) holds the class of its size, not half again its size: 15
 * steps of 515 bytes end in the 8 KiB class (12 KiB with half again). */
static void realloc_grown_and_kept_holds_its_class(void **state)
{
    (void)state;
    char *p = NULL;
    for (size_t n = 515; n <= 15 * 515; n += 515) {
        p = hakmem_realloc(p, n);
        assert_non_null(p);
        memset(p + n - 515, (int)(n / 515), 515);
    }
    assert_int_equal(hakmem_malloc_usable_size(p), 8192);
    for (size_t i = 0; i < 15 * 515; i++)
        assert_int_equal((unsigned char)p[i], i / 515 + 1);
    hakmem_free(p);
}

/* A buffer built past 2 MiB by appends: each step that fits what the
 * block has keeps it (a step grown by half again was cut back to the next
 * step's size, and grown again: two system calls a step), and the next
 * build reuses the last one's block from the cache instead of mapping a
 * fresh one at its first large step (40 builds of 6 MiB held 114 MB).
 * A real shrink still gives the tail back. */
static void realloc_appends_past_2_mib_reuse_one_block(void **state)
{
    (void)state;
    char *last[3];
    for (int round = 0; round < 3; round++) {
        char *p = NULL;
        size_t n = 0, steps_kept = 0, large_steps = 0;
        while (n < (6u << 20)) {
            size_t add = 3000 + n % 1000;
            size_t before = p ? hakmem_malloc_usable_size(p) : 0;
            char *q = hakmem_realloc(p, n + add);
            assert_non_null(q);
            if (n && q[n - 1] != (char)(n - 1))
                fail_msg("content lost at %zu", n - 1);
            if (n + add > (3u << 20)) {
                large_steps++;
                steps_kept += q == p && hakmem_malloc_usable_size(q) == before;
            }
            for (size_t i = n; i < n + add; i++)
                q[i] = (char)i;
            p = q;
            n += add;
        }
        hakmem_free(p);
        last[round] = p;
        /* Only a step past what the block has grows it (by half again). */
        assert_true(large_steps - steps_kept <= 4);
    }
    assert_ptr_equal(last[2], last[1]);     /* the same block, from the cache */
    /* Steps of a byte past a growth, and past a cached block's take, keep
     * the block too (a rule in bytes, not pages, cut it back each page). */
    for (int taken = 0; taken < 2; taken++) {
        char *p = hakmem_malloc(taken ? 100000 : 3u << 20);
        size_t start = taken ? 3u << 20 : hakmem_malloc_usable_size(p) + 1;
        p = hakmem_realloc(p, start);
        size_t usable = hakmem_malloc_usable_size(p);
        assert_true(usable >= (4u << 20));      /* half again, or a taken block cut so */
        for (size_t n = start + 1; n < start + 20000; n++) {
            char *q = hakmem_realloc(p, n);
            assert_ptr_equal(q, p);
            assert_int_equal(hakmem_malloc_usable_size(q), usable);
        }
        hakmem_free(p);
    }
    char *big = hakmem_malloc(12u << 20);
    memset(big, 1, 12u << 20);
    big = hakmem_realloc(big, 7u << 20);
    assert_true(hakmem_malloc_usable_size(big) < (8u << 20));
    hakmem_free(big);
}

static size_t address_space_used(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    size_t pages = 0;
    if (!f || fscanf(f, "%zu", &pages) != 1)
        fail_msg("no /proc/self/statm");
    fclose(f);
    return pages * 4096;
}

/* Leaves `spare` bytes of address space (RLIMIT_AS); *old to restore. */
static void limit_address_space(size_t spare, struct rlimit *old)
{
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    skip();                     /* their shadow memory takes address space too */
#endif
    struct rlimit tight;
    getrlimit(RLIMIT_AS, old);
    tight.rlim_cur = address_space_used() + spare;
    tight.rlim_max = old->rlim_max;
    assert_int_equal(setrlimit(RLIMIT_AS, &tight), 0);
}

/* A large block grows by half again, but where the address space left
 * (RLIMIT_AS) holds only what was asked for, it grows by that in place:
 * the growth by half again failed, and a copy needed a second mapping.
 * (A block that must move still needs room for a reservation of its new
 * size and alignment.)  Here the block is fresh, and the rest of its
 * granule after it is free. */
static void large_realloc_grows_by_the_size_asked_when_short_of_room(void **state)
{
    (void)state;
    char *p = hakmem_malloc(8u << 20);
    memset(p, 5, 8u << 20);
    size_t usable = hakmem_malloc_usable_size(p);
    struct rlimit old;
    limit_address_space(3u << 20, &old);
    char *q = hakmem_realloc(p, usable + (2u << 20));
    setrlimit(RLIMIT_AS, &old);
    assert_non_null(q);
    for (size_t i = 0; i < (8u << 20); i += 4096)
        assert_int_equal(q[i], 5);
    assert_true(hakmem_malloc_usable_size(q) >= usable + (2u << 20));
    hakmem_free(q);
}

/* A block that realloc grows past 2 MiB may take a cached block (of up
 * to eight times its size) and grow it to half again; where the address
 * space left (RLIMIT_AS) refuses that growth, the cached block, already
 * big enough, serves as it is (it was taken out of the cache and
 * registered, and was lost: realloc failed with ENOMEM, and the block's
 * old pointer passed as a live one). */
static void realloc_takes_a_cached_block_when_short_of_room(void **state)
{
    (void)state;
    char *cached = hakmem_malloc(3u << 20);
    memset(cached, 1, 3u << 20);
    hakmem_free(cached);
    char *q = hakmem_malloc(1u << 20);
    fill(q, 1u << 20, 9);
    struct rlimit old;
    limit_address_space(0, &old);
    char *r = hakmem_realloc(q, 5u << 19);
    setrlimit(RLIMIT_AS, &old);
    assert_ptr_equal(r, cached);
    assert_true(check(r, 1u << 20, 9));
    assert_true(hakmem_malloc_usable_size(r) >= (5u << 19));
    hakmem_free(r);
}

/* A large block whose growth in place is blocked (a mapping right after
 * it) moves; the in-place attempt's ENOMEM must not stay in errno (a
 * getline loop that checks errno at EOF read it as a read error). */
static void realloc_that_moves_keeps_errno(void **state)
{
    (void)state;
    char *p = hakmem_malloc(3u << 20);
    memset(p, 7, 3u << 20);
    char *end = p + hakmem_malloc_usable_size(p);
    void *wall = mmap(end, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                      -1, 0);
    if (wall != end) {
        hakmem_free(p);
        skip();                             /* something else is there already */
    }
    errno = 0;
    char *q = hakmem_realloc(p, 12u << 20);
    assert_non_null(q);
    assert_int_equal(errno, 0);
    assert_true(q != p);
    for (size_t i = 0; i < (3u << 20); i += 4096)
        assert_int_equal(q[i], 7);
    hakmem_free(q);
    munmap(wall, 4096);
}

/* malloc_usable_size of a block of a one-page class reads the class from
 * its page's tag, whoever owns the span: another thread's blocks, every
 * class and both ends of the span's page, give the class size. */
static void *allocate_every_class(void *arg)
{
    void **out = arg;
    for (unsigned c = 0; c < hakmem_class_count(); c++)
        out[c] = hakmem_malloc(hm_size_class_size(c));
    return NULL;
}

static void usable_size_of_another_threads_blocks(void **state)
{
    (void)state;
    void *blocks[HM_NUM_CLASSES];
    pthread_t t;
    pthread_create(&t, NULL, allocate_every_class, blocks);
    pthread_join(t, NULL);
    for (unsigned c = 0; c < hakmem_class_count(); c++) {
        assert_int_equal(hakmem_malloc_usable_size(blocks[c]), hm_size_class_size(c));
        hakmem_free(blocks[c]);
    }
    /* The last block of a one-page span of 3 KiB blocks: 21 fit in 64 KiB. */
    void *p[21];
    for (int i = 0; i < 21; i++)
        p[i] = hakmem_malloc(3072);
    for (int i = 0; i < 21; i++) {
        assert_int_equal(hakmem_malloc_usable_size(p[i]), 3072);
        hakmem_free(p[i]);
    }
}

static void realloc_edge_cases(void **state)
{
    (void)state;
    void *p = hakmem_realloc(NULL, 100);
    assert_non_null(p);
    fill(p, 100, 3);
    errno = 0;
    assert_null(hakmem_realloc(p, SIZE_MAX));
    assert_int_equal(errno, ENOMEM);
    assert_true(check(p, 100, 3));          /* failure leaves the block alone */
    errno = 0;
    assert_null(hakmem_reallocarray(p, SIZE_MAX / 4, 8));
    assert_int_equal(errno, ENOMEM);
    assert_true(check(p, 100, 3));
    p = hakmem_reallocarray(p, 10, 20);
    assert_non_null(p);
    assert_true(check(p, 100, 3));
    assert_null(hakmem_realloc(p, 0));      /* frees, as glibc does */

    /* Large blocks grow in place or move, and keep their bytes. */
    char *big = hakmem_malloc(300000);
    fill(big, 300000, 9);
    big = hakmem_realloc(big, 40u << 20);
    assert_true(check(big, 300000, 9));
    big[(40u << 20) - 1] = 1;
    big = hakmem_realloc(big, 250000);
    assert_true(check(big, 250000, 9));
    hakmem_free(big);
}

static void posix_memalign_rules(void **state)
{
    (void)state;
    void *p = (void *)1;
    assert_int_equal(hakmem_posix_memalign(&p, 0, 10), EINVAL);
    assert_int_equal(hakmem_posix_memalign(&p, 3, 10), EINVAL);
    assert_int_equal(hakmem_posix_memalign(&p, 4, 10), EINVAL);    /* below sizeof(void *) */
    assert_int_equal(hakmem_posix_memalign(&p, 24, 10), EINVAL);
    assert_ptr_equal(p, (void *)1);
    assert_int_equal(hakmem_posix_memalign(&p, 64, SIZE_MAX - 100), ENOMEM);
    for (size_t a = 8; a <= (16u << 20); a <<= 1) {
        size_t sizes[] = { 1, a / 2 + 1, a, 3 * a + 5, 100000 };
        for (size_t i = 0; i < 5; i++) {
            void *q = NULL;
            assert_int_equal(hakmem_posix_memalign(&q, a, sizes[i]), 0);
            assert_true(aligned(q, a));
            size_t u = hakmem_malloc_usable_size(q);
            assert_true(u >= sizes[i]);
            memset(q, 1, sizes[i]);
            hakmem_free(q);
        }
    }
}

static void aligned_alloc_memalign_valloc(void **state)
{
    (void)state;
    errno = 0;
    assert_null(hakmem_aligned_alloc(3, 10));
    assert_int_equal(errno, EINVAL);
    errno = 0;
    assert_null(hakmem_aligned_alloc(0, 10));
    assert_int_equal(errno, EINVAL);
    void *p = hakmem_aligned_alloc(4096, 10);
    assert_true(aligned(p, 4096));
    hakmem_free(p);
    p = hakmem_aligned_alloc(1u << 20, 1u << 20);
    assert_true(aligned(p, 1u << 20));
    memset(p, 2, 1u << 20);
    hakmem_free(p);

    p = hakmem_memalign(24, 100);           /* glibc rounds up to 32 */
    assert_true(aligned(p, 32));
    hakmem_free(p);
    errno = 0;
    assert_null(hakmem_memalign(SIZE_MAX / 2 + 2, 1));
    assert_int_equal(errno, EINVAL);
    p = hakmem_memalign(8, 5);
    assert_true(aligned(p, 16));
    hakmem_free(p);

    p = hakmem_valloc(100);
    assert_true(aligned(p, 4096));
    hakmem_free(p);
    p = hakmem_pvalloc(1);
    assert_true(aligned(p, 4096));
    assert_true(hakmem_malloc_usable_size(p) >= 4096);
    memset(p, 3, 4096);
    hakmem_free(p);
    p = hakmem_pvalloc(0);
    assert_non_null(p);
    hakmem_free(p);
    errno = 0;
    assert_null(hakmem_pvalloc(SIZE_MAX - 10));
    assert_int_equal(errno, ENOMEM);
}

static void usable_size_and_sized_free(void **state)
{
    (void)state;
    assert_int_equal(hakmem_malloc_usable_size(NULL), 0);
    hakmem_free(NULL);
    void *p = hakmem_malloc(40);
    hakmem_free_sized(p, 40);
    p = hakmem_aligned_alloc(256, 40);
    hakmem_free_aligned_sized(p, 256, 40);
    const char *v = hakmem_version();
    assert_non_null(strstr(v, "hakmem"));
}

/* ---- bad input dies with a diagnostic ---------------------------------- */

static void free_stack_pointer(void)
{
    int x;
    hakmem_free(&x);
}

static void free_twice(void)
{
    void *p = hakmem_malloc(48);
    hakmem_free(p);
    hakmem_free(p);
}

static void free_large_twice(void)
{
    void *p = hakmem_malloc(1 << 20);
    hakmem_free(p);
    hakmem_free(p);
}

static void free_page_block_twice(void)
{
    void *p = hakmem_malloc(500000);
    hakmem_free(p);
    hakmem_free(p);
}

static void free_misaligned(void)
{
    char *p = hakmem_malloc(64);
    hakmem_free(p + 8);
}

static void free_interior_then_trim(void)
{
    char *p = hakmem_malloc(64);
    hakmem_free(p + 16);
    hakmem_trim();
}

/* About 2000 frees in a row start the 64 B bin draining (see struct
 * hm_bin): frees then go back to their spans' free lists, a batch at a
 * time; waiting in the batch or on the list, the double free must still
 * be found.  One block of the last one's span
 * stays live, so the span stays (freed whole, its pages would make any
 * later free of it an invalid pointer). */
static void *drain_64(void)
{
    static void *p[2000];
    for (int i = 0; i < 2000; i++)
        p[i] = hakmem_malloc(64);
    void *last = p[1999];
    bool kept = false;
    for (int i = 0; i < 1999; i++) {
        if (!kept && (uintptr_t)p[i] >> 16 == (uintptr_t)last >> 16)
            kept = true;
        else
            hakmem_free(p[i]);
    }
    return last;
}

/* Both frees wait in the batch, unread (see drain_defer): the put finds
 * the second by the key the first one's check wrote. */
static void free_twice_while_draining(void)
{
    void *last = drain_64();
    hakmem_free(last);
    hakmem_free(last);
    hakmem_trim();
}

/* The first free went back to the span's list before the second. */
static void free_twice_while_draining_after_a_put(void)
{
    void *last = drain_64();
    hakmem_free(last);
    hakmem_trim();
    hakmem_free(last);
    hakmem_trim();
}

/* Caught when the draining bin's frees go back to their spans (the
 * batch's last free, a refill, malloc_trim or the thread's exit): until
 * then the block waits off the bin, never handed out. */
static void free_interior_while_draining(void)
{
    char *last = drain_64();
    hakmem_free(last + 16);
    hakmem_trim();
}

/* Or at the process's exit, for the exiting thread's batch. */
static void free_interior_while_draining_then_exit(void)
{
    char *last = drain_64();
    hakmem_free(last + 16);
    exit(0);
}

/* A 4 KiB bin holds 20 blocks (or up to 30 after a whole free list): the
 * free that overflows it moves the 11 (or up to 16) newest into the
 * class's stash, where a second free of one must still be found. */
static void free_twice_from_the_stash(void)
{
    void *p[21];
    for (int i = 0; i < 21; i++)
        p[i] = hakmem_malloc(4096);
    hakmem_trim();                      /* an empty bin */
    for (int i = 0; i < 21; i++)
        hakmem_free(p[i]);
    hakmem_free(p[15]);
}

/* The same for a class whose flushes go into its stash: an interior
 * pointer among the newest blocks at an overflow is caught there, and is
 * never handed out. */
static void free_interior_of_a_stash_class(void)
{
    char *p = hakmem_malloc(4096);
    void *q[40];
    for (int i = 0; i < 40; i++)
        q[i] = hakmem_malloc(4096);
    hakmem_trim();                      /* an empty bin: the 21st free overflows it */
    for (int i = 0; i < 19; i++)
        hakmem_free(q[i]);
    hakmem_free(p + 16);
    for (int i = 19; i < 40; i++)
        hakmem_free(q[i]);
    for (int i = 0; i < 40; i++)
        if ((q[i] = hakmem_malloc(4096)) == p + 16)
            return;                     /* handed out: no abort, the test fails */
}

static void usable_size_of_foreign(void)
{
    void *p = malloc(10);
    hakmem_malloc_usable_size(p);
}

/* 16 bytes into a block of a one-page class: the page's tag gives the
 * class, but the offset is no block start, so the walk diagnoses it. */
static void usable_size_of_interior(void)
{
    char *p = hakmem_malloc(64);
    hakmem_malloc_usable_size(p + 16);
}

/* A diagnostic raised inside a slow path (here trim's check of the cache)
 * aborts while the thread holds its heap's lock; an abort handler that
 * allocates (a crash reporter) re-enters the allocator on that thread and
 * must run, not wait for the lock for ever. */
static void allocate_and_exit(int sig)
{
    (void)sig;
    void *p[100];
    for (int i = 0; i < 100; i++)       /* refills: slow paths */
        p[i] = hakmem_malloc(30000);
    for (int i = 0; i < 100; i++)
        hakmem_free(p[i]);
    _exit(p[99] ? 42 : 43);
}

static void interior_trim_with_handler(void)
{
    signal(SIGABRT, allocate_and_exit);
    alarm(20);                          /* a hang dies of SIGALRM */
    free_interior_then_trim();
}

static void abort_handler_may_allocate(void **state)
{
    (void)state;
    char buf[512];
    expect_exit(interior_trim_with_handler, 42, buf, sizeof buf);
    assert_non_null(strstr(buf, "invalid pointer (found in a thread cache)"));
}

/* The same while a draining bin's batch goes back: the handler's frees
 * of the class fill a new batch, then go back alone (no put runs in the
 * slow path they re-enter), and the block that failed its check is not
 * looked at again. */
static void *spare_64[40];

static void free_spares_and_exit(int sig)
{
    (void)sig;
    for (int i = 0; i < 40; i++)
        hakmem_free(spare_64[i]);
    _exit(42);
}

static void interior_while_draining_with_handler(void)
{
    for (int i = 0; i < 40; i++)        /* before: their mallocs cannot end the drain */
        spare_64[i] = hakmem_malloc(64);
    char *last = drain_64();
    signal(SIGABRT, free_spares_and_exit);
    alarm(20);
    hakmem_free(last + 16);
    hakmem_trim();
}

static void abort_handler_may_free_into_a_draining_bin(void **state)
{
    (void)state;
    char buf[512];
    expect_exit(interior_while_draining_with_handler, 42, buf, sizeof buf);
    char *first = strstr(buf, "hakmem: free(): invalid pointer 0x");
    assert_non_null(first);
    assert_null(strstr(first + strlen("hakmem: free(): invalid pointer"), "invalid pointer"));
}

static void invalid_frees_abort(void **state)
{
    (void)state;
    expect_abort(free_stack_pointer, "hakmem: free(): invalid pointer 0x");
    expect_abort(free_twice, "hakmem: free(): double free detected 0x");
    expect_abort(free_large_twice, "hakmem: free(): invalid pointer 0x");
    expect_abort(free_page_block_twice, "hakmem: free(): invalid pointer 0x");
    expect_abort(free_misaligned, "hakmem: free(): invalid pointer 0x");
    expect_abort(free_interior_then_trim, "invalid pointer (found in a thread cache)");
    expect_abort(free_interior_of_a_stash_class, "invalid pointer (found in a thread cache)");
    expect_abort(free_twice_while_draining, "hakmem: free(): double free detected 0x");
    expect_abort(free_twice_while_draining_after_a_put, "hakmem: free(): double free detected 0x");
    expect_abort(free_interior_while_draining, "hakmem: free(): invalid pointer 0x");
    expect_abort(free_interior_while_draining_then_exit, "hakmem: free(): invalid pointer 0x");
    expect_abort(free_twice_from_the_stash, "hakmem: free(): double free detected 0x");
    expect_abort(usable_size_of_foreign, "hakmem: malloc_usable_size(): invalid pointer 0x");
    expect_abort(usable_size_of_interior, "hakmem: malloc_usable_size(): invalid pointer 0x");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(malloc_zero_and_alignment),
        cmocka_unit_test(every_class_boundary),
        cmocka_unit_test(huge_sizes_fail_with_enomem),
        cmocka_unit_test(calloc_zeroes_reused_blocks),
        cmocka_unit_test(realloc_keeps_content),
        cmocka_unit_test(realloc_growth_moves_by_half_again),
        cmocka_unit_test(realloc_grown_and_kept_holds_its_class),
        cmocka_unit_test(realloc_edge_cases),
        cmocka_unit_test(large_realloc_grows_by_the_size_asked_when_short_of_room),
        cmocka_unit_test(realloc_takes_a_cached_block_when_short_of_room),
        cmocka_unit_test(realloc_that_moves_keeps_errno),
        cmocka_unit_test(usable_size_of_another_threads_blocks),
        cmocka_unit_test(realloc_appends_past_2_mib_reuse_one_block),
        cmocka_unit_test(posix_memalign_rules),
        cmocka_unit_test(aligned_alloc_memalign_valloc),
        cmocka_unit_test(usable_size_and_sized_free),
        cmocka_unit_test(invalid_frees_abort),
        cmocka_unit_test(abort_handler_may_allocate),
        cmocka_unit_test(abort_handler_may_free_into_a_draining_bin),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
