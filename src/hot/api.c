/* Hot box: the allocation API.  malloc and free of a cached size touch only
 * the thread cache: no locks, no atomics, no syscalls, no learning code.
 * Everything else is one call away in the refill box. */
#define _GNU_SOURCE
#include "hot.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "../process/process.h"
#include "../refill/refill.h"
#include "../segment/segment.h"

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* Initial-exec: one %fs-relative access, no __tls_get_addr (which could
 * allocate) and usable before the program's own TLS set-up finished. */
__thread struct hm_tcache hm_tc __attribute__((tls_model("initial-exec"), visibility("hidden")))
    = { .owner = HM_OWNER_NONE };

struct hm_tcache *hm_tcache_self(void)
{
    return &hm_tc;
}

/* The fast paths reach the cache %fs-relative.  Its offset from the thread
 * pointer is one load from the GOT (a constant once linked into a program),
 * and a bin is that offset plus a constant, so they never compute the
 * cache's address (which costs a load of %fs:0 and an add).  The address
 * and thread sanitizers instrument %fs-relative accesses as if they were
 * plain ones, so their builds (and compilers without __seg_fs) use plain
 * pointers: the "offset" is then the cache's address. */
#if defined(__SEG_FS) && !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
typedef __seg_fs struct hm_tcache tc_ref;
typedef __seg_fs struct hm_bin bin_ref;

static inline uintptr_t tc_offset(void)
{
    uintptr_t off;
    __asm__("movq hm_tc@gottpoff(%%rip), %0" : "=r"(off));
    return off;
}
#else
typedef struct hm_tcache tc_ref;
typedef struct hm_bin bin_ref;

static inline uintptr_t tc_offset(void)
{
    return (uintptr_t)&hm_tc;
}
#endif

static inline tc_ref *tc_fast(void)
{
    return (tc_ref *)tc_offset();
}

static inline bin_ref *bin_at(size_t bin_offset)
{
    return (bin_ref *)(tc_offset() + bin_offset);
}

static inline void *bin_pop(bin_ref *bin)
{
    void *p = bin->head;
    if (likely(p)) {
        void *next = *(void **)p;
        bin->head = next;
        /* The next pop reads and writes the next block: ask for its line
         * for writing now.  A block another thread freed (and so last
         * wrote) then moves here in one transfer, ahead of the call that
         * needs it, instead of a read miss and then an upgrade. */
        hm_prefetch_write(next);
        bin->room++;
        ((uintptr_t *)p)[1] = 0;    /* no longer looks free (see hm_free_slow) */
    }
    return p;
}

/* hm_bin_link, for a bin reached through %fs. */
static inline void bin_link(bin_ref *bin, void *p, uintptr_t key)
{
    ((void **)p)[0] = bin->head;
    ((uintptr_t *)p)[1] = key;
    bin->head = p;
}

/* A block of the bootstrap arena, for a call that set-up makes again
 * itself; ENOMEM when it has no room left. */
static void *bootstrap_alloc(size_t size, size_t alignment)
{
    void *p = hm_bootstrap_alloc(size, alignment);
    if (!p)
        errno = ENOMEM;
    return p;
}

/* An empty bin: refill it, or serve set-up's own re-entrant calls. */
__attribute__((noinline)) static void *alloc_refill(unsigned cls)
{
    void *p = hm_refill(&hm_tc, cls);
    if (likely(p))
        return p;
    if (!hm_process_init())
        return bootstrap_alloc(hm_size_class_size(cls), 16);
    errno = ENOMEM;
    return NULL;
}

/* A class's bin from its slot (the class times two: bins are 16 bytes),
 * so that the address scales the slot by 8 and no shift is needed. */
static inline bin_ref *bin_of_slot(size_t slot)
{
    _Static_assert(sizeof(struct hm_bin) == 16, "a bin is two slots");
    return bin_at(offsetof(struct hm_tcache, bins) + slot * 8);
}

