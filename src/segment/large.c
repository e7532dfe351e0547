/* Large blocks: above the largest size class, each its own mapping.
 *
 * Freed large blocks, of either layout (see cache_serves), wait a while in
 * a small cache, so a program that frees and allocates big buffers in turn
 * does not pay an mmap, a page-fault storm and an munmap each time.  The
 * cache is bounded (slots and bytes) and decays like free pages: a block
 * unused for the purge delay is unmapped. */
#define _GNU_SOURCE
#include "os_internal.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>

#include "../trace/trace.h"

/* Where a large block's user memory starts in its mapping when the header
 * shares the first granule (alignment below half a segment). */
#define HM_LARGE_HEADER_SIZE \
    ((offsetof(struct hm_segment, spans) + 63) & ~(size_t)63)

/* The cache is bounded by the bytes it maps, every one counted as if
 * resident (the worst case: a buffer the program filled).  Measuring what
 * is resident instead (mincore, a walk of the block's page table entries
 * at each free) cost more than everything else the `large` benchmark did
 * with the cache: 7150 calls, 28% of its run time.  With 128 MiB, a handful
 * of multi-MiB buffers in rotation are never unmapped and mapped again
 * (each cycle costs a page fault per touched page and a TLB shootdown),
 * while what a burst of frees leaves behind stays bounded even if no purge
 * ever runs after it (an idle thread without the ACE thread). */
#define CACHE_SLOTS      32
#define CACHE_MAX_BYTES  ((size_t)128 << 20)
#define CACHE_MAX_BLOCK  ((size_t)32 << 20)

static void large_unmap(struct hm_segment *seg)
{
    size_t map_size = seg->map_size;
    hm_os_unmap(seg->map_base, map_size);
    hm_count_mapped(-(int64_t)map_size);
}

struct cached_block {
    struct hm_segment *seg;
    uint64_t freed_ns;
    bool sparse;        /* found mostly not resident (see cache_take_filled_shorter) */
};

/* Oldest first: cache[0] is the next to expire. */
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cached_block cache[CACHE_SLOTS];
static unsigned cache_count;       /* written under the lock, read unlocked as a hint */
static size_t cache_mapped;

static void cache_remove_at(unsigned i)
{
    cache_mapped -= cache[i].seg->map_size;
    for (unsigned j = i + 1; j < cache_count; j++)
        cache[j - 1] = cache[j];
    __atomic_store_n(&cache_count, cache_count - 1, __ATOMIC_RELAXED);
}

static bool header_in_granule(size_t alignment);
static void *large_grow(struct hm_segment *seg, size_t offset, size_t new_map);
static void large_unregister(struct hm_segment *seg);

/* Whether a cached block can take a request's layout: a block whose
 * header starts its granule serves any alignment below half a segment
 * (the user pointer moves within that granule: see large_revive); one
 * whose user pointer starts a granule, with its header on the page
 * before, serves the alignments its user pointer has, and only those:
 * its first page is in the granule before, which may hold another
 * block's user pointer. */
static bool cache_serves(const struct hm_segment *seg, size_t alignment)
{
    if (header_in_granule(alignment))
        return header_in_granule(seg->alignment);
    return !header_in_granule(seg->alignment) && (uintptr_t)seg->user % alignment == 0;
}

/* Under the lock: the index of the smallest (or the largest) cached
 * block of `lo` to `hi` bytes that can take the alignment, passing over
 * blocks found sparse when asked to; -1: none. */
static int cache_find(size_t lo, size_t hi, size_t alignment, bool largest, bool filled)
{
    int best = -1;
    for (unsigned i = 0; i < cache_count; i++) {
        size_t have = cache[i].seg->map_size;
        if (have < lo || have > hi || (filled && cache[i].sparse) ||
            !cache_serves(cache[i].seg, alignment))
            continue;
        if (best < 0 || (largest ? have > cache[best].seg->map_size
                                 : have < cache[best].seg->map_size))
            best = (int)i;
    }
    return best;
}

/* Takes cache[i] out (under the lock). */
static struct hm_segment *cache_take_at(int i)
{
    struct hm_segment *seg = cache[i].seg;
    cache_remove_at((unsigned)i);
    return seg;
}

/* The smallest cached block that fits, if it is at most `most` times the
 * size: its pages are already faulted in, which is most of what a fresh
 * mapping costs; the untouched rest only costs address space. */
