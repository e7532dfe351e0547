/* fork() while other threads use stdio and allocate, and stdio in the child.
 *
 *   fork_stdio threads   one thread allocates while it holds stdout's lock
 *                        (as getdelim, or a stream's first buffer, does),
 *                        another calls fflush(NULL) (which holds the FILE
 *                        list lock while it takes each FILE's lock), and
 *                        main forks.  An allocator whose fork handler
 *                        takes its locks and then waits for the list lock
 *                        (glibc's fork takes it after the handlers) makes
 *                        a cycle with those two: the first fork hangs.
 *   fork_stdio single    a process that never had a second thread forks:
 *                        glibc then neither takes nor resets the list lock
 *                        itself, so whoever took it in a handler must let
 *                        it go in the child too.
 *   fork_stdio nested    a library's prepare handler (nest_atfork.c, run
 *                        inside the allocator's) forks once: in that
 *                        nested child glibc resets the list lock, and the
 *                        outer fork's handlers the child runs next must
 *                        not let it go again.  Each of the four processes
 *                        (this one, the nested child, and each one's
 *                        child of the outer fork) checks stdio from a new
 *                        thread.
 *   fork_stdio in_flush  a single-threaded process forks from a stream's
 *                        write function, inside fflush(NULL), so while it
 *                        holds the list lock itself: the handler that took
 *                        it again must leave the count at one in the
 *                        child (a reset to zero made fflush's own release
 *                        drop it below zero, and the child's threads hung).
 *
 * Each child opens a file and flushes every stream, then starts a thread
 * that does the same, joins it, flushes again and exits: a list lock left
 * held, or released twice (its count below zero, so that the first taker
 * never lets it go), hangs it.  A child that does not end within 3 s is killed (and
 * counted); the whole run ends within 20 s however it goes.
 *
 * Prints "fork_stdio MODE: N forks, H hung" and exits 1 if any hung. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

enum { FORKS = 200 };

void nest_atfork_arm(void);
pid_t nest_atfork_child(void);

static atomic_int stop;

static void *lock_and_allocate(void *arg)
{
    while (!atomic_load(&stop)) {
        flockfile(stdout);
        void *volatile p = malloc(3u << 20);
        free(p);
        p = malloc(100);
        free(p);
        funlockfile(stdout);
    }
    return arg;
}

static void *flush_all(void *arg)
{
    while (!atomic_load(&stop))
        fflush(NULL);
    return arg;
}

static void *open_and_flush(void *arg)
{
    FILE *f = fopen("/dev/null", "w");
    if (f) {
        fputs("x", f);
        fclose(f);
    }
    fflush(NULL);
    return arg;
}

static void child(void)
{
    alarm(3);
    open_and_flush(NULL);               /* this thread's stdio, then another's */
    pthread_t t;
    if (pthread_create(&t, NULL, open_and_flush, NULL) != 0)
        _exit(2);
    pthread_join(t, NULL);
    fflush(NULL);
    _exit(0);
}

/* stdio from a new thread: false if it does not come back within 3 s. */
static bool stdio_from_a_thread(void)
{
    pid_t pid = fork();
    if (pid == 0)
        child();
    int status;
    return waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static int nested(void)
{
    pthread_t t;
    pthread_create(&t, NULL, open_and_flush, NULL);     /* a second thread: glibc resets */
    pthread_join(t, NULL);
    alarm(20);
    nest_atfork_arm();
    pid_t pid = fork();
    if (pid == 0) {                                     /* either process's outer child */
        alarm(3);
        open_and_flush(NULL);                           /* this thread's, then another's */
        pthread_create(&t, NULL, open_and_flush, NULL);
        pthread_join(t, NULL);
        _exit(0);
    }
    int status;
    bool ok = waitpid(pid, &status, 0) == pid && WIFEXITED(status) && !WEXITSTATUS(status);
    alarm(3);
    open_and_flush(NULL);                               /* and this process's own */
    pthread_create(&t, NULL, open_and_flush, NULL);
    pthread_join(t, NULL);
    alarm(20);
    pid_t inner = nest_atfork_child();
    if (inner == 0) {
        fflush(stdout);
        _exit(ok ? 0 : 1);                              /* the nested child */
    }
    ok = ok && inner > 0 && waitpid(inner, &status, 0) == inner && WIFEXITED(status) &&
         !WEXITSTATUS(status);
    ok = ok && stdio_from_a_thread();
    printf("fork_stdio nested: %s\n", ok ? "every process's stdio works" : "FAILED");
    return !ok;
}

static pid_t in_flush_child = -1;

static ssize_t fork_in_write(void *cookie, const char *buf, size_t n)
{
    (void)cookie;
    (void)buf;
    if (in_flush_child < 0)
        in_flush_child = fork();
    return (ssize_t)n;
}

static int fork_in_flush(void)
{
    alarm(20);
    cookie_io_functions_t io = { .write = fork_in_write };
    FILE *f = fopencookie(NULL, "w", io);
    fputc('x', f);
    fflush(NULL);                       /* the list lock held while it forks */
    if (in_flush_child == 0) {
        alarm(3);
        pthread_t a, b;
        pthread_create(&a, NULL, open_and_flush, NULL);
        pthread_create(&b, NULL, open_and_flush, NULL);
        pthread_join(a, NULL);
        pthread_join(b, NULL);
        open_and_flush(NULL);
        _exit(0);
    }
    int status;
    bool ok = in_flush_child > 0 && waitpid(in_flush_child, &status, 0) == in_flush_child &&
              WIFEXITED(status) && WEXITSTATUS(status) == 0;
    printf("fork_stdio in_flush: %s\n", ok ? "the child's stdio works" : "FAILED");
    return !ok;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "nested") == 0)
        return nested();
    if (argc == 2 && strcmp(argv[1], "in_flush") == 0)
        return fork_in_flush();
    bool threads = argc > 1 && strcmp(argv[1], "threads") == 0;
    if (argc != 2 || (!threads && strcmp(argv[1], "single") != 0)) {
        fprintf(stderr, "usage: fork_stdio threads|single|nested|in_flush\n");
        return 2;
    }
    alarm(20);
    pthread_t t[2];
    if (threads) {
        pthread_create(&t[0], NULL, lock_and_allocate, NULL);
        pthread_create(&t[1], NULL, flush_all, NULL);
    }
    int hung = 0, failed = 0;
    for (int i = 0; i < FORKS; i++) {
        pid_t pid = fork();
        if (pid < 0)
            return 2;
        if (pid == 0)
            child();
        int status;
        waitpid(pid, &status, 0);
        hung += WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM;
        failed += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    }
    atomic_store(&stop, 1);
    if (threads) {
        pthread_join(t[0], NULL);
        pthread_join(t[1], NULL);
    }
    printf("fork_stdio %s: %d forks, %d hung, %d failed\n", argv[1], FORKS, hung, failed);
    return hung || failed;
}