static inline void *alloc_slot(size_t slot)
{
    void *p = bin_pop(bin_of_slot(slot));
    return likely(p) ? p : alloc_refill((unsigned)(slot / 2));
}

static void *alloc_large(size_t size, size_t alignment, bool *zeroed)
{
    /* Re-entered during set-up: large blocks need only the segment map. */
    if (!hm_process_init() && !hm_segmap.entries) {
        *zeroed = true;                       /* static, never used before */
        return bootstrap_alloc(size, alignment);
    }
    return hm_large_alloc(size, alignment, zeroed);   /* sets ENOMEM itself */
}

/* Above the classes, up to HM_PAGES_MAX: a span of 64 KiB pages of its
 * own, reused from the thread's segments without a syscall. */
static void *alloc_pages(size_t size)
{
    void *p = hm_alloc_pages(&hm_tc, size);
    if (likely(p))
        return p;
    if (!hm_process_init()) {               /* re-entered during set-up */
        bool zeroed;
        return alloc_large(size, 16, &zeroed);
    }
    errno = ENOMEM;
    return NULL;
}

__attribute__((noinline)) static void *malloc_generic(size_t size)
{
    if (size <= HM_MAX_CLASS_SIZE)
        return alloc_slot(2 * (size_t)hm_size_class(size));
    if (size <= HM_PAGES_MAX)
        return alloc_pages(size);
    bool zeroed;
    return alloc_large(size, 16, &zeroed);
}

void *hakmem_malloc(size_t size)
{
    if (likely(size <= HM_SMALL_LOOKUP_MAX))
        return alloc_slot(hm_small_size_slot(size));
    return malloc_generic(size);
}

/* free()'s first test: whether p is 16-byte aligned and its page is one
 * the page map covers, in one compare.  Rotating the address right by 4
 * moves its low four bits to the top, so a misaligned pointer becomes
 * huge; for an aligned one the rotated value shifted right by 12 is the
 * page number.  Returns the page number, or a value >= entries. */
static inline uintptr_t page_of_aligned(uintptr_t u)
{
    uintptr_t r = (u >> 4) | (u << 60);
    return r >> (HM_PAGE_SHIFT - 4);
}

void hakmem_free(void *p)
{
    uintptr_t page = page_of_aligned((uintptr_t)p);
    if (likely(page < hm_pagemap.entries)) {
        tc_ref *tc = tc_fast();
        /* The page's tag XOR our heap id: the bin's offset when the page
         * is a span of this thread's (see hm_pagemap), else >= the heap
         * alignment. */
        uintptr_t bin_offset =
            atomic_load_explicit(&hm_pagemap.table[page], memory_order_relaxed) ^ tc->owner;
        if (likely(bin_offset < HM_HEAP_ALIGN)) {
            bin_ref *bin = bin_at(bin_offset);
            /* Room first: a bin with none (full, or draining) hands the
             * block to the flush unread, and a draining bin's frees then
             * read their blocks a batch at a time, their cache misses
             * overlapping (see drain_defer), not one free at a time. */
            if (unlikely(--bin->room < 0)) {
                hm_flush(&hm_tc, hm_bin_class(bin_offset), p);
                return;
            }
            /* A block that does not look free already. */
            if (likely(((uintptr_t *)p)[1] != tc->key)) {
                bin_link(bin, p, tc->key);
                return;
            }
            hm_free_counted(&hm_tc, bin_offset, p);
            return;
        }
    }
    hm_free_slow(&hm_tc, p, "free");
}

void hakmem_free_sized(void *p, size_t size)
{
    (void)size;
    hakmem_free(p);
}

void hakmem_free_aligned_sized(void *p, size_t alignment, size_t size)
{
    (void)alignment;
    (void)size;
    hakmem_free(p);
}

