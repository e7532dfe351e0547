/* Segment box: the segment map, spans in a segment, and large blocks. */
#define _GNU_SOURCE
#include "test_util.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <time.h>

#include "hakmem.h"
#include "process/process.h"
#include "segment/segment.h"
#include "size_class/size_class.h"

static int setup(void **state)
{
    (void)state;
    hakmem_free(hakmem_malloc(1));   /* sets the process up */
    return 0;
}

/* hm_span_is_block divides by multiplying with a reciprocal: it must agree
 * with the remainder for every block size a span can have (the classes,
 * and page blocks of 1 to 32 pages) at every 16-byte offset in a segment. */
static void block_check_matches_division(void **state)
{
    (void)state;
    uint32_t sizes[HM_NUM_CLASSES + 32];
    unsigned n = 0;
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++)
        sizes[n++] = (uint32_t)hm_size_class_size(c);
    for (unsigned pages = 1; pages <= 32; pages++)
        sizes[n++] = pages * (uint32_t)HM_PAGE_SIZE;
    static char fake[64];
    for (unsigned i = 0; i < n; i++) {
        struct hm_span sp = { .start = fake, .block_size = sizes[i],
                              .block_recip = hm_block_recip(sizes[i]),
                              .capacity = (uint32_t)(HM_SEGMENT_SIZE / sizes[i]) };
        unsigned bad = 0;
        for (uintptr_t off = 0; off < (uintptr_t)sp.capacity * sizes[i]; off += 16)
            bad += hm_span_is_block(&sp, (uintptr_t)fake + off) != (off % sizes[i] == 0);
        assert_int_equal(bad, 0);
        assert_false(hm_span_is_block(&sp, (uintptr_t)fake - 16));
        assert_false(hm_span_is_block(&sp, (uintptr_t)fake + (uintptr_t)sp.capacity * sizes[i]));
    }
}

static void segmap_knows_only_our_memory(void **state)
{
    (void)state;
    int local;
    assert_null(hm_segment_of((uintptr_t)&local));
    assert_null(hm_segment_of(0));
    assert_null(hm_segment_of(~(uintptr_t)0));
    void *g = malloc(100);
    assert_null(hm_segment_of((uintptr_t)g));
    free(g);

    struct hm_segment *seg = hm_segment_alloc(12345, false);
    assert_non_null(seg);
    assert_int_equal((uintptr_t)seg % HM_SEGMENT_SIZE, 0);
    assert_ptr_equal(hm_segment_of((uintptr_t)seg + HM_SEGMENT_SIZE - 1), seg);
    assert_ptr_equal(hm_span_of(seg, (uintptr_t)seg + 5 * HM_PAGE_SIZE), &hm_sentinel_span);
    hm_segment_free(seg);
    assert_null(hm_segment_of((uintptr_t)seg));
}

static void spans_take_and_return_pages(void **state)
{
    (void)state;
    struct hm_segment *seg = hm_segment_alloc(777, false);
    assert_true(hm_segment_is_empty(seg));
    struct hm_span *a = hm_span_alloc(seg, 1, 0, 16, 777, 0);
    struct hm_span *b = hm_span_alloc(seg, 16, HM_NUM_CLASSES - 1, 131072, 777, 0);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(a->page_index, 1);
    assert_int_equal(b->page_index, 2);
    assert_int_equal(b->capacity, 8);
    assert_int_equal(a->capacity, 4096);
    for (unsigned i = 0; i < 16; i++)
        assert_ptr_equal(seg->page_span[2 + i], b);
    uintptr_t blk = (uintptr_t)b->start + 3 * 131072;
    assert_ptr_equal(hm_span_of(seg, blk + 1000), b);
    assert_true(hm_span_is_block(b, blk));
    assert_false(hm_span_is_block(b, blk + 16));
    assert_int_equal(hm_span_owner(b), 777);

    /* Fill the rest: 63 usable pages minus 17 used, in runs of 16. */
    assert_non_null(hm_span_alloc(seg, 16, HM_NUM_CLASSES - 1, 131072, 777, 0));
    assert_non_null(hm_span_alloc(seg, 16, HM_NUM_CLASSES - 1, 131072, 777, 0));
    assert_null(hm_span_alloc(seg, 16, HM_NUM_CLASSES - 1, 131072, 777, 0));
    hm_span_release(seg, a);
    assert_ptr_equal(seg->page_span[1], &hm_sentinel_span);
    assert_int_equal(hm_span_alloc(seg, 1, 0, 16, 777, 0)->page_index, 1);
    hm_segment_free(seg);
}

static uintptr_t tag_of(const void *p)
{
    return atomic_load(&hm_pagemap.table[(uintptr_t)p >> HM_PAGE_SHIFT]);
}

/* free()'s fast path trusts the page map alone: a page of a live span
 * carries owner | bin offset, every other page 0, and a span's tag follows
 * its owner and its size (a resized page block). */
