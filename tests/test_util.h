/* Helpers shared by the cmocka tests. */
#ifndef HM_TEST_UTIL_H
#define HM_TEST_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static inline void fill(void *p, size_t n, unsigned seed)
{
    unsigned char *c = p;
    for (size_t i = 0; i < n; i++)
        c[i] = (unsigned char)(seed * 31u + i * 7u);
}

static inline int check(const void *p, size_t n, unsigned seed)
{
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++)
        if (c[i] != (unsigned char)(seed * 31u + i * 7u))
            return 0;
    return 1;
}

/* splitmix64: a fixed-seed stream for reproducible workloads. */
static inline uint64_t next_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Sanitizers keep shadow memory for everything the program touches, and
 * madvise does not drop it: RSS says nothing about the allocator there. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define HM_RSS_MEANINGFUL 0
#else
#define HM_RSS_MEANINGFUL 1
#endif
#define skip_unless_rss_meaningful() do { if (!HM_RSS_MEANINGFUL) skip(); } while (0)

static inline long rss_kb(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, resident = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &size, &resident) != 2)
            resident = 0;
        fclose(f);
    }
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

/* Runs fn(arg) on a thread of its own, to its end (and the thread's). */
static inline void run_thread(void *(*fn)(void *), void *arg)
{
    pthread_t t;
    pthread_create(&t, NULL, fn, arg);
    pthread_join(t, NULL);
}

/* Runs fn in a child with stderr captured; returns the child's wait status
 * and leaves what it wrote in buf. */
static inline int run_child(void (*fn)(void), char *buf, size_t len)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        fn();
        _exit(0);
    }
    close(fds[1]);
    size_t got = 0;
    ssize_t r;
    while (got + 1 < len && (r = read(fds[0], buf + got, len - 1 - got)) > 0)
        got += (size_t)r;
    buf[got] = 0;
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return status;
}

/* Runs fn in a child, which must exit with `code`, not die of a signal;
 * what it wrote to stderr is left in buf (and shown if it did not). */
static inline void expect_exit(void (*fn)(void), int code, char *buf, size_t len)
{
    int status = run_child(fn, buf, len);
    if (!WIFEXITED(status))
        fail_msg("child died of signal %d: %s", WTERMSIG(status), buf);
    if (WEXITSTATUS(status) != code)
        fail_msg("child exited with %d, not %d: %s", WEXITSTATUS(status), code, buf);
}

/* Runs fn in a child, which must die of SIGABRT having said `message`. */
static inline void expect_abort(void (*fn)(void), const char *message)
{
    char buf[512];
    int status = run_child(fn, buf, sizeof buf);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGABRT);
    if (!strstr(buf, message))
        fail_msg("expected \"%s\", got \"%s\"", message, buf);
}

#endif
