# Declarations of fm_assert.h: invariant checks in debug builds
# (FASTMIRROR_DEBUG=1), compiled out of release builds.  Guard each check,
#     if FM_DEBUG: fm_assert(cond, "cond")
# so that a release build does not even compute the condition.
from fastmirror._core.sync cimport pthread_mutex_t

cdef extern from "fm_assert.h" nogil:
    int FM_DEBUG
    void fm_assert "FM_ASSERT_MSG" (bint cond, const char *what)
    void fm_assert_locked "FM_ASSERT_LOCKED" (pthread_mutex_t *m)