static void pagemap_tags_follow_spans(void **state)
{
    (void)state;
    assert_true(hm_pagemap.entries > 0);
    const uintptr_t heap = 64 * HM_HEAP_ALIGN;      /* a heap id: aligned */
    struct hm_segment *seg = hm_segment_alloc(heap, false);
    assert_int_equal(tag_of(seg), 0);              /* the header page */
    struct hm_span *sp = hm_span_alloc(seg, 3, HM_NUM_CLASSES, 3 * HM_PAGE_SIZE, heap, 0x5a0);
    for (unsigned i = 0; i < 3; i++)
        assert_int_equal(tag_of(sp->start + i * HM_PAGE_SIZE), heap | 0x5a0);
    assert_int_equal(tag_of(sp->start + 3 * HM_PAGE_SIZE), 0);

    assert_true(hm_span_resize(seg, sp, 5));
    assert_int_equal(tag_of(sp->start + 4 * HM_PAGE_SIZE), heap | 0x5a0);
    assert_true(hm_span_resize(seg, sp, 2));
    assert_int_equal(tag_of(sp->start + 2 * HM_PAGE_SIZE), 0);

    hm_span_set_owner(sp, HM_OWNER_ABANDONED);       /* not a heap: no tag */
    assert_int_equal(tag_of(sp->start), 0);
    hm_span_set_owner(sp, heap + HM_HEAP_ALIGN);
    assert_int_equal(tag_of(sp->start), (heap + HM_HEAP_ALIGN) | 0x5a0);
    hm_span_release(seg, sp);
    assert_int_equal(tag_of(sp->start), 0);
    assert_int_equal(tag_of(sp->start + HM_PAGE_SIZE), 0);

    sp = hm_span_alloc(seg, 1, 0, 16, heap, 0x18);
    char *start = sp->start;
    hm_segment_free(seg);                          /* and a segment's go with it */
    assert_int_equal(tag_of(start), 0);
}

/* Whether the mapping that holds p names `flag` among its VmFlags in
 * /proc/self/smaps ("hg": asks for huge pages, "nh": refuses them). */
static bool vma_has_flag(const void *p, const char *flag)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    assert_non_null(f);
    char line[512], want[8];
    snprintf(want, sizeof want, " %s", flag);
    bool in = false, found = false;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2)
            in = (uintptr_t)p >= lo && (uintptr_t)p < hi;
        else if (in && strncmp(line, "VmFlags:", 8) == 0) {
            found = strstr(line, want) != NULL;
            break;
        }
    }
    fclose(f);
    return found;
}

static struct hm_segment *huge_segment(void)
{
    struct hm_segment *seg = hm_segment_alloc(777, true);
    assert_non_null(seg);
    if (!atomic_load(&seg->huge_halves)) {     /* a kernel without huge pages */
        hm_segment_free(seg);
        skip();
    }
    assert_int_equal(atomic_load(&seg->huge_halves), 3);
    assert_true(vma_has_flag(seg, "hg"));
    assert_true(vma_has_flag((char *)seg + HM_SEGMENT_SIZE / 2, "hg"));
    /* Writing the header faulted in its half: the rest of it is resident. */
    assert_int_equal(seg->dirty_pages, 0xfffffffeu);
    assert_true(seg->dirty_since_ns != 0);
    return seg;
}

/* OS pages of [p, p + len) resident now. */
static size_t resident_pages(void *p, size_t len)
{
    static unsigned char vec[HM_SEGMENT_SIZE / 4096];
    assert_true(len <= sizeof vec * 4096);
    assert_int_equal(mincore(p, len, vec), 0);
    size_t n = 0;
    for (size_t i = 0; i < len / 4096; i++)
        n += vec[i] & 1;
    return n;
}

/* A span of many small blocks put on pages that a span of another class
 * left resident gives back what it inherited past its first 8 KiB (it
 * carves from its start, and may never get that far); a span of the same
 * class, or of few big blocks, keeps it, and so does one that would give
 * back less than 16 KiB. */
/* sp as if its blocks up to `bytes` were carved and written. */
static struct hm_span *carved(struct hm_span *sp, size_t bytes)
{
    memset(sp->start, 1, bytes);
    sp->bump = sp->start + bytes;
    return sp;
}

static struct hm_span *carved_whole(struct hm_span *sp)
{
    return carved(sp, (size_t)sp->pages * HM_PAGE_SIZE);
}

static void span_gives_back_pages_it_inherited(void **state)
{
    (void)state;
    struct hm_segment *seg = hm_segment_alloc(777, false);
    char *page = (char *)seg + HM_PAGE_SIZE;
    uint64_t purged = atomic_load(&hm_segment_counters.bytes_purged);
    struct hm_span *sp = carved_whole(hm_span_alloc(seg, 1, 31, 1024, 777, 0));
    assert_ptr_equal(sp->start, page);
    hm_span_release(seg, sp);
    assert_int_equal(resident_pages(page, HM_PAGE_SIZE), 16);

    sp = hm_span_alloc(seg, 1, 31, 1024, 777, 0);           /* same class */
    assert_ptr_equal(sp->start, page);
    assert_int_equal(resident_pages(page, HM_PAGE_SIZE), 16);
    hm_span_release(seg, carved_whole(sp));
    sp = hm_span_alloc(seg, 1, 47, 4096, 777, 0);           /* 16 blocks */
    assert_int_equal(resident_pages(page, HM_PAGE_SIZE), 16);
    hm_span_release(seg, carved_whole(sp));
    assert_int_equal(atomic_load(&hm_segment_counters.bytes_purged), purged);

    sp = hm_span_alloc(seg, 1, 3, 64, 777, 0);              /* 1024 blocks */
    assert_ptr_equal(sp->start, page);
    assert_int_equal(resident_pages(page, HM_PAGE_SIZE), 2);
    assert_int_equal(atomic_load(&hm_segment_counters.bytes_purged) - purged,
                     HM_PAGE_SIZE - 8192);

    /* Carved to 20 KiB: 12 KiB past the first 8 is too little to trim. */
    hm_span_release(seg, carved(sp, 20480));
    sp = hm_span_alloc(seg, 1, 1, 32, 777, 0);
    assert_ptr_equal(sp->start, page);
    assert_int_equal(resident_pages(page, HM_PAGE_SIZE), 5);
    hm_segment_free(seg);
}