static struct hm_segment *cache_take(size_t map_size, size_t alignment, size_t most)
{
    if (!__atomic_load_n(&cache_count, __ATOMIC_RELAXED))
        return NULL;
    hm_mutex_lock(&cache_lock);
    size_t hi = map_size < SIZE_MAX / most ? map_size * most + most - 1 : SIZE_MAX;   /* have / most <= map_size */
    int best = cache_find(map_size, hi, alignment, false, false);
    struct hm_segment *seg = best >= 0 ? cache_take_at(best) : NULL;
    hm_mutex_unlock(&cache_lock);
    return seg;
}

/* Whether at least half of a block's pages are resident (mincore, in
 * windows of 256 pages, stopping once the answer is known).  Pages only
 * read map the shared zero page, which counts as resident: a calloc'd
 * block never written counts as filled, and one grown from it is
 * memset by calloc (its memory then resident indeed). */
static bool mostly_resident(const struct hm_segment *seg)
{
    size_t pages = seg->map_size / HM_OS_PAGE, need = (pages + 1) / 2, resident = 0;
    unsigned char vec[256];
    int saved = errno;              /* a failed mincore is an answer, not an error */
    for (size_t at = 0; at < pages && resident < need; at += sizeof vec) {
        size_t n = pages - at < sizeof vec ? pages - at : sizeof vec;
        if (resident + (pages - at) < need ||
            mincore(seg->map_base + at * HM_OS_PAGE, n * HM_OS_PAGE, vec) != 0)
            break;
        for (size_t i = 0; i < n; i++)
            resident += vec[i] & 1;
    }
    errno = saved;
    return resident >= need;
}

/* For a request that no cached block fits: the largest cached block of
 * the first layout short of it by at most an eighth, if the program
 * filled it (mostly resident).  Growing it (mremap: its pages stay, only
 * the difference faults in) reuses the memory the cache would otherwise
 * hold beside a fresh mapping: python_objects' JSON strings of 23760,
 * 23648 and 24036 KiB, the first waiting resident while the third
 * faulted in, 24 MiB more at the peak.  A block the program touched here
 * and there (the `large` benchmark's) is left: reusing it adds the pages
 * of every use (15-21% more RSS there), and a fresh mapping costs only
 * what is touched.  mincore reads the page tables (231 us for 28 MiB),
 * so only for a near miss, under the lock so that the block stays put,
 * and once a block: residency only falls while a block is cached, so one
 * found sparse is never asked again.  (Where the kernel backs every
 * mapping with huge pages, a block touched here and there is resident in
 * 2 MiB pieces, so it is grown: that costs no more memory.) */
static struct hm_segment *cache_take_filled_shorter(size_t map_size, size_t alignment)
{
    if (!__atomic_load_n(&cache_count, __ATOMIC_RELAXED))
        return NULL;
    hm_mutex_lock(&cache_lock);
    int best = cache_find(map_size - map_size / 8, map_size - 1, alignment, true, true);
    struct hm_segment *seg = NULL;
    if (best >= 0) {
        cache[best].sparse = !mostly_resident(cache[best].seg);
        if (!cache[best].sparse)
            seg = cache_take_at(best);
    }
    hm_mutex_unlock(&cache_lock);
    return seg;
}

/* How long ago `then` was: 0 if after now (a block put by another thread
 * after the caller read its clock). */
static uint64_t aged_ns(uint64_t now_ns, uint64_t then_ns)
{
    return now_ns > then_ns ? now_ns - then_ns : 0;
}

/* Takes out what must go (expired, while less than `budget` bytes went;
 * or beyond the bounds once `incoming` bytes join); the caller unmaps them
 * outside the lock. */
static unsigned cache_evict(uint64_t now_ns, uint64_t delay_ns, size_t budget,
                            struct cached_block in, struct hm_segment **out)
{
    unsigned n = 0;
    size_t in_mapped = in.seg ? in.seg->map_size : 0, bytes = 0;
    while (cache_count && ((aged_ns(now_ns, cache[0].freed_ns) >= delay_ns && (!n || bytes < budget)) ||
                           cache_count == CACHE_SLOTS ||
                           cache_mapped + in_mapped > CACHE_MAX_BYTES)) {
        bytes += cache[0].seg->map_size;
        out[n++] = cache[0].seg;
        HM_TRACE_PURGE(cache[0].seg->map_size);
        cache_remove_at(0);
    }
    return n;
}

static uint64_t cache_delay_ns;

