/* Allocates before main, from a constructor that also uses dlsym, stdio,
 * getenv and pthread_create: under LD_PRELOAD these reach the allocator
 * while the process is still starting.  Prints the same stdout with or
 * without hakmem; says on stderr whether hakmem is the allocator. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static char *early;
static long thread_sum;

static void *worker(void *arg)
{
    long sum = 0;
    for (int i = 0; i < 1000; i++) {
        char *p = malloc((size_t)(i % 300) + 1);
        memset(p, i & 0xff, (size_t)(i % 300) + 1);
        sum += p[0];
        free(p);
    }
    *(long *)arg = sum;
    return NULL;
}

__attribute__((constructor(101))) static void before_main(void)
{
    early = strdup("allocated before main");
    void *sym = dlsym(RTLD_DEFAULT, "hakmem_version");
    fprintf(stderr, "allocator: %s\n", sym ? ((const char *(*)(void))sym)() : "not hakmem");
    const char *home = getenv("HOME");
    char *copy = malloc(strlen(home ? home : "") + 1);
    strcpy(copy, home ? home : "");
    free(copy);
    pthread_t t;
    pthread_create(&t, NULL, worker, &thread_sum);
    pthread_join(t, NULL);
}

int main(void)
{
    printf("%s\n", early);
    printf("thread sum %ld\n", thread_sum);
    free(early);
    size_t total = 0;
    for (size_t n = 1; n < (8u << 20); n = n * 3 + 1) {
        char *p = calloc(1, n);
        total += n * (p[n - 1] == 0);
        free(p);
    }
    printf("calloc total %zu\n", total);
    pid_t pid = fork();
    if (pid == 0) {
        char *p = malloc(1000);
        snprintf(p, 1000, "child allocates after fork");
        puts(p);
        free(p);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    printf("child exit %d\n", WEXITSTATUS(status));
    return 0;
}