/* A span of big blocks on pages that a span of 1 KiB blocks left resident
 * whole: what lies past its last block goes back, the blocks keep theirs.
 * 28 KiB blocks fit four to two pages (16 KiB over); 80 KiB blocks two to
 * three pages (32 KiB over, in the last page). */
static void tail_after(struct hm_segment *seg, unsigned pages, unsigned cls, uint32_t size,
                       uint32_t blocks, size_t kept_os_pages)
{
    struct hm_span *sp = carved_whole(hm_span_alloc(seg, pages, 31, 1024, 777, 0));
    char *start = sp->start;
    size_t bytes = (size_t)pages * HM_PAGE_SIZE;
    hm_span_release(seg, sp);
    assert_int_equal(resident_pages(start, bytes), bytes / 4096);

    uint64_t purged = atomic_load(&hm_segment_counters.bytes_purged);
    sp = hm_span_alloc(seg, pages, cls, size, 777, 0);
    assert_ptr_equal(sp->start, start);
    assert_int_equal(sp->capacity, blocks);
    assert_int_equal(resident_pages(start, bytes), kept_os_pages);
    assert_int_equal(atomic_load(&hm_segment_counters.bytes_purged) - purged,
                     bytes - kept_os_pages * 4096);
    for (size_t i = 0; i < kept_os_pages * 4096; i++)
        assert_int_equal(start[i], 1);
}

static void span_gives_back_its_unused_tail(void **state)
{
    (void)state;
    struct hm_segment *seg = hm_segment_alloc(777, false);
    tail_after(seg, 2, hm_size_class(28672), 28672, 4, 28);
    tail_after(seg, 3, hm_size_class(81920), 81920, 2, 40);
    hm_segment_free(seg);
}

/* A 2 MiB half of a huge segment keeps asking for huge pages while it is
 * given back whole, and stops (MADV_NOHUGEPAGE) once it is given back in
 * part: the kernel's collapse would fill the given-back pages in again. */
static void huge_halves_stop_when_given_back_in_part(void **state)
{
    (void)state;
    uint64_t counted = atomic_load(&hm_segment_counters.huge_halves);
    struct hm_segment *seg = huge_segment();
    char *half1 = (char *)seg + HM_SEGMENT_SIZE / 2;
    assert_int_equal(atomic_load(&hm_segment_counters.huge_halves), counted + 2);

    hm_segment_give_back(seg, half1, HM_SEGMENT_SIZE / 2);   /* nothing in it */
    assert_int_equal(atomic_load(&seg->huge_halves), 3);
    hm_segment_give_back(seg, (char *)seg + 5 * HM_PAGE_SIZE, 4096);   /* the header's half */
    assert_int_equal(atomic_load(&seg->huge_halves), 2);
    assert_int_equal(atomic_load(&hm_segment_counters.huge_halves), counted + 1);
    assert_true(vma_has_flag(seg, "nh"));
    assert_true(vma_has_flag(half1, "hg"));

    /* Pages 1-31 taken, then a span at page 32: half 1 now holds it. */
    assert_non_null(hm_span_alloc(seg, 31, HM_NUM_CLASSES, 31 * HM_PAGE_SIZE, 777, 0));
    struct hm_span *sp = hm_span_alloc(seg, 1, 0, 16, 777, 0);
    assert_int_equal(sp->page_index, 32);
    hm_segment_give_back(seg, half1 + 8 * HM_PAGE_SIZE, HM_PAGE_SIZE);
    assert_int_equal(atomic_load(&seg->huge_halves), 0);
    assert_int_equal(atomic_load(&hm_segment_counters.huge_halves), counted);
    assert_true(vma_has_flag(half1, "nh"));
    hm_segment_free(seg);

    seg = huge_segment();                   /* and unmapping counts its halves out */
    hm_segment_free(seg);
    assert_int_equal(atomic_load(&hm_segment_counters.huge_halves), counted);
}

/* How far a new span's pages are resident (refills carve there in whole
 * batches, without HM_CARVE_BYTES's bound): all of them in a half asking
 * for huge pages, resident whole from the first touch; elsewhere as far as
 * an earlier span carved; none on fresh small pages. */
static void spans_know_how_far_their_pages_are_resident(void **state)
{
    (void)state;
    struct hm_segment *seg = huge_segment();
    struct hm_span *sp = hm_span_alloc(seg, 1, 3, 64, 777, 0);
    assert_int_equal(sp->page_index, 1);
    assert_int_equal(sp->resident_pages, 16);
    hm_segment_free(seg);

    seg = hm_segment_alloc(777, false);
    sp = hm_span_alloc(seg, 2, 63, 16384, 777, 0);
    assert_int_equal(sp->resident_pages, 0);
    hm_span_release(seg, carved(sp, 20480));                /* 5 OS pages */
    sp = hm_span_alloc(seg, 2, 63, 16384, 777, 0);
    assert_int_equal(sp->page_index, 1);
    assert_int_equal(sp->resident_pages, 5);
    hm_span_release(seg, carved_whole(sp));                 /* both pages */
    sp = hm_span_alloc(seg, 2, 63, 16384, 777, 0);
    assert_int_equal(sp->resident_pages, 32);
    hm_segment_free(seg);
}

/* A span in a half asking for huge pages has its page resident whole,
 * however little it carved.  Once the half stops asking (given back in
 * part), a span of small blocks that takes the page gives back what lies
 * past its first 8 KiB, as on small pages. */
