/* Segment box internals: OS mappings and the segment map.  Only
 * src/segment/ includes this. */
#ifndef HM_OS_INTERNAL_H
#define HM_OS_INTERNAL_H

#include "segment.h"

/* Maps `size` bytes at a base such that base + offset is a multiple of
 * `align`; NULL when the OS refuses. */
char *hm_os_map(size_t size, size_t align, size_t offset);
void hm_os_unmap(void *p, size_t size);
/* A reservation that a call may replace or fail to (mremap onto it): the
 * mark written into its first page before, and the unmap after a failure
 * only if the range still carries it, so never another mapping that took
 * its place. */
void hm_os_mark(void *p);
void hm_os_unmap_if_marked(void *p, size_t size);
/* Turns transparent huge pages on (or off) for [p, p + size): madvise
 * MADV_HUGEPAGE or MADV_NOHUGEPAGE.  False when the OS refuses. */
bool hm_os_huge_pages(void *p, size_t size, bool on);

void hm_segmap_set(uintptr_t u, struct hm_segment *seg);
bool hm_segmap_clear(uintptr_t u, struct hm_segment *seg);
/* Sets the page-map words of `pages` pages from page_address on. */
void hm_pagemap_set(uintptr_t page_address, size_t pages, uintptr_t tag);
void hm_count_mapped(int64_t bytes);
/* `bytes` went back to the OS with MADV_DONTNEED: counted and traced. */
void hm_count_purged(size_t bytes);

#endif
