/* An interposer in the executable: malloc, calloc and realloc count their
 * calls and forward to glibc's exported names (__libc_malloc, ...), as leak
 * tracers and test harnesses do.  free is not interposed, so under
 * LD_PRELOAD it is the preloaded allocator's: the blocks __libc_malloc
 * hands out must be that allocator's too.  The reverse as well: blocks of
 * posix_memalign, aligned_alloc and strdup's malloc go to __libc_free.
 * Prints the same stdout with or without hakmem; says on stderr whether
 * the __libc_ names are hakmem's. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_valloc(size_t);
extern void *__libc_pvalloc(size_t);
extern int __libc_mallopt(int, int);

static unsigned long calls;

void *malloc(size_t n)
{
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    return __libc_malloc(n);
}

void *calloc(size_t n, size_t size)
{
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    return __libc_calloc(n, size);
}

void *realloc(void *p, size_t n)
{
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    return __libc_realloc(p, n);
}

static int failures;

static void check(int ok, const char *what)
{
    if (!ok) {
        printf("FAILED: %s\n", what);
        failures++;
    }
}

static int aligned(const void *p, size_t a)
{
    return ((uintptr_t)p & (a - 1)) == 0;
}

/* Blocks from the interposed malloc, freed on another thread by free. */
#define SHARED 2000
static char *shared[SHARED];

static void *free_them(void *arg)
{
    (void)arg;
    for (int i = 0; i < SHARED; i++) {
        check(shared[i][0] == (char)i && shared[i][(i % 500)] == (char)i, "content across threads");
        free(shared[i]);
    }
    return NULL;
}

int main(void)
{
    void *own = dlsym(RTLD_DEFAULT, "hakmem_malloc");
    fprintf(stderr, "libc names: %s\n",
            own && own == dlsym(RTLD_DEFAULT, "__libc_malloc") ? "hakmem" : "not hakmem");

    for (int i = 0; i < SHARED; i++) {
        shared[i] = malloc((size_t)(i % 500) + 1);
        memset(shared[i], i, (size_t)(i % 500) + 1);
    }
    pthread_t t;
    pthread_create(&t, NULL, free_them, NULL);
    pthread_join(t, NULL);

    /* Each size class, a page block, a large block: grow by realloc. */
    char *p = malloc(1);
    p[0] = 'x';
    for (size_t n = 2; n <= (4u << 20); n *= 3) {
        p = realloc(p, n);
        check(p && p[0] == 'x' && aligned(p, 16), "realloc keeps content");
        p[n - 1] = 'y';
    }
    free(p);

    int *z = calloc(1000, sizeof *z);
    int zero = 1;
    for (int i = 0; i < 1000; i++)
        zero &= z[i] == 0;
    check(zero, "calloc zeroes");
    __libc_free(z);

    for (size_t a = 16; a <= 65536; a *= 4) {
        void *m = __libc_memalign(a, 100);
        check(m && aligned(m, a), "__libc_memalign aligns");
        free(m);
        void *q = NULL;
        check(posix_memalign(&q, a, 3000) == 0 && aligned(q, a), "posix_memalign aligns");
        __libc_free(q);
    }
    void *v = __libc_valloc(10);
    check(v && aligned(v, 4096), "__libc_valloc page-aligned");
    free(v);
    char *pv = __libc_pvalloc(5000);
    check(pv && aligned(pv, 4096) && malloc_usable_size(pv) >= 8192, "__libc_pvalloc rounds up");
    pv[8191] = 1;
    free(pv);

    char *s = strdup("duplicated by libc");
    check(s && strcmp(s, "duplicated by libc") == 0, "strdup");
    __libc_free(s);
    char *a = aligned_alloc(256, 512);
    check(a && aligned(a, 256), "aligned_alloc aligns");
    __libc_free(a);
    __libc_free(NULL);
    check(__libc_mallopt(M_TRIM_THRESHOLD, 1 << 20) == 1, "__libc_mallopt accepts");

    printf("interposed calls counted: %s\n", calls >= SHARED + 15 ? "yes" : "no");
    printf("%s\n", failures ? "failed" : "all checks passed");
    return failures != 0;
}