static void huge_half_pages_count_as_resident_whole(void **state)
{
    (void)state;
    struct hm_segment *seg = huge_segment();
    char *half1 = (char *)seg + HM_SEGMENT_SIZE / 2;
    assert_non_null(hm_span_alloc(seg, 31, HM_NUM_CLASSES, 31 * HM_PAGE_SIZE, 777, 0));
    struct hm_span *sp = hm_span_alloc(seg, 1, 31, 1024, 777, 0);
    assert_ptr_equal(sp->start, half1);
    assert_non_null(hm_span_alloc(seg, 1, 31, 1024, 777, 0));   /* keeps the half in use */
    hm_span_release(seg, carved(sp, 4096));     /* faults in the half's huge page */
    hm_segment_give_back(seg, half1 + 8 * HM_PAGE_SIZE, 4096);
    assert_int_equal(atomic_load(&seg->huge_halves) & 2, 0);
    if (resident_pages(half1, HM_PAGE_SIZE) != 16) {    /* no huge page was to be had */
        hm_segment_free(seg);
        skip();
    }
    sp = hm_span_alloc(seg, 1, 3, 64, 777, 0);
    assert_ptr_equal(sp->start, half1);
    assert_int_equal(resident_pages(half1, HM_PAGE_SIZE), 2);
    hm_segment_free(seg);
}

/* No more than hm_huge_segments_max segments that asked are mapped at once
 * (each may split the kernel's areas, of which a process has a bounded
 * number). */
static void huge_segments_are_bounded(void **state)
{
    (void)state;
    uint64_t mapped = atomic_load(&hm_segment_counters.huge_segments);
    uint64_t max = hm_huge_segments_max;
    hm_huge_segments_max = mapped + 1;
    struct hm_segment *a = huge_segment();
    struct hm_segment *b = hm_segment_alloc(777, true);
    assert_int_equal(atomic_load(&b->huge_halves), 0);
    assert_false(vma_has_flag(b, "hg"));
    hm_segment_free(a);                     /* room again */
    struct hm_segment *c = huge_segment();
    assert_int_equal(atomic_load(&hm_segment_counters.huge_segments), mapped + 1);
    hm_segment_free(b);
    hm_segment_free(c);
    assert_int_equal(atomic_load(&hm_segment_counters.huge_segments), mapped);
    hm_huge_segments_max = max;
}

/* The decay purge.  A span in an asking half makes the half's other free
 * pages dirty (the huge page made them resident); a half whose spans all
 * went back goes back whole, past a step's budget, and keeps asking; one
 * that keeps a span gives back its free pages and stops. */
static void huge_halves_follow_the_purge(void **state)
{
    (void)state;
    struct hm_segment *seg = huge_segment();
    char *half1 = (char *)seg + HM_SEGMENT_SIZE / 2;
    assert_non_null(hm_span_alloc(seg, 31, HM_NUM_CLASSES, 31 * HM_PAGE_SIZE, 777, 0));
    assert_int_equal(seg->dirty_pages, 0);
    for (int round = 0; round < 2; round++) {
        struct hm_span *a = hm_span_alloc(seg, 2, HM_NUM_CLASSES, 2 * HM_PAGE_SIZE, 777, 0);
        assert_int_equal(seg->dirty_pages, 0xfffffffcull << 32);   /* 34..63 */
        struct hm_span *b = hm_span_alloc(seg, 1, HM_NUM_CLASSES, HM_PAGE_SIZE, 777, 0);
        struct hm_span *c = hm_span_alloc(seg, 2, HM_NUM_CLASSES, 2 * HM_PAGE_SIZE, 777, 0);
        assert_int_equal(a->page_index, 32);
        assert_int_equal(c->page_index, 35);
        memset(a->start, 1, 4096);
        hm_span_release(seg, a);
        hm_span_release(seg, c);
        if (round == 0) {                   /* all of half 1 free again */
            hm_span_release(seg, b);
            assert_int_equal(hm_segment_purge(seg, hm_clock_ns(), 0, 2 * HM_PAGE_SIZE),
                             HM_SEGMENT_SIZE / 2);
            assert_int_equal(atomic_load(&seg->huge_halves), 3);
            assert_int_equal(seg->dirty_pages, 0);
            assert_int_equal(resident_pages(half1, HM_SEGMENT_SIZE / 2), 0);
        } else {                            /* b stays: the rest goes back */
            assert_int_equal(hm_segment_purge(seg, hm_clock_ns(), 0, HM_PURGE_ALL),
                             31 * HM_PAGE_SIZE);
            assert_int_equal(atomic_load(&seg->huge_halves), 1);
            assert_true(vma_has_flag(half1, "nh"));
            assert_true(vma_has_flag(seg, "hg"));
            assert_true(resident_pages(half1, HM_SEGMENT_SIZE / 2) <= HM_PAGE_SIZE / 4096);
        }
    }
    hm_segment_free(seg);
}

/* A segment's page-state lock that another thread holds at a fork (an
 * owner in a span call or a purge takes it under no lock the fork's
 * handlers take) is free in the child, which has no such thread: a
 * child's mallinfo2 once spun on one for ever.  In the parent it stays
 * taken: a purge passes the segment by. */
static void usage_in_child(void)
{
    alarm(10);                              /* a child that spins dies of SIGALRM */
    struct hm_segment_usage u;
    hm_segment_usage(&u);
    _exit(u.span_bytes ? 0 : 3);
}

