# The copy engine's C API for the tracked write path (_tracked.pyx) and, later,
# the NBD export: claims that keep copies off the chunks a write to both sides
# is writing, and the marking of written ranges.  All of it runs without the
# GIL; `engine` is a CopyEngine that the caller keeps alive (it holds a
# reference) for as long as it calls these.
from libc.stdint cimport int64_t
from fastmirror._core.sync cimport pthread_cond_t

# One claim: chunks [first, end).  The caller owns the memory (its stack
# frame, for the span of one write); the engine links it into its list of
# claims held, or into the waiters of the claim that blocks it.
cdef struct fm_claim:
    int64_t first
    int64_t end
    fm_claim *prev              # the engine's list of claims held
    fm_claim *next
    fm_claim *waiters           # claims waiting for this one's release
    fm_claim *next_waiter
    fm_claim *blocker           # the claim this one waits for; NULL once woken
    pthread_cond_t cv           # this claim's owner sleeps here

# Wait until no copy in flight and no other claim overlaps the chunks of
# [offset, offset + length), then hold them: no copy starts on them until
# fm_engine_unclaim().  A zero length claims the chunk at offset.
cdef void fm_engine_claim(void *engine, fm_claim *c, int64_t offset,
                          int64_t length) noexcept nogil
cdef void fm_engine_unclaim(void *engine, fm_claim *c) noexcept nogil
# Dirty the chunks of [offset, offset + length), inside [0, size), and wake a
# worker.  Call it after the write has landed (invariant 2).
cdef void fm_engine_mark(void *engine, int64_t offset, int64_t length) noexcept nogil
