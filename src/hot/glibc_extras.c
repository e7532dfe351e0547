/* glibc's malloc extras, exported by the shared library only, so programs
 * that call them talk to the allocator that owns their blocks. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdio.h>
#include <unistd.h>

#include "hot.h"
#include "../segment/segment.h"

#define HM_EXPORT __attribute__((visibility("default")))

HM_EXPORT int malloc_trim(size_t pad)
{
    (void)pad;
    return hakmem_trim();
}

HM_EXPORT int mallopt(int param, int value)
{
    (void)param;
    (void)value;
    return 1;   /* accepted: hakmem tunes itself */
}

/* The names glibc also exports these under (see api.c). */
HM_EXPORT int __libc_mallopt(int param, int value)
{
    return mallopt(param, value);
}

/* In glibc's terms: the arena is our span segments (headers included),
 * in use are their pages in spans (blocks out, and free blocks still in
 * their spans or in caches), free are their free pages, and keepcost is
 * what malloc_trim(0) would give back of those now (free pages still
 * resident).  Large blocks are glibc's mmapped chunks. */
HM_EXPORT struct mallinfo2 mallinfo2(void)
{
    struct hakmem_stats s;
    hakmem_stats(&s);
    struct hm_segment_usage u;
    hm_segment_usage(&u);
    struct mallinfo2 mi = { 0 };
    mi.arena = s.bytes_mapped - s.large_bytes;
    mi.uordblks = u.span_bytes;
    mi.fordblks = u.free_bytes;
    mi.keepcost = u.resident_free_bytes;
    mi.hblks = s.large_blocks;
    mi.hblkhd = s.large_bytes;
    return mi;
}

/* The old struct: int fields, so figures past 2 GiB wrap as in glibc. */
static struct mallinfo mallinfo_int(void)
{
    struct mallinfo2 m2 = mallinfo2();
    struct mallinfo mi = { 0 };
    mi.arena = (int)m2.arena;
    mi.hblks = (int)m2.hblks;
    mi.hblkhd = (int)m2.hblkhd;
    mi.uordblks = (int)m2.uordblks;
    mi.fordblks = (int)m2.fordblks;
    mi.keepcost = (int)m2.keepcost;
    return mi;
}

HM_EXPORT struct mallinfo mallinfo(void)
{
    return mallinfo_int();
}

HM_EXPORT struct mallinfo __libc_mallinfo(void)
{
    return mallinfo_int();
}

HM_EXPORT void malloc_stats(void)
{
    hakmem_stats_print(STDERR_FILENO);
}

HM_EXPORT int malloc_info(int options, FILE *fp)
{
    if (options != 0)
        return -1;
    struct hakmem_stats s;
    hakmem_stats(&s);
    fprintf(fp, "<malloc version=\"hakmem-%s\">\n<system type=\"current\" size=\"%llu\"/>\n</malloc>\n",
            HAKMEM_VERSION, (unsigned long long)s.bytes_mapped);
    return 0;
}