static void lock_held_at_fork_is_free_in_the_child(void **state)
{
    (void)state;
    struct hm_segment *seg = hm_segment_alloc(777, false);
    assert_non_null(seg);
    hm_span_release(seg, hm_span_alloc(seg, 2, HM_NUM_CLASSES, 2 * HM_PAGE_SIZE, 777, 0));
    assert_true(seg->dirty_pages != 0);
    uint32_t gen = atomic_load(&hm_fork_generation);
    atomic_store(&seg->lock, gen);          /* as if another thread held it */
    char buf[64];
    expect_exit(usage_in_child, 0, buf, sizeof buf);
    assert_int_equal(atomic_load(&hm_fork_generation), gen);
    hm_segment_purge_all(hm_clock_ns(), 0, HM_PURGE_ALL);
    assert_true(seg->dirty_pages != 0);     /* held: passed by */
    atomic_store(&seg->lock, 0);
    hm_segment_purge_all(hm_clock_ns(), 0, HM_PURGE_ALL);
    assert_int_equal(seg->dirty_pages, 0);
    hm_segment_free(seg);
}

static void large_blocks_map_align_and_resize(void **state)
{
    (void)state;
    size_t aligns[] = { 16, 4096, 65536, 1u << 20, 2u << 20, 4u << 20, 16u << 20 };
    for (size_t i = 0; i < sizeof aligns / sizeof *aligns; i++) {
        bool zeroed = false;
        char *p = hm_large_alloc(300000, aligns[i], &zeroed);
        assert_non_null(p);
        assert_true(zeroed || aligns[i] <= 64);
        assert_int_equal((uintptr_t)p % aligns[i], 0);
        struct hm_segment *seg = hm_segment_of((uintptr_t)p);
        assert_non_null(seg);
        assert_int_equal(seg->kind, HM_SEGMENT_LARGE);
        assert_ptr_equal(seg->user, p);
        assert_true(hm_large_usable_size(seg) >= 300000);
        assert_ptr_equal(hm_span_of(seg, (uintptr_t)p), &hm_sentinel_span);
        fill(p, 300000, 5);
        char *q = hm_large_resize(seg, 50u << 20);
        assert_non_null(q);
        assert_int_equal((uintptr_t)q % aligns[i], 0);
        assert_true(check(q, 300000, 5));
        seg = hm_segment_of((uintptr_t)q);
        assert_ptr_equal(seg->user, q);
        q[(50u << 20) - 1] = 1;
        hm_large_free(seg);
        assert_null(hm_segment_of((uintptr_t)q));
    }
}

static void large_cache_reuses_then_decays(void **state)
{
    (void)state;
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);
    bool zeroed;
    char *p = hm_large_alloc(1u << 20, 16, &zeroed);
    assert_true(zeroed);
    memset(p, 7, 1u << 20);
    hm_large_free(hm_segment_of((uintptr_t)p));
    assert_null(hm_segment_of((uintptr_t)p));       /* freed: not ours now */
    /* A slightly smaller request reuses it, and it is not zero. */
    char *q = hm_large_alloc((1u << 20) - 5000, 16, &zeroed);
    assert_ptr_equal(q, p);
    assert_false(zeroed);
    assert_int_equal(q[100], 7);
    /* A much smaller one does not (it would waste more than a quarter). */
    char *r = hm_large_alloc(300000, 16, &zeroed);
    assert_true(zeroed);
    hm_large_free(hm_segment_of((uintptr_t)r));
    hm_large_free(hm_segment_of((uintptr_t)q));
    assert_true(hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL) >= (1u << 20));
    assert_int_equal(hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL), 0);
}

/* A request a cached block falls short of by at most an eighth grows that
 * block, if the program filled it: its pages are reused (the data moves
 * with them) and only the difference is mapped.  A block touched on one
 * page, or one short by more, is left cached and a fresh one mapped. */
static void large_cache_grows_a_filled_block_a_little_short(void **state)
{
    (void)state;
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);
    bool zeroed;
    size_t six = 6u << 20, more = (6u << 20) + (256u << 10);
    char *p = hm_large_alloc(six, 16, &zeroed);
    memset(p, 7, six);
    hm_large_free(hm_segment_of((uintptr_t)p));
    uint64_t mapped = atomic_load(&hm_segment_counters.bytes_mapped);
    char *q = hm_large_alloc(more, 16, &zeroed);
    assert_false(zeroed);
    assert_int_equal(q[100], 7);
    assert_int_equal(q[six - 1], 7);
    assert_int_equal(atomic_load(&hm_segment_counters.bytes_mapped) - mapped, 256u << 10);
    assert_true(hm_large_usable_size(hm_segment_of((uintptr_t)q)) >= more);
    memset(q, 8, more);
    hm_large_free(hm_segment_of((uintptr_t)q));
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);

    /* With the address space after it taken, it moves, data and all. */
    p = hm_large_alloc(six, 16, &zeroed);
    memset(p, 7, six);
    struct hm_segment *ps = hm_segment_of((uintptr_t)p);
    char *after = ps->map_base + ps->map_size;
    void *wall = mmap(after, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                      -1, 0);
    hm_large_free(ps);
    q = hm_large_alloc(more, 16, &zeroed);
    assert_false(zeroed);
    assert_ptr_not_equal(q, p);
    assert_null(hm_segment_of((uintptr_t)p));
    assert_int_equal(q[100], 7);
    assert_int_equal(q[six - 1], 7);
    assert_int_equal(q[more - 1], 0);
    hm_large_free(hm_segment_of((uintptr_t)q));
    if (wall != MAP_FAILED)
        munmap(wall, 4096);
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);

    /* Touched on one page: a fresh mapping, the cached block stays. */
    p = hm_large_alloc(six, 16, &zeroed);
    p[0] = 1;
    hm_large_free(hm_segment_of((uintptr_t)p));
    q = hm_large_alloc(more, 16, &zeroed);
    assert_true(zeroed);
    hm_large_free(hm_segment_of((uintptr_t)q));
    assert_true(hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL) >= six + more);

    /* Filled, but short by more than an eighth. */
    p = hm_large_alloc(5u << 20, 16, &zeroed);
    memset(p, 7, 5u << 20);
    hm_large_free(hm_segment_of((uintptr_t)p));
    q = hm_large_alloc(six, 16, &zeroed);
    assert_true(zeroed);
    hm_large_free(hm_segment_of((uintptr_t)q));
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);
}

