/* Process box: process-wide set-up, options, fork handling and exit report.
 *
 * Set-up runs in two phases.  Phase 1 (segment map, free key, options,
 * thread-exit key) calls nothing that can allocate; a thread that re-enters
 * malloc during it is served from a static bootstrap arena instead of
 * recursing.  Phase 2 (fork handlers) may allocate: by then the allocator
 * works. */
#ifndef HM_PROCESS_H
#define HM_PROCESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

extern _Atomic int hm_process_state;   /* 0 new, 1 phase 1, 2 ready */
#define HM_PROCESS_READY 2

struct hm_options {
    bool stats;             /* HAKMEM_STATS=1: per-class report at exit */
    int stats_fd;           /* a copy of stderr for that report */
    uint64_t purge_delay_ns; /* HAKMEM_PURGE_DELAY_MS: free pages stay resident that long */
    uint64_t tcache_max_bytes; /* HAKMEM_TCACHE_MAX_KB: all thread caches together */
    bool huge_pages;        /* HAKMEM_THP (default 1): big heaps ask for huge pages */
};
extern struct hm_options hm_options;

/* Makes sure the process is set up.  False only while this very thread is
 * in phase 1 (a re-entrant call): the caller then uses the bootstrap arena. */
bool hm_process_init(void);

/* Static arena for allocations made while set-up is in progress.  Its
 * blocks are never reused; free() of them is a no-op. */
void *hm_bootstrap_alloc(size_t size, size_t alignment);
bool hm_bootstrap_owns(const void *p);
size_t hm_bootstrap_usable_size(const void *p);

/* Test hook: called once during phase 1 when set (tests of re-entrancy). */
extern void (*hm_init_test_hook)(void);

#endif
