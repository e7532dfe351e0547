/* glibc's malloc extras as programs use them: mallinfo2 to watch memory in
 * use grow and shrink, malloc_trim, mallopt, malloc_info.  Prints the same
 * stdout under glibc and under hakmem: each line is a property both must
 * have. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { N = 8192, SIZE = 1000 };
static char *blocks[N];

#define MiB(x) ((size_t)(x) << 20)

static void say(const char *what, int ok)
{
    printf("%s: %s\n", what, ok ? "yes" : "NO");
}

int main(void)
{
    struct mallinfo2 m0 = mallinfo2();
    for (int i = 0; i < N; i++) {
        blocks[i] = malloc(SIZE);
        memset(blocks[i], i, SIZE);
    }
    struct mallinfo2 m1 = mallinfo2();
    say("in use grew by the 8 MB allocated", m1.uordblks >= m0.uordblks + MiB(7));
    say("the arena holds what is in use and free", m1.arena >= m1.uordblks + m1.fordblks);
    for (int i = 0; i < N; i++)
        free(blocks[i]);
    struct mallinfo2 m2 = mallinfo2();
    say("in use shrank when they were freed", m2.uordblks + MiB(6) <= m1.uordblks);

    char *big = malloc(MiB(64));
    memset(big, 1, 4096);
    struct mallinfo2 m3 = mallinfo2();
    say("a 64 MiB block counts as mapped", m3.hblks >= m2.hblks + 1 && m3.hblkhd >= m2.hblkhd + MiB(64));
    free(big);
    char *mid = malloc(MiB(16));        /* hakmem keeps a freed block this size mapped a while */
    memset(mid, 1, MiB(16));
    free(mid);
    struct mallinfo2 m3b = mallinfo2();
    /* glibc: arena - fordblks is what is in use; a freed block that the
     * allocator keeps mapped counts as free, not in use. */
    say("after the free, arena - fordblks is what is in use",
        m3b.arena >= m3b.fordblks && m3b.arena - m3b.fordblks - m3b.uordblks < MiB(1));

    int trimmed = malloc_trim(0);
    say("malloc_trim says 0 or 1", trimmed == 0 || trimmed == 1);
    struct mallinfo2 m4 = mallinfo2();
    say("after the trim little is left to trim", m4.keepcost < MiB(1));
    say("after the trim the big block is gone", m4.hblkhd + MiB(64) <= m3.hblkhd);

    say("mallopt accepts M_TRIM_THRESHOLD", mallopt(M_TRIM_THRESHOLD, 256 * 1024) == 1);
    say("mallopt refuses a fastbin bound above 160 bytes", mallopt(M_MXFAST, 1000000) == 0);

    char *xml = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&xml, &len);
    int rc = malloc_info(0, f);
    fclose(f);
    say("malloc_info writes its XML", rc == 0 && xml && strncmp(xml, "<malloc version=", 16) == 0);
    say("its XML has a heap, the mmap total and the current system size",
        xml && strstr(xml, "<heap nr=\"0\">") && strstr(xml, "<total type=\"mmap\" count=\"") &&
        strstr(xml, "<system type=\"current\" size=\""));
    free(xml);
    f = open_memstream(&xml, &len);
    say("malloc_info refuses options with EINVAL", malloc_info(1, f) == EINVAL);
    fclose(f);
    free(xml);
    return 0;
}
