/* A workload for acectl's integration test: threads that churn one small
 * size in bursts larger than a thread cache, so that the class refills often
 * and the ACE thread has something to learn.  Run it with
 * LD_PRELOAD=libhakmem.so HAKMEM_ACE=1.
 *
 *   acectl_workload [--seconds S] [--threads T] [--size B] [--burst N]
 *                   [--fork] [--child-seconds S] [--pinned MB]
 *
 * --pinned MB: before the threads start, the main thread allocates MB of
 * 100 B blocks and frees all but one in 100, which pin every span they
 * are in: memory only a trim gives back before the purge delay (acectl
 * trim's test runs this with a long delay).  Prints "pinned" when done. 
 * Prints "pid <pid>" at start; with --fork, forks once after 0.3 s and the
 * child (which churns on its own main thread, then exits normally) prints
 * "child <pid>".  The parent waits for the child before it exits.  SIGTERM
 * or SIGINT ends the run early but still through a normal exit, so hakmem's
 * exit handlers (which remove the region) run. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct options {
    double seconds, child_seconds;
    int threads;
    size_t size, burst, pinned_mb;
    int fork;
};

static atomic_bool stop;

static void on_term(int sig)
{
    (void)sig;
    atomic_store(&stop, true);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_s(double s)
{
    struct timespec ts = { (time_t)s, (long)((s - (double)(time_t)s) * 1e9) };
    nanosleep(&ts, NULL);
}

/* One burst: allocate n blocks, touch them, free them all.  The frees
 * overflow the bin, the allocations empty it: refills at a high rate. */
static unsigned long burst(void **held, size_t n, size_t size)
{
    unsigned long sum = 0;
    for (size_t i = 0; i < n; i++) {
        held[i] = malloc(size);
        if (!held[i])
            abort();
        memset(held[i], (int)i, size);
    }
    for (size_t i = 0; i < n; i++) {
        sum += ((unsigned char *)held[i])[0];
        free(held[i]);
    }
    return sum;
}

/* Churns until *until (monotonic seconds) or until stop is set. */
static void churn(const struct options *o, double until)
{
    void **held = malloc(o->burst * sizeof *held);
    if (!held)
        abort();
    unsigned long sum = 0;
    while (!atomic_load_explicit(&stop, memory_order_relaxed) && now_s() < until)
        for (int i = 0; i < 64; i++)
            sum += burst(held, o->burst, o->size);
    free(held);
    if (sum == 1)           /* keep the reads: never true in practice */
        fputs("", stderr);
}

static const struct options *opts;
static double deadline;

static void *worker(void *arg)
{
    (void)arg;
    churn(opts, deadline);
    return NULL;
}

static void run_child(const struct options *o)
{
    printf("child %d\n", (int)getpid());
    fflush(stdout);
    churn(o, now_s() + o->child_seconds);
    exit(0);   /* a normal exit: hakmem removes the child's region */
}

static void pin_sparse(size_t mb)
{
    size_t n = (mb << 20) / 100;
    void **b = malloc(n * sizeof *b);
    if (!b)
        return;
    for (size_t i = 0; i < n; i++)
        if ((b[i] = malloc(100)) != NULL)
            memset(b[i], 1, 100);
    for (size_t i = 0; i < n; i++)
        if (i % 100)
            free(b[i]);     /* the other blocks stay live until exit */
    free(b);
}

static int parse(int argc, char **argv, struct options *o)
{
    *o = (struct options){ .seconds = 5, .child_seconds = 2, .threads = 2,
                           .size = 64, .burst = 1000 };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--fork")) {
            o->fork = 1;
            continue;
        }
        if (!v)
            return -1;
        if (!strcmp(a, "--seconds"))
            o->seconds = atof(v);
        else if (!strcmp(a, "--child-seconds"))
            o->child_seconds = atof(v);
        else if (!strcmp(a, "--threads"))
            o->threads = atoi(v);
        else if (!strcmp(a, "--size"))
            o->size = (size_t)atol(v);
        else if (!strcmp(a, "--burst"))
            o->burst = (size_t)atol(v);
        else if (!strcmp(a, "--pinned"))
            o->pinned_mb = (size_t)atol(v);
        else
            return -1;
        i++;
    }
    return o->threads >= 1 && o->threads <= 64 && o->size >= 1 && o->burst >= 1 ? 0 : -1;
}

int main(int argc, char **argv)
{
    struct options o;
    if (parse(argc, argv, &o) != 0) {
        fprintf(stderr, "usage: %s [--seconds S] [--threads T] [--size B] [--burst N]"
                        " [--fork] [--child-seconds S] [--pinned MB]\n", argv[0]);
        return 1;
    }
    opts = &o;
    struct sigaction sa = { .sa_handler = on_term };
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    printf("pid %d\n", (int)getpid());
    fflush(stdout);
    deadline = now_s() + o.seconds;
    if (o.pinned_mb) {
        pin_sparse(o.pinned_mb);
        printf("pinned\n");
        fflush(stdout);
    }

    pthread_t tid[64];
    for (int i = 0; i < o.threads; i++)
        if (pthread_create(&tid[i], NULL, worker, NULL) != 0)
            return 1;

    pid_t child = -1;
    if (o.fork) {
        sleep_s(0.3);
        fflush(stdout);
        child = fork();
        if (child == 0)
            run_child(&o);
    }
    for (int i = 0; i < o.threads; i++)
        pthread_join(tid[i], NULL);
    if (child > 0)
        waitpid(child, NULL, 0);
    return 0;
}