/* A block that goes round and round between the program and the cache
 * never waits out the purge delay there, and a program that uses a
 * different part of the buffer each time (a big buffer filled in part)
 * makes all of it resident in the end: 16 buffers of 2-8 MiB, one
 * replaced each millisecond with 8 of its pages written, held 81 MiB
 * after 4 s and still growing (glibc 55, jemalloc 52).  So a block coming
 * back a purge delay or more after its first return (or its last renewal)
 * gives its pages back: what stays resident is what the program touched
 * since, as for the decay of every other free page (9-16 MiB there).
 * The clock starts at the first return, not at the mapping, so that a
 * long-lived buffer's first free costs no madvise of all it holds.  The
 * whole mapping goes, header included (saved and written back), so that
 * a huge page the block had stays whole to be faulted in again.  A
 * program that rewrites its buffers whole pays for nothing it gets: 16
 * buffers of 6 MiB, one taken, filled and freed 2000 times a second, ran
 * 1.5-5% slower (the faults of one refill of each buffer, once a delay). */
static void renew(struct hm_segment *seg, uint64_t now_ns)
{
    if (!seg->fresh_ns) {
        seg->fresh_ns = now_ns;
        return;
    }
    if (now_ns - seg->fresh_ns < cache_delay_ns)
        return;
    char header[HM_LARGE_HEADER_SIZE];
    memcpy(header, seg, sizeof header);
    if (!hm_os_advise(seg->map_base, seg->map_size, MADV_DONTNEED))
        return;                     /* nothing went: it stays as it was */
    memcpy(seg, header, sizeof header);
    seg->fresh_ns = now_ns;
    hm_count_purged(seg->map_size);
}

/* Any block of either layout (see cache_serves). */
static bool cache_put(struct hm_segment *seg)
{
    if (seg->map_size > CACHE_MAX_BLOCK)
        return false;
    struct cached_block in = { seg, hm_clock_ns(), false };
    renew(seg, in.freed_ns);
    struct hm_segment *victims[CACHE_SLOTS];
    hm_mutex_lock(&cache_lock);
    unsigned n = cache_evict(in.freed_ns, cache_delay_ns, HM_PURGE_ALL, in, victims);
    cache[cache_count] = in;
    __atomic_store_n(&cache_count, cache_count + 1, __ATOMIC_RELAXED);
    cache_mapped += in.seg->map_size;
    hm_mutex_unlock(&cache_lock);
    for (unsigned i = 0; i < n; i++)
        large_unmap(victims[i]);
    return true;
}

void hm_large_cache_config(uint64_t delay_ns)
{
    cache_delay_ns = delay_ns;
}

size_t hm_large_cache_purge(uint64_t now_ns, uint64_t delay_ns, size_t budget)
{
    if (!__atomic_load_n(&cache_count, __ATOMIC_RELAXED))
        return 0;
    struct hm_segment *victims[CACHE_SLOTS];
    hm_mutex_lock(&cache_lock);
    unsigned n = cache_evict(now_ns, delay_ns, budget, (struct cached_block){ 0 }, victims);
    hm_mutex_unlock(&cache_lock);
    size_t bytes = 0;
    for (unsigned i = 0; i < n; i++) {
        bytes += victims[i]->map_size;
        large_unmap(victims[i]);
    }
    return bytes;
}

size_t hm_large_cache_bytes(void)
{
    hm_mutex_lock(&cache_lock);
    size_t bytes = cache_mapped;
    hm_mutex_unlock(&cache_lock);
    return bytes;
}

void hm_large_fork_prepare(void)
{
    hm_mutex_lock(&cache_lock);
}

void hm_large_fork_release(void)
{
    hm_mutex_unlock(&cache_lock);
}

/* A large block's header sits at the start of the granule that holds its
 * user pointer when the alignment allows (below half a segment); otherwise
 * on the OS page right before the (granule-aligned) user pointer.  Either
 * way the granule of the user pointer maps to the header.
 *
 * That granule must hold no other block's user pointer: the segment map
 * has one entry for it.  A mapping that starts at a granule (a segment, a
 * block of the first layout) owns that granule's base; the second layout
 * puts its user pointer on a granule boundary too, even for an alignment
 * of half a segment, whose other half-way point could otherwise be another
 * such block's (mapped in the rest of the granule), and the two would
 * overwrite each other's entry. */
static bool header_in_granule(size_t alignment)
{
    return alignment < HM_SEGMENT_SIZE / 2;
}

static size_t large_map_align(size_t alignment)
{
    return alignment > HM_SEGMENT_SIZE ? alignment : HM_SEGMENT_SIZE;
}

static bool large_layout(size_t size, size_t alignment, size_t *offset, size_t *map_size,
                         size_t *map_align)
{
    if (header_in_granule(alignment))
        *offset = hm_round_up(HM_LARGE_HEADER_SIZE, alignment < 16 ? 16 : alignment);
    else
        *offset = HM_OS_PAGE;
    *map_align = large_map_align(alignment);
    size_t limit = (size_t)PTRDIFF_MAX - *offset - *map_align - HM_OS_PAGE;
    if (size > limit)
        return false;
    *map_size = hm_round_up(*offset + size, HM_OS_PAGE);
    return true;
}