void *hakmem_calloc(size_t n, size_t size)
{
    size_t total;
    if (unlikely(__builtin_mul_overflow(n, size, &total))) {
        errno = ENOMEM;
        return NULL;
    }
    if (total > HM_PAGES_MAX) {
        bool zeroed;
        void *p = alloc_large(total, 16, &zeroed);
        if (p && !zeroed)                   /* fresh pages are zero already */
            memset(p, 0, total);
        return p;
    }
    void *p = hakmem_malloc(total);
    if (likely(p))
        memset(p, 0, total);
    return p;
}

/* The size of p's block from its page's tag alone, for a class whose
 * spans are one page (blocks up to 16 KiB): the tag's low bits are the
 * offset of the bin of its class whoever owns the span, and the span
 * starts at the page, so a block start is an offset that the class size
 * divides (checked by a multiplication).  0 for any other pointer, which
 * hm_usable_size walks to: the segment map, the segment's header, its
 * page's span and the span, four dependent loads.  redis asks the size of
 * every block it allocates and frees: 4.8% of its time went there. */
static inline size_t usable_from_tag(uintptr_t u)
{
    uintptr_t page = u >> HM_PAGE_SHIFT;
    if ((u & (HM_ALIGNMENT - 1)) || page >= hm_pagemap.entries)
        return 0;
    uintptr_t bin_offset =
        atomic_load_explicit(&hm_pagemap.table[page], memory_order_relaxed) & (HM_HEAP_ALIGN - 1);
    if (bin_offset < offsetof(struct hm_tcache, bins))
        return 0;                           /* no span's page (its tag is 0) */
    unsigned cls = hm_bin_class(bin_offset);
    if (cls >= HM_NUM_CLASSES || hm_class_span_pages[cls] != 1)
        return 0;
    uint32_t size = hm_class_size[cls], off = (uint32_t)(u & (HM_PAGE_SIZE - 1));
    uint32_t index = (uint32_t)(((uint64_t)off * hm_class_recip32[cls]) >> 32);
    return index * size == off && off + size <= HM_PAGE_SIZE ? size : 0;
}

/* p's first n bytes into q, which replaces it (NULL: p stays valid). */
static void *move_to(void *q, void *p, size_t n)
{
    if (!q)
        return NULL;
    memcpy(q, p, n);
    hakmem_free(p);
    return q;
}

static void *realloc_move(void *p, size_t old_size, size_t size)
{
    return move_to(hakmem_malloc(size), p, old_size < size ? old_size : size);
}

/* A block above HM_REALLOC_SLACK_MIN that grows and must move moves to
 * at least half again its size (up to the page blocks' bound; large
 * blocks grow by mremap, by half again too): a buffer grown a step at a
 * time then moves a logarithmic number of times, not once per size class.
 * A smaller one moves to the class of the size asked for, as jemalloc's
 * and mimalloc's do: its copies are short, and the slack would be memory
 * held for good by a buffer grown to its size and kept (a listpack, a
 * string, a vector that reserves its own).  With half again from the
 * smallest sizes, 20000 buffers grown in 15 steps of 515 bytes held 251
 * MB for 147 MB live (12 KiB blocks for 7.5 KiB; now 160 MB, glibc 148,
 * mimalloc 158, jemalloc 162), and redis-server peaked at 380 MB in
 * redis-benchmark's LPUSH (quicklist nodes of 8 KiB listpacks grown an
 * element at a time; now 282, mimalloc 288, jemalloc 290).  realloc_grow
 * (buffers grown to 1 MiB and freed): same speed, 17% more peak RSS
 * (13.7 MiB: the classes below 8 KiB that its buffers pass through each
 * hold a span); with no slack in any class it ran 31% slower. */
#define HM_REALLOC_SLACK_MIN 8192u

static size_t realloc_grown(size_t old_size, size_t size)
{
    size_t grown = old_size + old_size / 2;
    return size > old_size && size > HM_REALLOC_SLACK_MIN && grown > size &&
                   grown <= HM_PAGES_MAX
               ? grown : size;
}

static void *realloc_block(void *p, size_t size);

