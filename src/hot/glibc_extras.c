/* glibc's malloc extras, exported by the shared library only, so programs
 * that call them talk to the allocator that owns their blocks. */
#define _GNU_SOURCE
#include <errno.h>
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

/* Accepted, as hakmem tunes itself, except where glibc refuses the value
 * (it returns 0 then, and a program may check): a fastbin bound above
 * its 160 bytes. */
HM_EXPORT int mallopt(int param, int value)
{
    if (param == M_MXFAST)
        return value >= 0 && value <= 160;
    return 1;
}

/* The names glibc also exports these under (see api.c). */
HM_EXPORT int __libc_mallopt(int param, int value)
{
    return mallopt(param, value);
}

/* In glibc's terms: the arena is our span segments (headers included)
 * and the freed large blocks the cache keeps mapped, in use are the
 * segments' pages in spans (blocks out, and free blocks still in their
 * spans or in caches), free are their free pages and those cached large
 * blocks (so that arena - fordblks is what is in use, as in glibc), and
 * keepcost is what malloc_trim(0) would give back of the free pages now
 * (those still resident).  Live large blocks are glibc's mmapped chunks. */
HM_EXPORT struct mallinfo2 mallinfo2(void)
{
    struct hakmem_stats s;
    hakmem_stats(&s);
    struct hm_segment_usage u;
    hm_segment_usage(&u);
    struct mallinfo2 mi = { 0 };
    mi.arena = s.bytes_mapped - s.large_bytes;
    mi.uordblks = u.span_bytes;
    mi.fordblks = u.free_bytes + hm_large_cache_bytes();
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

/* Through the stderr stream, as glibc's: whatever the program buffered
 * there comes first, and a freopen'd stderr gets it. */
HM_EXPORT void malloc_stats(void)
{
    fflush(stderr);
    hakmem_stats_print(fileno(stderr) >= 0 ? fileno(stderr) : STDERR_FILENO);
}

/* glibc's layout (one heap, then the totals), so that a program reading
 * its elements finds them: size classes are not glibc's bins, so the
 * sizes element is empty; "rest" is free memory, "mmap" the live large
 * blocks; no "max" (hakmem does not keep a peak). */
HM_EXPORT int malloc_info(int options, FILE *fp)
{
    if (options != 0)
        return EINVAL;
    struct mallinfo2 m = mallinfo2();
    unsigned long long mapped = m.arena + m.hblkhd;
    fprintf(fp,
            "<malloc version=\"1\">\n"
            "<heap nr=\"0\">\n<sizes>\n</sizes>\n"
            "<total type=\"fast\" count=\"0\" size=\"0\"/>\n"
            "<total type=\"rest\" count=\"0\" size=\"%zu\"/>\n"
            "<system type=\"current\" size=\"%zu\"/>\n"
            "<aspace type=\"total\" size=\"%zu\"/>\n"
            "</heap>\n"
            "<total type=\"fast\" count=\"0\" size=\"0\"/>\n"
            "<total type=\"rest\" count=\"0\" size=\"%zu\"/>\n"
            "<total type=\"mmap\" count=\"%zu\" size=\"%zu\"/>\n"
            "<system type=\"current\" size=\"%llu\"/>\n"
            "<aspace type=\"total\" size=\"%llu\"/>\n"
            "</malloc>\n",
            m.fordblks, m.arena, m.arena, m.fordblks, m.hblks, m.hblkhd, mapped, mapped);
    return 0;
}