static void large_init(struct hm_segment *seg, size_t map_size, size_t offset, size_t alignment)
{
    seg->kind = HM_SEGMENT_LARGE;
    atomic_store_explicit(&seg->owner, HM_OWNER_SENTINEL, memory_order_relaxed);
    seg->map_base = (char *)seg;
    seg->map_size = map_size;
    seg->user = (char *)seg + offset;
    seg->alignment = alignment;
    seg->fresh_ns = 0;                             /* never cached yet */
    for (unsigned i = 0; i < HM_SEGMENT_PAGES; i++)
        seg->page_span[i] = &hm_sentinel_span;     /* its page-map words stay 0 */
    hm_segmap_set((uintptr_t)seg->user, seg);
}

/* A cached block goes live again at its old place, its user pointer
 * where the new alignment puts it (in the same granule as the header). */
static void *large_revive(struct hm_segment *seg, size_t offset, size_t alignment)
{
    seg->user = seg->map_base + offset;
    seg->alignment = alignment;
    hm_segmap_set((uintptr_t)seg->user, seg);
    atomic_fetch_add_explicit(&hm_segment_counters.large_blocks, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&hm_segment_counters.large_bytes, seg->map_size,
                              memory_order_relaxed);
    return seg->user;
}

void *hm_large_alloc(size_t size, size_t alignment, bool *zeroed)
{
    size_t offset, map_size, map_align;
    if (!large_layout(size, alignment, &offset, &map_size, &map_align)) {
        errno = ENOMEM;
        return NULL;
    }
    struct hm_segment *cached = cache_take(map_size, alignment, 2);
    if (cached) {
        *zeroed = false;
        return large_revive(cached, offset, alignment);
    }
    if (header_in_granule(alignment) && (cached = cache_take_filled_shorter(map_size, alignment))) {
        large_revive(cached, offset, alignment);
        void *p = large_grow(cached, offset, map_size);
        if (p) {
            *zeroed = false;
            return p;
        }
        /* Out of address space (RLIMIT_AS): it goes, which leaves more. */
        large_unregister(cached);
        large_unmap(cached);
    }
    *zeroed = true;
    char *base = hm_os_map(map_size, map_align, header_in_granule(alignment) ? 0 : offset);
    if (!base) {
        errno = ENOMEM;
        return NULL;
    }
    struct hm_segment *seg = (struct hm_segment *)base;
    large_init(seg, map_size, offset, alignment);
    hm_count_mapped((int64_t)map_size);
    atomic_fetch_add_explicit(&hm_segment_counters.large_blocks, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&hm_segment_counters.large_bytes, map_size, memory_order_relaxed);
    return seg->user;
}

/* A block that a realloc grows into a large one takes a cached block of
 * up to eight times its size: the next steps of its growth then fit
 * without a remap, and a buffer built up by appends, freed and built
 * again reuses one block.  Under the plain rule (at most twice) the
 * first large step of each round (just past 2 MiB) found no cached
 * block it could take, mapped a fresh one and left the last round's
 * (6 MiB) cached: 40 rounds held 114 MB (glibc 7.5).  The block is
 * resized to half again the size, as if it had just grown (so realloc's
 * next steps keep it), which gives back what lies past that growth's
 * slack: a 20 MiB cached block taken for 3 MiB held all 20 live, beyond
 * any purge or trim. */
void *hm_large_alloc_growing(size_t size)
{
    size_t offset, map_size, map_align;
    if (large_layout(size, 0, &offset, &map_size, &map_align)) {
        struct hm_segment *seg = cache_take(map_size, 0, 8);
        if (seg) {
            large_revive(seg, offset, 0);
            /* Growing it to half again may fail (out of address space):
             * it holds map_size bytes already, so it serves as it is. */
            void *p = hm_large_resize(seg, hm_round_up(map_size + map_size / 2, HM_OS_PAGE) - offset);
            return p ? p : seg->user;
        }
    }
    bool zeroed;
    return hm_large_alloc(size, 0, &zeroed);
}

static void large_uncount(struct hm_segment *seg)
{
    atomic_fetch_sub_explicit(&hm_segment_counters.large_blocks, 1, memory_order_relaxed);
    atomic_fetch_sub_explicit(&hm_segment_counters.large_bytes, seg->map_size,
                              memory_order_relaxed);
}

/* A live block stops being one: unregistered first, so that a second
 * free of it is an invalid pointer. */
