/* Debug assertions for the compiled core.
 *
 * FM_ASSERT(cond) checks an invariant in debug builds (the macro
 * FASTMIRROR_DEBUG, which setup.py defines for FASTMIRROR_DEBUG=1) and is
 * nothing at all otherwise: the condition is not evaluated, so a check costs
 * nothing in a release build and may sit in the hot loop.  A check that fails
 * prints file:line, the function and the condition to stderr and aborts:
 * once an invariant of the ring or the engine is broken, a bitmap or a
 * buffer may already be wrong, and a core dump at that point says more than
 * an errno later.  It calls only fprintf and abort: fine without the GIL.
 *
 * Cython computes a call's arguments before the call, so from a .pyx guard
 * the check to keep the condition out of release builds:
 *     if FM_DEBUG: fm_assert(0 <= slot < n, "0 <= slot < n")
 * (the text is printed: Cython's C names for the condition would say
 * nothing).  fm_assert_locked(&mu) has no such cost: taking an address is
 * free.
 */
#ifndef FASTMIRROR_FM_ASSERT_H
#define FASTMIRROR_FM_ASSERT_H

#ifdef FASTMIRROR_DEBUG

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define FM_DEBUG 1

__attribute__((noreturn, cold, unused))
static void fm_assert_fail(const char *what, const char *file, int line, const char *func)
{
    fprintf(stderr, "%s:%d: %s: assertion failed: %s\n", file, line, func, what);
    fflush(stderr);
    abort();
}

#define FM_ASSERT_MSG(cond, what) \
    ((cond) ? (void)0 : fm_assert_fail((what), __FILE__, __LINE__, __func__))

/* The mutex is held (by some thread: a normal mutex does not know its owner;
   trylock returns EBUSY even to the thread that holds it).  If it was not,
   trylock has just taken it, which matters no more: we abort. */
#define FM_ASSERT_LOCKED(m) FM_ASSERT_MSG(pthread_mutex_trylock(m) != 0, "lock held: " #m)

#else

#define FM_DEBUG 0
/* `what` is named so that the string Cython made for it counts as used. */
#define FM_ASSERT_MSG(cond, what) ((void)(what))
#define FM_ASSERT_LOCKED(m) ((void)0)

#endif

#define FM_ASSERT(cond) FM_ASSERT_MSG(cond, #cond)

#endif