/* An aligned block is cached like a plain one; one whose header starts
 * its granule serves another alignment, or none, from the same mapping:
 * aligned_alloc(128 KiB) in a loop mapped and unmapped 4 MiB each round
 * (36x slower than the peers).  A block that realloc grows into a large
 * one may take a cached block up to eight times its size, the rest of it
 * going back; a plain request, at most twice. */
static void large_cache_serves_any_alignment_and_growth(void **state)
{
    (void)state;
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);
    bool zeroed;
    char *p = hm_large_alloc(200000, 256u << 10, &zeroed);
    assert_int_equal((uintptr_t)p % (256u << 10), 0);
    char *base = hm_segment_of((uintptr_t)p)->map_base;
    p[0] = 9;
    hm_large_free(hm_segment_of((uintptr_t)p));
    char *q = hm_large_alloc(200000, 128u << 10, &zeroed);
    assert_false(zeroed);
    assert_int_equal((uintptr_t)q % (128u << 10), 0);
    struct hm_segment *seg = hm_segment_of((uintptr_t)q);
    assert_ptr_equal(seg->map_base, base);
    assert_ptr_equal(seg->user, q);
    assert_int_equal(seg->alignment, 128u << 10);
    assert_true(hm_large_usable_size(seg) >= 200000);
    hm_large_free(seg);
    char *r = hm_large_alloc(300000, 16, &zeroed);
    assert_false(zeroed);
    assert_ptr_equal(hm_segment_of((uintptr_t)r)->map_base, base);
    assert_ptr_equal(r, base + ((offsetof(struct hm_segment, spans) + 63) & ~(size_t)63));
    hm_large_free(hm_segment_of((uintptr_t)r));
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);

    /* A block aligned to half a segment or more (its user pointer starts
     * a granule, its header on the page before) serves the alignments
     * its user pointer has, not a plain request. */
    char *a = hm_large_alloc(3u << 20, 2u << 20, &zeroed);
    assert_int_equal((uintptr_t)a % HM_SEGMENT_SIZE, 0);
    hm_large_free(hm_segment_of((uintptr_t)a));
    char *b = hm_large_alloc((3u << 20) - 5000, HM_SEGMENT_SIZE, &zeroed);
    assert_ptr_equal(b, a);
    assert_false(zeroed);
    assert_int_equal(hm_segment_of((uintptr_t)b)->alignment, HM_SEGMENT_SIZE);
    hm_large_free(hm_segment_of((uintptr_t)b));
    char *c = hm_large_alloc(3u << 20, 16, &zeroed);
    assert_true(zeroed);
    assert_true(c != a);
    hm_large_free(hm_segment_of((uintptr_t)c));
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);

    char *big = hm_large_alloc(6u << 20, 16, &zeroed);
    hm_large_free(hm_segment_of((uintptr_t)big));
    char *plain = hm_large_alloc((2u << 20) + 4096, 16, &zeroed);
    assert_true(zeroed);                        /* 6 MiB is more than twice */
    char *grown = hm_large_alloc_growing((2u << 20) + 4096);
    assert_ptr_equal(grown, big);
    /* Cut to half again its size, as if it had just grown. */
    size_t usable = hm_large_usable_size(hm_segment_of((uintptr_t)grown));
    assert_true(usable >= (3u << 20) + 6144 && usable < (3u << 20) + 16384);
    hm_large_free(hm_segment_of((uintptr_t)grown));
    hm_large_free(hm_segment_of((uintptr_t)plain));
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);
}

/* A block that goes from the program to the cache and back, never
 * waiting out the purge delay there, gives its pages back once per delay
 * (counted from its first return): touching another page each round, it
 * keeps resident what the rounds since then touched, not all 200.  Rounds
 * take 1 ms at least, so a delay of 50 ms leaves at most about 55 (fewer
 * on a slow machine). */
static void large_cache_renews_a_block_in_rotation(void **state)
{
    (void)state;
    const size_t size = HM_SEGMENT_SIZE - 65536;
    const struct timespec ms = {0, 1000000};
    bool zeroed;
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);
    hm_large_cache_config(50 * 1000000ull);
    char *p = hm_large_alloc(size, 16, &zeroed);
    for (size_t i = 1; i <= 200; i++) {
        p[i * 4096] = 1;
        hm_large_free(hm_segment_of((uintptr_t)p));
        nanosleep(&ms, NULL);
        char *q = hm_large_alloc(size, 16, &zeroed);
        assert_ptr_equal(q, p);
    }
    struct hm_segment *seg = hm_segment_of((uintptr_t)p);
    size_t resident = resident_pages(seg->map_base, seg->map_size);
    hm_large_free(seg);
    hm_large_cache_config(hm_options.purge_delay_ns);
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);
    assert_true(resident >= 1);
    assert_true(resident <= 100);
}