static void large_unregister(struct hm_segment *seg)
{
    hm_segmap_set((uintptr_t)seg->user, NULL);
    large_uncount(seg);
}

/* Unregistered by an exchange: of two threads that free the block at
 * once (both found it registered), one finds it gone, and returns false
 * (a double free, for the caller to report).  Both would otherwise cache
 * it, and the next two mallocs of its size would get the same block. */
bool hm_large_free(struct hm_segment *seg)
{
    if (!hm_segmap_clear((uintptr_t)seg->user, seg))
        return false;
    large_uncount(seg);
    if (!cache_put(seg))
        large_unmap(seg);
    return true;
}

size_t hm_large_usable_size(const struct hm_segment *seg)
{
    return (size_t)(seg->map_base + seg->map_size - seg->user);
}

static void large_resized(int64_t delta)
{
    hm_count_mapped(delta);
    atomic_fetch_add_explicit(&hm_segment_counters.large_bytes, (uint64_t)delta,
                              memory_order_relaxed);
}

/* The block's mapping grown to new_map, in place or moved. */
static void *large_grow(struct hm_segment *seg, size_t offset, size_t new_map)
{
    size_t old_map = seg->map_size;
    /* Grow in place when the address space after the block is free. */
    int saved = errno;
    if (mremap(seg->map_base, old_map, new_map, 0) != MAP_FAILED) {
        seg->map_size = new_map;
        large_resized((int64_t)(new_map - old_map));
        return seg->user;
    }
    errno = saved;                  /* a move may still do */
    /* Move the pages (no copy) to a place with the same alignment: reserve
     * it, then let mremap replace the reservation. */
    char *dest = hm_os_map(new_map, large_map_align(seg->alignment),
                           header_in_granule(seg->alignment) ? 0 : offset);
    if (!dest)
        return NULL;
    hm_os_mark(dest);
    char *old_base = seg->map_base;
    uintptr_t old_user = (uintptr_t)seg->user;
    /* Unregistered before the old range goes: from then on another
     * thread's mapping may take it and register the same granule. */
    hm_segmap_set(old_user, NULL);
    void *moved = mremap(old_base, old_map, new_map, MREMAP_MAYMOVE | MREMAP_FIXED, dest);
    if (moved == MAP_FAILED) {
        /* The kernel unmaps the destination before it moves, and some
         * failures (out of memory for the move) come after that, when
         * another thread may already have mapped there: only a range that
         * still carries the mark is the reservation (a failure before the
         * unmap: out of map areas, or of RLIMIT_AS). */
        hm_segmap_set(old_user, seg);
        hm_os_unmap_if_marked(dest, new_map);
        return NULL;
    }
    struct hm_segment *nseg = (struct hm_segment *)dest;
    nseg->map_base = dest;
    nseg->map_size = new_map;
    nseg->user = dest + offset;
    hm_segmap_set((uintptr_t)nseg->user, nseg);
    large_resized((int64_t)(new_map - old_map));
    return nseg->user;
}

void *hm_large_resize(struct hm_segment *seg, size_t size)
{
    size_t offset = (size_t)(seg->user - seg->map_base);
    size_t old_map = seg->map_size;
    if (size > (size_t)PTRDIFF_MAX - offset - HM_SEGMENT_SIZE)
        return NULL;
    size_t new_map = hm_round_up(offset + size, HM_OS_PAGE);
    if (new_map == old_map)
        return seg->user;
    if (new_map < old_map) {
        /* Within the slack a growth leaves (below), the block stays as it
         * is: a buffer built up by appends would otherwise be cut back to
         * each step's size and grown again, two system calls a step. */
        if (hm_round_up(new_map + new_map / 2, HM_OS_PAGE) >= old_map)
            return seg->user;
        hm_os_unmap(seg->map_base + new_map, old_map - new_map);
        seg->map_size = new_map;
        large_resized(-(int64_t)(old_map - new_map));
        return seg->user;
    }
    /* Growing: by half again at least, so a buffer grown step by step
     * costs a logarithmic number of remaps, not one per step.  The extra
     * pages are not touched, so they cost address space, not memory; where
     * that is short (RLIMIT_AS), the size asked for may still fit in place
     * (a move needs a reservation of the new size and its alignment). */
    if (new_map < old_map + old_map / 2 &&
        old_map + old_map / 2 <= (size_t)PTRDIFF_MAX - HM_SEGMENT_SIZE) {
        void *p = large_grow(seg, offset, hm_round_up(old_map + old_map / 2, HM_OS_PAGE));
        if (p)
            return p;
    }
    return large_grow(seg, offset, new_map);
}
