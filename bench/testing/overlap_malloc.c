/* A deliberately broken malloc, for testing the benchmarks' verification.
 *
 * LD_PRELOAD it under a benchmark: every 997th malloc returns the block the
 * previous malloc returned (if it is big enough) while that block is still
 * live, i.e. two live blocks overlap.  The benchmark must notice and exit
 * with status 1.  The duplicated pointer's first free is swallowed so glibc
 * never sees a double free (which would abort instead of letting the
 * benchmark report). Single-threaded benchmarks only. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stddef.h>

extern void *__libc_malloc(size_t n);
extern void __libc_free(void *p);

#define EVERY 997
#define PENDING 64

static unsigned long calls;
static void *last;
static void *dup[PENDING]; /* pointers handed out twice, free once more */

static int dup_add(void *p)
{
    for (int i = 0; i < PENDING; i++)
        if (!dup[i]) {
            dup[i] = p;
            return 1;
        }
    return 0;
}

void *malloc(size_t n)
{
    if (++calls % EVERY == 0 && last && malloc_usable_size(last) >= n && dup_add(last))
        return last;
    last = __libc_malloc(n);
    return last;
}

void free(void *p)
{
    for (int i = 0; p && i < PENDING; i++)
        if (dup[i] == p) {
            dup[i] = NULL;
            return;
        }
    if (p == last)
        last = NULL;
    __libc_free(p);
}