/* The cache keeps freed large blocks up to 128 MiB of them, counted whole
 * whether the program touched a page of them or all (no system call asks
 * which), and at most 32 blocks. */
static size_t cache_after_freeing(unsigned n, size_t size, size_t touch)
{
    char *blocks[40];
    bool zeroed;
    hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);
    for (unsigned i = 0; i < n; i++) {
        blocks[i] = hm_large_alloc(size, 16, &zeroed);
        assert_non_null(blocks[i]);
        memset(blocks[i], 1, touch);
    }
    for (unsigned i = 0; i < n; i++)
        hm_large_free(hm_segment_of((uintptr_t)blocks[i]));
    return hm_large_cache_purge(hm_clock_ns(), 0, HM_PURGE_ALL);     /* what had stayed */
}

static void large_cache_is_bounded(void **state)
{
    (void)state;
    const size_t mib = 1u << 20;
    size_t sparse = cache_after_freeing(17, 8 * mib, 4096);
    assert_true(sparse >= 15 * 8 * mib);
    assert_true(sparse <= 128 * mib);
    size_t dense = cache_after_freeing(17, 8 * mib, 8 * mib);
    assert_int_equal(dense, sparse);
    size_t many = cache_after_freeing(40, mib, 4096);
    assert_true(many >= 32 * mib);
    assert_true(many <= 32 * (mib + 8192));
}

/* The segment map has one entry per granule, so no two blocks may have
 * their user pointers in one granule: blocks aligned to half a segment
 * could, at its two half-way points. */
static void large_blocks_own_their_granule(void **state)
{
    (void)state;
    enum { N = 48 };
    char *p[N];
    for (int i = 0; i < N; i++) {
        bool zeroed;
        p[i] = hm_large_alloc(64, HM_SEGMENT_SIZE / 2, &zeroed);
        assert_non_null(p[i]);
        assert_int_equal((uintptr_t)p[i] % (HM_SEGMENT_SIZE / 2), 0);
        fill(p[i], 64, (unsigned)i);
    }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < i; j++)
            assert_int_not_equal((uintptr_t)p[i] >> HM_SEGMENT_SHIFT,
                                 (uintptr_t)p[j] >> HM_SEGMENT_SHIFT);
    for (int i = 0; i < N; i++) {
        struct hm_segment *seg = hm_segment_of((uintptr_t)p[i]);
        assert_non_null(seg);
        assert_ptr_equal(seg->user, p[i]);
        assert_true(check(p[i], 64, (unsigned)i));
        hm_large_free(seg);
    }
}

/* A block that a resize moves leaves its old range, which another
 * thread's new block may get at once: the old registration must be gone
 * before, or its removal wipes the new block's. */
static atomic_bool movers_stop;

static double now_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void *move_large_blocks(void *arg)
{
    (void)arg;
    while (!atomic_load(&movers_stop)) {
        char *p = hakmem_malloc(3u << 20);
        p[0] = 1;
        p = hakmem_realloc(p, 13u << 20);    /* no room after it: moves */
        hakmem_free(p);
    }
    return NULL;
}

static void large_block_moves_leave_new_blocks_registered(void **state)
{
    (void)state;
    pthread_t movers[2];
    atomic_store(&movers_stop, false);
    for (int i = 0; i < 2; i++)
        pthread_create(&movers[i], NULL, move_large_blocks, NULL);
    unsigned lost = 0, rounds = 0;
    void *q[8] = { 0 };
    /* A second and 500 blocks (a release build maps thousands a second),
     * or 10 s: the thread sanitizer's mmap is slow, the more so on a
     * loaded machine. */
    double start = now_seconds(), now = start;
    for (; (now < start + 1 || rounds < 500) && now < start + 10; rounds++, now = now_seconds()) {
        unsigned k = rounds % 8;
        if (q[k]) {
            struct hm_segment *seg = hm_segment_of((uintptr_t)q[k]);
            lost += !seg || seg->user != q[k];
            if (seg && seg->user == q[k])
                hakmem_free(q[k]);
        }
        /* Alignment 4096: a fresh mapping each time, never the cache's. */
        assert_int_equal(hakmem_posix_memalign(&q[k], 4096, 3u << 20), 0);
    }
    atomic_store(&movers_stop, true);
    for (int i = 0; i < 2; i++)
        pthread_join(movers[i], NULL);
    for (unsigned k = 0; k < 8; k++)
        if (q[k] && hm_segment_of((uintptr_t)q[k]))
            hakmem_free(q[k]);
    assert_true(rounds >= 50);
    assert_int_equal(lost, 0);
}

/* mremap as the library calls it, forwarded to the kernel unless a test
 * makes it fail, in one of the two ways a move onto a reservation fails:
 * before the kernel unmaps the destination (out of map areas, RLIMIT_AS),
 * or after (out of memory for the move), with another thread mapping that
 * range before the call returns. */
static enum { MREMAP_WORKS, MREMAP_FAILS_BEFORE_UNMAP, MREMAP_FAILS_AFTER_UNMAP } mremap_mode;
static char *fixed_dest;        /* the destination of the last move */
static char *foreign;           /* the other thread's mapping */
static size_t foreign_size;