/* errno as it was when realloc succeeds: a way tried first and given up
 * for another (a large block's growth in place, then a move) must not
 * leave its failure behind. */
void *hakmem_realloc(void *p, size_t size)
{
    int saved = errno;
    void *q = realloc_block(p, size);
    if (q)
        errno = saved;
    return q;
}

static void *realloc_block(void *p, size_t size)
{
    if (!p)
        return hakmem_malloc(size);
    if (size == 0) {                        /* glibc: free, return NULL */
        hakmem_free(p);
        return NULL;
    }
    size_t old_size = usable_from_tag((uintptr_t)p);
    if (!old_size)
        old_size = hm_usable_size(p, "realloc");
    if (hm_bootstrap_owns(p))
        return realloc_move(p, old_size, size);
    struct hm_segment *seg = hm_segment_of((uintptr_t)p);
    if (seg->kind == HM_SEGMENT_LARGE && size > HM_MAX_CLASS_SIZE) {
        void *q = hm_large_resize(seg, size);
        return q ? q : realloc_move(p, old_size, size);
    }
    if (old_size > HM_MAX_CLASS_SIZE && hm_realloc_pages(&hm_tc, p, size))
        return p;                           /* a page block, resized in place */
    /* Keep the block when the new size still uses at least half of it. */
    if (size <= old_size && size >= old_size / 2)
        return p;
    if (size > HM_PAGES_MAX && size > old_size)     /* sets ENOMEM itself */
        return move_to(hm_large_alloc_growing(size), p, old_size);
    size_t grown = realloc_grown(old_size, size);
    if (grown != size) {
        void *q = realloc_move(p, old_size, grown);
        if (q)
            return q;                       /* else the exact size may still fit */
    }
    return realloc_move(p, old_size, size);
}

void *hakmem_reallocarray(void *p, size_t n, size_t size)
{
    size_t total;
    if (__builtin_mul_overflow(n, size, &total)) {
        errno = ENOMEM;
        return NULL;
    }
    return hakmem_realloc(p, total);
}

int hakmem_trim(void)
{
    return hm_trim(&hm_tc) ? 1 : 0;
}

size_t hakmem_malloc_usable_size(void *p)
{
    size_t size = usable_from_tag((uintptr_t)p);
    return likely(size) ? size : hm_usable_size(p, "malloc_usable_size");
}

/* ---- aligned allocation ------------------------------------------------ */

/* A block of a class or a page block re-entered during set-up comes
 * from the bootstrap arena, aligned to 16 only: the arena gives an aligned
 * one instead (the other stays, as bootstrap blocks do). */
static void *aligned_even_in_setup(void *p, size_t alignment, size_t size)
{
    if (!p || ((uintptr_t)p & (alignment - 1)) == 0)
        return p;
    return bootstrap_alloc(size, alignment);
}

/* alignment is a power of two.  A class whose block size is a multiple of
 * the alignment gives aligned blocks, since spans start on 64 KiB pages. */
static void *alloc_aligned(size_t alignment, size_t size)
{
    if (alignment <= HM_ALIGNMENT)
        return hakmem_malloc(size);
    if (alignment <= HM_PAGE_SIZE && size <= HM_MAX_CLASS_SIZE) {
        size_t want = size > alignment ? size : alignment;
        if (want <= HM_MAX_CLASS_SIZE) {
            for (unsigned c = hm_size_class(want); c < HM_NUM_CLASSES; c++)
                if ((hm_size_class_size(c) & (alignment - 1)) == 0)
                    return aligned_even_in_setup(alloc_slot(2 * (size_t)c), alignment, size);
        }
    }
    if (alignment <= HM_PAGE_SIZE && size <= HM_PAGES_MAX)
        return aligned_even_in_setup(
            alloc_pages(size > HM_MAX_CLASS_SIZE ? size : HM_MAX_CLASS_SIZE + 1), alignment, size);
    bool zeroed;
    return alloc_large(size, alignment, &zeroed);
}

