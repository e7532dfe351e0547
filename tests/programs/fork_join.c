/* Fork children that join a thread which ran on a stack of its own.
 *
 * glibc frees such a thread's DTV (its table of TLS blocks) in
 * pthread_join while it holds its stack-cache lock, a plain lock that
 * pthread_create takes too.  So no free may create a thread: with
 * HAKMEM_ACE=1 a fork child has no ACE thread until its first refill, and
 * a free that started it would hang the child for good.  Child j frees j
 * blocks of the DTV's size class (allocated by the parent, so they fill
 * the child's bin) before the join: for one j or another the DTV's free
 * is the one that overflows the bin and takes the slow path.
 *
 * Prints "fork_join: N children, H hung, F failed"; exits 1 unless every
 * child ended by itself within 3 s.  A hung child is killed (with every
 * signal blocked while it creates a thread, nothing else ends it). */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

enum { CHILDREN = 64, HELD = 2000, STACK = 1 << 20 };

static size_t dtv_size;

/* x86-64: the thread pointer's second word is the DTV, one 16-byte entry
 * past the start of its allocation. */
static void *measure_dtv(void *arg)
{
    void **tcb = __builtin_thread_pointer();
    dtv_size = malloc_usable_size((char *)tcb[1] - 16);
    return arg;
}

static void *nothing(void *arg)
{
    return arg;
}

static void child(void *stack, void **held, int j)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstack(&attr, stack, STACK);
    pthread_t t;
    if (pthread_create(&t, &attr, nothing, NULL))
        _exit(2);
    for (int i = 0; i < j; i++)
        free(held[i]);
    pthread_join(t, NULL);
    _exit(0);
}

int main(void)
{
    pthread_t t;
    pthread_create(&t, NULL, measure_dtv, NULL);
    pthread_join(t, NULL);
    static void *held[HELD];
    for (int i = 0; i < HELD; i++)
        held[i] = malloc(dtv_size);
    void *stack = mmap(NULL, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (stack == MAP_FAILED)
        return 2;
    int hung = 0, failed = 0;
    for (int j = 0; j < CHILDREN; j++) {
        pid_t pid = fork();
        if (pid == 0)
            child(stack, held, j);
        if (pid < 0)
            return 2;
        int status;
        pid_t done = 0;
        for (int ms = 0; ms < 3000 && (done = waitpid(pid, &status, WNOHANG)) == 0; ms += 5)
            usleep(5000);
        if (done == 0) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            hung++;
        } else if (done != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            failed++;
        }
    }
    printf("fork_join: %d children, %d hung, %d failed\n", CHILDREN, hung, failed);
    return hung || failed ? 1 : 0;
}
