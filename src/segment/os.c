/* OS memory: mappings, and the segment map that names their owners. */
#define _GNU_SOURCE
#include "os_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct hm_segmap hm_segmap;
struct hm_pagemap hm_pagemap;
struct hm_segment_counters hm_segment_counters;

static void *reserve(size_t bytes)
{
    void *t = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return t == MAP_FAILED ? NULL : t;
}

int hm_segment_module_init(void)
{
    size_t entries = (size_t)1 << (HM_ADDRESS_BITS - HM_SEGMENT_SHIFT);
    struct hm_segment *_Atomic *t = reserve(entries * sizeof(void *));
    if (!t)
        return -1;
    hm_segmap.table = t;
    atomic_store_explicit(&hm_segmap.table[0], HM_SEGMAP_POISON, memory_order_relaxed);
    __atomic_store_n(&hm_segmap.entries, entries, __ATOMIC_RELEASE);

    /* Without a page map (the OS refused 16 GiB of address space) every
     * free takes the slow path, which needs only the segment map. */
    size_t pages = (size_t)1 << (HM_ADDRESS_BITS - HM_PAGE_SHIFT);
    _Atomic uintptr_t *p = reserve(pages * sizeof(uintptr_t));
    if (p) {
        hm_pagemap.table = p;
        __atomic_store_n(&hm_pagemap.entries, pages, __ATOMIC_RELEASE);
    }
    return 0;
}

void hm_pagemap_set(uintptr_t page_address, size_t pages, uintptr_t tag)
{
    if (!hm_pagemap.entries)
        return;
    uintptr_t first = page_address >> HM_PAGE_SHIFT;
    for (size_t i = 0; i < pages; i++)
        atomic_store_explicit(&hm_pagemap.table[first + i], tag, memory_order_relaxed);
}

void hm_segmap_set(uintptr_t u, struct hm_segment *seg)
{
    atomic_store_explicit(&hm_segmap.table[u >> HM_SEGMENT_SHIFT], seg,
                          memory_order_release);
}

/* Clears u's entry if it still names seg; false if it did not. */
bool hm_segmap_clear(uintptr_t u, struct hm_segment *seg)
{
    return atomic_compare_exchange_strong_explicit(&hm_segmap.table[u >> HM_SEGMENT_SHIFT], &seg,
                                                   NULL, memory_order_acq_rel,
                                                   memory_order_relaxed);
}

/* Maps `size` bytes at an address base such that base + offset is a
 * multiple of `align`.  Tries the plain mapping first: the kernel often
 * hands out addresses right below the previous mapping, which keeps
 * segment-sized requests aligned without trimming. */
char *hm_os_map(size_t size, size_t align, size_t offset)
{
    char *p;
    /* Only whole multiples of the alignment tend to come back aligned
     * (the kernel stacks mappings downwards): try the plain call for them. */
    if (size % align == 0 && offset == 0) {
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return NULL;
        if (((uintptr_t)p & (align - 1)) == 0)
            return p;
        munmap(p, size);
    }

    size_t span = size + align;
    if (span < size)
        return NULL;
    p = mmap(NULL, span, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    uintptr_t want = (((uintptr_t)p + offset + align - 1) & ~(uintptr_t)(align - 1)) - offset;
    char *base = (char *)want;
    if (base > p)
        munmap(p, (size_t)(base - p));
    char *end = p + span;
    if (end > base + size)
        munmap(base + size, (size_t)(end - (base + size)));
    return base;
}

/* A reservation's mark: its first word, a value tied to its address that
 * another mapping there is all but certain not to hold. */
static uint64_t mark_of(const void *p)
{
    return (uint64_t)(uintptr_t)p ^ 0x686b6d2e72657376ull;
}

void hm_os_mark(void *p)
{
    *(uint64_t *)p = mark_of(p);
}

/* A word read where nothing may be mapped (or readable) without a fault:
 * the kernel copies it into a pipe, or fails with EFAULT. */
static bool read_word(const void *p, uint64_t *out)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return false;
    bool ok = write(fds[1], p, sizeof *out) == (ssize_t)sizeof *out &&
              read(fds[0], out, sizeof *out) == (ssize_t)sizeof *out;
    close(fds[0]);
    close(fds[1]);
    return ok;
}

void hm_os_unmap_if_marked(void *p, size_t size)
{
    uint64_t word;
    if (read_word(p, &word) && word == mark_of(p))
        hm_os_unmap(p, size);
}

/* The calls below are ones whose callers go on whether they worked or
 * not (a page locked by mlockall, a kernel without huge pages, a range
 * the kernel cannot split for want of map areas), from inside malloc,
 * free and realloc, which must not change errno when they succeed
 * (glibc's free never does; a getline loop that checks errno after EOF
 * read a realloc's stale ENOMEM as an error). */
void hm_os_unmap(void *p, size_t size)
{
    int saved = errno;
    munmap(p, size);
    errno = saved;
}

/* A short sleep by the raw system call: glibc's nanosleep is a thread
 * cancellation point, and malloc and malloc_trim must not be. */
void hm_nap_ns(long ns)
{
    struct timespec nap = { 0, ns };
    int saved = errno;              /* EINTR: the nap was shorter, that is all */
    syscall(SYS_nanosleep, &nap, NULL);
    errno = saved;
}

/* A waiter's pause at its `spins`th try for a lock held for at most a few
 * milliseconds: it spins, then yields, then sleeps (on a machine with
 * fewer cores than threads the holder may not be running, and under
 * SCHED_FIFO a yield never lets a lower priority run). */
void hm_lock_backoff(unsigned spins)
{
    if (spins < 64)
        __builtin_ia32_pause();
    else if (spins < 128)
        sched_yield();
    else
        hm_nap_ns(20000);
}

bool hm_os_advise(void *p, size_t size, int advice)
{
    int saved = errno;
    bool ok = madvise(p, size, advice) == 0;
    errno = saved;
    return ok;
}

void hm_count_mapped(int64_t bytes)
{
    atomic_fetch_add_explicit(&hm_segment_counters.bytes_mapped, (uint64_t)bytes,
                              memory_order_relaxed);
}

bool hm_os_huge_pages(void *p, size_t size, bool on)
{
    return hm_os_advise(p, size, on ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
}