static bool is_pow2(size_t a)
{
    return a && !(a & (a - 1));
}

int hakmem_posix_memalign(void **out, size_t alignment, size_t size)
{
    if (alignment % sizeof(void *) != 0 || !is_pow2(alignment))
        return EINVAL;
    int saved = errno;
    void *p = alloc_aligned(alignment, size);
    errno = saved;
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
}

void *hakmem_aligned_alloc(size_t alignment, size_t size)
{
    if (!is_pow2(alignment)) {
        errno = EINVAL;
        return NULL;
    }
    return alloc_aligned(alignment, size);
}

/* glibc's memalign: rounds an alignment that is not a power of two up. */
void *hakmem_memalign(size_t alignment, size_t size)
{
    if (alignment <= HM_ALIGNMENT)
        return hakmem_malloc(size);
    if (alignment > SIZE_MAX / 2 + 1) {
        errno = EINVAL;
        return NULL;
    }
    if (!is_pow2(alignment))
        alignment = (size_t)1 << (64 - __builtin_clzll(alignment));
    return alloc_aligned(alignment, size);
}

static size_t os_page_size(void)
{
    return (size_t)sysconf(_SC_PAGESIZE);
}

void *hakmem_valloc(size_t size)
{
    return alloc_aligned(os_page_size(), size);
}

void *hakmem_pvalloc(size_t size)
{
    size_t page = os_page_size();
    size_t rounded;
    if (__builtin_add_overflow(size, page - 1, &rounded)) {
        errno = ENOMEM;
        return NULL;
    }
    rounded &= ~(page - 1);
    return alloc_aligned(page, rounded ? rounded : page);
}

/* ---- the standard names ------------------------------------------------ */

#ifdef HM_OVERRIDE
/* Aliases, not wrappers: malloc *is* hakmem_malloc, no extra call. */
#define HM_ALIAS(target) __attribute__((alias(#target), visibility("default"), used))
void *malloc(size_t) HM_ALIAS(hakmem_malloc);
void free(void *) HM_ALIAS(hakmem_free);
void *calloc(size_t, size_t) HM_ALIAS(hakmem_calloc);
void *realloc(void *, size_t) HM_ALIAS(hakmem_realloc);
void *reallocarray(void *, size_t, size_t) HM_ALIAS(hakmem_reallocarray);
int posix_memalign(void **, size_t, size_t) HM_ALIAS(hakmem_posix_memalign);
void *aligned_alloc(size_t, size_t) HM_ALIAS(hakmem_aligned_alloc);
void *memalign(size_t, size_t) HM_ALIAS(hakmem_memalign);
void *valloc(size_t) HM_ALIAS(hakmem_valloc);
void *pvalloc(size_t) HM_ALIAS(hakmem_pvalloc);
size_t malloc_usable_size(void *) HM_ALIAS(hakmem_malloc_usable_size);
void free_sized(void *, size_t) HM_ALIAS(hakmem_free_sized);
void free_aligned_sized(void *, size_t, size_t) HM_ALIAS(hakmem_free_aligned_sized);
void cfree(void *) HM_ALIAS(hakmem_free);

/* glibc exports its allocator under these names too.  An interposer that
 * defines malloc and forwards to __libc_malloc (a leak tracer, a test
 * harness counting calls) would otherwise get glibc's blocks and hand them
 * to our free, or hand ours to glibc's free. */
void *__libc_malloc(size_t) HM_ALIAS(hakmem_malloc);
void __libc_free(void *) HM_ALIAS(hakmem_free);
void *__libc_calloc(size_t, size_t) HM_ALIAS(hakmem_calloc);
void *__libc_realloc(void *, size_t) HM_ALIAS(hakmem_realloc);
void *__libc_memalign(size_t, size_t) HM_ALIAS(hakmem_memalign);
void *__libc_valloc(size_t) HM_ALIAS(hakmem_valloc);
void *__libc_pvalloc(size_t) HM_ALIAS(hakmem_pvalloc);
#endif
