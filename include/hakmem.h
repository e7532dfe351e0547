/* hakmem: a malloc replacement for long-running servers.
 *
 * Load it with LD_PRELOAD=libhakmem.so, or link it: the shared library
 * exports the standard names (malloc, free, ...) as aliases of the
 * hakmem_* functions below.  The static library exports only the hakmem_*
 * names, so it can live beside another allocator (or a sanitizer). */
#ifndef HAKMEM_H
#define HAKMEM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HAKMEM_VERSION "0.2.0"   /* 0.2: hakmem_class_info gained blocks_drained */

#if defined(__GNUC__)
#define HAKMEM_API __attribute__((visibility("default")))
#else
#define HAKMEM_API
#endif

HAKMEM_API void *hakmem_malloc(size_t size);
HAKMEM_API void  hakmem_free(void *p);
HAKMEM_API void *hakmem_calloc(size_t n, size_t size);
HAKMEM_API void *hakmem_realloc(void *p, size_t size);
HAKMEM_API void *hakmem_reallocarray(void *p, size_t n, size_t size);
HAKMEM_API int   hakmem_posix_memalign(void **out, size_t alignment, size_t size);
HAKMEM_API void *hakmem_aligned_alloc(size_t alignment, size_t size);
HAKMEM_API void *hakmem_memalign(size_t alignment, size_t size);
HAKMEM_API void *hakmem_valloc(size_t size);
HAKMEM_API void *hakmem_pvalloc(size_t size);
HAKMEM_API size_t hakmem_malloc_usable_size(void *p);
HAKMEM_API void  hakmem_free_sized(void *p, size_t size);
HAKMEM_API void  hakmem_free_aligned_sized(void *p, size_t alignment, size_t size);

/* Gives back to the OS now what is free (what malloc_trim(0) does): this
 * thread's cached blocks, every thread's stashes, empty spans and
 * segments, and the pages of every thread's partly used spans that hold
 * only free blocks.  Other threads' bins stay theirs.  1 when memory went
 * back. */
HAKMEM_API int hakmem_trim(void);

/* Returns "hakmem <version>": also a way to prove the preload is active
 * (dlsym(RTLD_DEFAULT, "hakmem_version") finds it only under hakmem). */
HAKMEM_API const char *hakmem_version(void);

/* What the allocator knows about one size class.  Counters are summed over
 * live and exited threads; reads of live threads' counters are racy but
 * never torn on x86-64. */
struct hakmem_class_info {
    uint32_t size_class;
    uint32_t block_size;
    uint32_t refill_count;      /* blocks the next refill will carve */
    uint32_t refill_default;
    uint32_t refill_min;
    uint32_t refill_max;
    uint64_t refills;           /* refills of thread caches */
    uint64_t blocks_refilled;   /* blocks handed to thread caches */
    uint64_t flushes;           /* thread cache overflows */
    uint64_t blocks_flushed;    /* blocks that left a bin by overflows (to spans or the stash) */
    uint64_t remote_frees;      /* blocks freed by a thread that does not own them */
    uint64_t blocks_cached;     /* blocks sitting in thread caches (bins and stashes):
                                 * the caller's bins now, other threads' bins
                                 * as their last refill or overflow left them */
    uint64_t ace_events;        /* refill events the ACE thread received */
    uint64_t ace_drops;         /* refill events dropped (queue full) */
    uint64_t blocks_drained;    /* frees handed back to their spans while the
                                 * class's live set shrank (those of up to
                                 * 1 KiB counted when their thread's batch
                                 * of at most 32 goes back) */
};

struct hakmem_stats {
    uint64_t bytes_mapped;      /* segments and large blocks now mapped */
    uint64_t segments;          /* segments now mapped */
    uint64_t large_blocks;      /* large blocks now live */
    uint64_t large_bytes;
    uint64_t threads_live;
    uint64_t threads_exited;
    uint64_t segments_abandoned;
    uint64_t segments_adopted;
    uint64_t bytes_purged;      /* free pages given back to the OS, ever */
};

HAKMEM_API unsigned hakmem_class_count(void);
HAKMEM_API int hakmem_class_info(unsigned size_class, struct hakmem_class_info *out);
HAKMEM_API void hakmem_stats(struct hakmem_stats *out);
/* Writes the per-class table (as HAKMEM_STATS=1 does at exit) to fd. */
HAKMEM_API void hakmem_stats_print(int fd);

#ifdef __cplusplus
}
#endif
#endif
