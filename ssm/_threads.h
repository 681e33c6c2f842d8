/* Can the calling thread's OpenMP team of n threads be started?

   GNU libgomp ends the process (gomp_fatal: "Thread creation failed") when it cannot
   create a team's threads, for example under an address-space limit (ulimit -v): no
   Python exception, no cleanup. So before a calling thread first asks for a team larger
   than any it has had, ssm starts the n - 1 threads itself, with the stack size libgomp
   will give them, and joins them again; if that fails, the call raises instead.

   libgomp keeps the threads of a team for the next region of the same calling thread
   (one pool per calling thread), and ends the extra ones when a smaller team of more
   than one thread follows; so the mark is the size of the calling thread's last team of
   more than one thread, thread-local, and a team that grows past it is probed again
   (ssm gives every pass of one call the same team, so calls do not shrink and regrow
   their pool). On platforms without POSIX threads (Windows) nothing is probed. */
#ifndef SSM_THREADS_H
#define SSM_THREADS_H

#include <stddef.h>

#if defined(_WIN32)

static int ssm_team_can_start(int n, size_t stack_bytes, int *err, int *grew)
{
    (void)stack_bytes;
    *err = 0;
    *grew = 0;
    return n;
}

#else

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

static _Thread_local int ssm_team_started = 1; /* this thread's last team of 2 or more */

static void *ssm_probe_thread(void *arg)
{
    return arg;
}

/* Returns n if a team of n can start (the caller plus n - 1 threads), else how many of
   the team could, with the pthread_create error in *err; *grew is 1 when the team is
   larger than this thread's last one (libgomp will create threads for it). stack_bytes
   0: the default stack, as libgomp uses when OMP_STACKSIZE and GOMP_STACKSIZE are unset. */
static int ssm_team_can_start(int n, size_t stack_bytes, int *err, int *grew)
{
    pthread_t *ids;
    pthread_attr_t attr;
    int started = 0, i;

    *err = 0;
    *grew = n > ssm_team_started;
    if (n <= ssm_team_started || n == 1) {
        if (n > 1)
            ssm_team_started = n;
        return n;
    }
    ids = (pthread_t *)malloc(sizeof(pthread_t) * (size_t)(n - 1));
    if (ids == NULL) {
        *err = ENOMEM;
        return 1;
    }
    pthread_attr_init(&attr);
    if (stack_bytes != 0 && pthread_attr_setstacksize(&attr, stack_bytes) != 0) {
        /* below PTHREAD_STACK_MIN, or not a page multiple: libgomp warns and uses the
           default stack, and so does the probe */
        pthread_attr_destroy(&attr);
        pthread_attr_init(&attr);
    }
    while (*err == 0 && started < n - 1) {
        *err = pthread_create(&ids[started], &attr, ssm_probe_thread, NULL);
        if (*err == 0)
            started++;
    }
    for (i = 0; i < started; i++)
        pthread_join(ids[i], NULL);
    pthread_attr_destroy(&attr);
    free(ids);
    if (*err == 0)
        ssm_team_started = n;
    return *err == 0 ? n : started + 1;
}

#endif
#endif /* SSM_THREADS_H */
