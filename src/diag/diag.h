/* Diagnostics box: messages that must work inside the allocator, so they
 * never allocate (no stdio): they format into a stack buffer and write(2). */
#ifndef HM_DIAG_H
#define HM_DIAG_H

#include <stddef.h>
#include <stdint.h>

/* Writes "hakmem: CALL(): WHAT PTR" to stderr and aborts. */
__attribute__((noreturn, cold))
void hm_fatal(const char *call, const char *what, const void *ptr);

/* A tiny line builder for reports.  A longer line is cut: 512 bytes hold
 * the longest, the totals of HAKMEM_STATS (twelve counters of up to 20
 * digits with their names, then page_map= and ace=: about 440). */
struct hm_line {
    char buf[512];
    size_t len;
};
void hm_line_str(struct hm_line *l, const char *s);
void hm_line_u64(struct hm_line *l, uint64_t v, unsigned width);
void hm_line_hex(struct hm_line *l, uintptr_t v);
void hm_line_write(struct hm_line *l, int fd);   /* writes and clears */

#endif