void *mremap(void *old, size_t old_size, size_t new_size, int flags, ...)
{
    void *dest = NULL;
    if (flags & MREMAP_FIXED) {
        va_list ap;
        va_start(ap, flags);
        dest = va_arg(ap, void *);
        va_end(ap);
    }
    if (mremap_mode == MREMAP_WORKS)
        return (void *)syscall(SYS_mremap, old, old_size, new_size, flags, dest);
    if (flags & MREMAP_FIXED)
        fixed_dest = dest;
    if ((flags & MREMAP_FIXED) && mremap_mode == MREMAP_FAILS_AFTER_UNMAP) {
        munmap(dest, new_size);
        foreign = mmap(dest, new_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        foreign_size = new_size;
        if (foreign != MAP_FAILED)
            memset(foreign, 0x5a, 4096);
    }
    errno = ENOMEM;
    return MAP_FAILED;
}

/* A 3 MiB block grown to 13 MiB while mremap fails as `mode`: realloc
 * copies it instead. */
static unsigned char *grow_with_failing_moves(int mode)
{
    unsigned char *p = hakmem_malloc(3u << 20);
    assert_non_null(p);
    for (size_t i = 0; i < (3u << 20); i += 4096)
        p[i] = (unsigned char)(i >> 12);
    fixed_dest = foreign = NULL;
    mremap_mode = mode;
    unsigned char *q = hakmem_realloc(p, 13u << 20);    /* cannot grow: moves, which fails */
    mremap_mode = MREMAP_WORKS;
    assert_non_null(fixed_dest);
    assert_non_null(q);
    for (size_t i = 0; i < (3u << 20); i += 4096)
        assert_int_equal(q[i], (unsigned char)(i >> 12));
    return q;
}

/* A move that fails after the kernel unmapped the destination leaves the
 * range alone: another thread's mapping may be there now. */
static void failed_move_leaves_another_mapping_alone(void **state)
{
    (void)state;
    unsigned char *q = grow_with_failing_moves(MREMAP_FAILS_AFTER_UNMAP);
    assert_non_null(foreign);
    assert_ptr_not_equal(foreign, MAP_FAILED);
    unsigned char vec[1];
    assert_int_equal(mincore(foreign, 4096, vec), 0);
    assert_int_equal(foreign[0], 0x5a);
    assert_int_equal(foreign[4095], 0x5a);
    hakmem_free(q);
    munmap(foreign, foreign_size);
}

/* A move that fails before the unmap gives the reservation back: the
 * range is unmapped, or the copy's own mapping took it. */
static void failed_move_gives_back_its_reservation(void **state)
{
    (void)state;
    unsigned char *q = grow_with_failing_moves(MREMAP_FAILS_BEFORE_UNMAP);
    unsigned char vec[1];
    struct hm_segment *seg = hm_segment_of((uintptr_t)q);
    bool unmapped = mincore(fixed_dest, 4096, vec) != 0 && errno == ENOMEM;
    assert_true(unmapped || (char *)seg->map_base == fixed_dest);
    hakmem_free(q);
}

/* A purge whose clock was read before another thread freed pages (the
 * ACE thread reads it before its pass, hm_heap_purge before a tidying
 * step) must find them young, not 2^64 ns old: the subtraction wrapped,
 * and just-freed pages went back at once whatever the delay. */
static void purge_with_an_earlier_clock_keeps_the_delay(void **state)
{
    (void)state;
    struct hm_segment *seg = hm_segment_alloc(777, false);
    struct hm_span *sp = hm_span_alloc(seg, 4, 72, 4 * HM_PAGE_SIZE, 777, 0);
    memset(sp->start, 7, 4 * HM_PAGE_SIZE);
    sp->bump = sp->end;
    uint64_t earlier = hm_clock_ns();
    while (hm_clock_ns() == earlier)
        ;                                   /* the coarse clock ticks */
    hm_span_release(seg, sp);
    assert_int_equal(hm_segment_purge(seg, earlier, 1000000000ull, HM_PURGE_ALL), 0);
    assert_int_equal(hm_segment_purge(seg, hm_clock_ns() + 2000000000ull, 1000000000ull,
                                      HM_PURGE_ALL), 4 * HM_PAGE_SIZE);
    hm_segment_free(seg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(block_check_matches_division),
        cmocka_unit_test(segmap_knows_only_our_memory),
        cmocka_unit_test(spans_take_and_return_pages),
        cmocka_unit_test(purge_with_an_earlier_clock_keeps_the_delay),
        cmocka_unit_test(pagemap_tags_follow_spans),
        cmocka_unit_test(span_gives_back_pages_it_inherited),
        cmocka_unit_test(spans_know_how_far_their_pages_are_resident),
        cmocka_unit_test(span_gives_back_its_unused_tail),
        cmocka_unit_test(huge_halves_stop_when_given_back_in_part),
        cmocka_unit_test(huge_halves_follow_the_purge),
        cmocka_unit_test(huge_half_pages_count_as_resident_whole),
        cmocka_unit_test(huge_segments_are_bounded),
        cmocka_unit_test(lock_held_at_fork_is_free_in_the_child),
        cmocka_unit_test(large_blocks_map_align_and_resize),
        cmocka_unit_test(large_cache_reuses_then_decays),
        cmocka_unit_test(large_cache_grows_a_filled_block_a_little_short),
        cmocka_unit_test(large_cache_serves_any_alignment_and_growth),
        cmocka_unit_test(large_cache_is_bounded),
        cmocka_unit_test(large_cache_renews_a_block_in_rotation),
        cmocka_unit_test(large_blocks_own_their_granule),
        cmocka_unit_test(large_block_moves_leave_new_blocks_registered),
        cmocka_unit_test(failed_move_leaves_another_mapping_alone),
        cmocka_unit_test(failed_move_gives_back_its_reservation),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
