/* A library whose fork prepare handler forks once when armed, for
 * fork_stdio's "nested" mode.  Loaded as the program's own dependency, its
 * constructor registers the handler before a preloaded allocator registers
 * its own, so the handler runs inside the allocator's (prepare handlers run
 * in the reverse order of registration). */
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

static atomic_int armed;
static pid_t nested_child = -1;

static void nesting_prepare(void)
{
    if (atomic_exchange(&armed, 0))
        nested_child = fork();          /* its child goes on with the outer fork */
}

__attribute__((constructor)) static void register_nesting_prepare(void)
{
    pthread_atfork(nesting_prepare, NULL, NULL);
}

void nest_atfork_arm(void)
{
    atomic_store(&armed, 1);
}

/* After the armed fork: 0 in the nested fork's child, its pid in the
 * process that made it. */
pid_t nest_atfork_child(void)
{
    return nested_child;
}
