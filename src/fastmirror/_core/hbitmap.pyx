# fastmirror._core.hbitmap: the hierarchical dirty bitmap.
#
# A port of the idea behind QEMU's util/hbitmap.c (Paolo Bonzini, 2012); the
# code is our own, but where a helper does what a QEMU helper does it keeps the
# QEMU name (hb_set_between, hb_reset_between, hb_count_between, ...), so a
# reader can put the two side by side.
#
# What it stores
# --------------
# One bit per *chunk* of the disk: bit c is set when bytes
# [c * granularity, (c + 1) * granularity) may differ between source and
# target.  The granularity is a power of two, so a byte offset becomes a chunk
# index with a shift (c = offset >> shift) and back (offset = c << shift).
# The last chunk may be partial: it ends at `size`, not at a multiple of the
# granularity.
#
# Levels
# ------
# The bits live in 64-bit words.  The bottom level, levels[nlevels - 1], is a
# plain bitmap with one bit per chunk: chunk c is bit (c & 63) of word (c >> 6).
# Above it sit summary levels: bit j of level L - 1 is set exactly when word j
# of level L is non-zero.  Each level is therefore 64 times smaller than the
# one below it, and the top, levels[0], is a single word.  For a 16 TiB disk at
# 64 KiB granularity (2**28 chunks):
#
#     level 4 (bottom)  2**22 words  32 MiB   one bit per chunk
#     level 3           2**16 words  512 KiB  one bit per bottom word
#     level 2           2**10 words  8 KiB
#     level 1           16 words     128 B
#     level 0 (top)     1 word       8 B
#
# The summaries add 1/63 to the memory of the bottom level.  A chunk index
# splits into a path from the top down: its low 6 bits pick the bit inside its
# bottom word, the next 6 bits pick the bit for that word in level L - 1, and
# so on; c >> (6 * k) is the bit that stands for c in the level k above the
# bottom.
#
# Why finding the next dirty chunk is cheap
# -----------------------------------------
# To find the first set bit at or after chunk c (hb_find_next below), look at
# c's own bottom word with the bits below c masked off.  If nothing is left,
# climb: the rest of the search is "the first non-zero word after word
# c >> 6", which is the first set bit after bit (c >> 6) + 1 in the level
# above, the same question one level up.  Climb until a word with a set bit
# is found (or the top is exhausted: nothing is dirty), then descend: each set
# summary bit promises a non-zero word under it, so count-trailing-zeros picks
# the first child at every level down to the bottom.  That touches at most two
# words per level, O(log64 n) in all: 10 words for a 16 TiB disk, however far
# apart the dirty chunks are.  QEMU's iterator (hbitmap_iter_next and
# hbitmap_iter_skip_words) does the same walk with a cursor kept per level.
#
# Keeping the summaries right
# ---------------------------
# Invariant: a summary bit is set if and only if the word under it is non-zero,
# and no bit past the end of a level (past nchunks at the bottom, past the
# number of words below it higher up) is ever set.  Setting a range ORs masks
# into the bottom words of the range, then, only if one of those words was
# zero before (its status changed), sets the range's bits one level up, and so
# on up (hb_set_between returns "changed").  Resetting clears the bottom words,
# then clears the summary bits of the words that became zero: every word
# strictly inside the range, and the first and last word only if nothing else
# is left in them (hb_reset_between's caller).  Both cost the bottom words of
# the range plus the summary words above them (1/63 more).
#
# Finding the next *clean* chunk has no summary to help it (we would need a
# second hierarchy of "word is full" bits, which would break the memory budget
# of 33 MiB for 16 TiB).  hb_find_next_zero scans bottom words for the first
# one that is not all ones, eight words per step: O(n/64) words at worst, on a
# map that is dirty from the start point to the end, which is memory bandwidth
# (about 3 ms for a fully dirty 16 TiB map).  It only ever runs to find the end
# of a dirty run that next_dirty has already found, so a walk over the dirty
# runs costs O(log n) per run plus the words of the runs themselves.
#
# Locking
# -------
# A plain pthread mutex guards every field that changes (the words of every
# level and `count`); size, granularity, shift, nchunks, nlevels and the level
# pointers are fixed in __cinit__.  The copy engine calls the *_locked methods
# with the GIL released, holding the mutex (see _hbitmap.pxd).  The Python
# methods take the mutex too, but never *block* on it while holding the GIL:
# they try it first and, if it is busy, release the GIL while they wait
# (_lock_from_python), so a thread that holds the mutex and waits for the GIL
# cannot deadlock against one that holds the GIL and waits for the mutex.
# Nothing Python (no object allocation, no callback) runs while the mutex is
# held: results are built after unlocking, bulk results are collected into C
# buffers first.  Long operations (clear, merge, big ranges, serialization)
# run entirely with the GIL released.  That is also what makes the module
# safe under free-threaded Python: all shared state is behind the mutex.
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.number cimport PyNumber_Index
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcpy, memset

from fastmirror._core.fm_assert cimport FM_DEBUG, fm_assert
from fastmirror._core.sync cimport (
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_t,
    pthread_mutex_unlock,
)

import struct as _struct
import zlib as _zlib

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_trylock(pthread_mutex_t *m)

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdio.h>
    #include <stdlib.h>

    /* Every bit of a word set. */
    #define FM_ALL_ONES (~(uint64_t)0)

    /* Bit tricks; ctz is only ever called on non-zero words. */
    static inline int fm_ctz64(uint64_t w) { return __builtin_ctzll(w); }
    static inline int fm_popcount64(uint64_t w) { return __builtin_popcountll(w); }

    /* The serialized words are little endian whatever the host. */
    static inline uint64_t fm_le64(uint64_t w) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        return __builtin_bswap64(w);
    #else
        return w;
    #endif
    }

    """
    uint64_t FM_ALL_ONES
    int fm_ctz64(uint64_t w) noexcept nogil
    int fm_popcount64(uint64_t w) noexcept nogil
    uint64_t fm_le64(uint64_t w) noexcept nogil

cdef enum:
    BITS_PER_LEVEL = 6      # log2(bits per word): the fan-out of each level
    BITS_PER_WORD = 64
    BIT_MASK = 63           # index & BIT_MASK: the bit inside its word
    # A set or reset of more chunks than this releases the GIL while it works.
    BIG_RANGE_CHUNKS = 1 << 18
    HEADER_SIZE = 40        # bytes of the serialized header (_HEADER.size)

# Serialized form (all integers little endian):
#   magic 8s | version u32 | flags u32 (0) | size u64 | granularity u64 |
#   nwords u64 | nwords bottom-level words u64 | crc32 u32 of all before it
_MAGIC = b"FMHBITMP"
_VERSION = 1
_HEADER = _struct.Struct("<8sIIQQQ")
_TRAILER = _struct.Struct("<I")
assert _HEADER.size == HEADER_SIZE


# ----------------------------------------------------------------------------
# The C core.  Every function here expects the caller to hold hb.mutex.


cdef inline uint64_t *hb_bottom(HBitmap hb) noexcept nogil:
    return hb.levels[hb.nlevels - 1]


cdef inline uint64_t hb_range_mask(int64_t i, int64_t pos, int64_t lastpos,
                                   int64_t start, int64_t last) noexcept nogil:
    # The bits of word i that fall inside bit range [start, last], where pos
    # and lastpos are the words holding start and last.
    cdef uint64_t mask = FM_ALL_ONES
    if i == pos:
        mask &= FM_ALL_ONES << (start & BIT_MASK)
    if i == lastpos:
        mask &= FM_ALL_ONES >> (BIT_MASK - (last & BIT_MASK))
    return mask


cdef bint hb_change_between(HBitmap hb, int level, int64_t start, int64_t last,
                            bint dirty) noexcept nogil:
    # Set (dirty) or clear bits [start, last] of one level; at the bottom the
    # chunk count follows.  Setting returns whether some word went from zero
    # to non-zero, i.e. whether the level above needs its bits set.
    cdef uint64_t *words = hb.levels[level]
    cdef int64_t pos = start >> BITS_PER_LEVEL
    cdef int64_t lastpos = last >> BITS_PER_LEVEL
    cdef int64_t i
    cdef uint64_t mask, old
    cdef bint changed = False
    cdef bint bottom = level == hb.nlevels - 1
    if FM_DEBUG:
        fm_assert(0 <= start and start <= last and lastpos < hb.level_words[level],
                  "0 <= start <= last, lastpos inside the level")
    for i in range(pos, lastpos + 1):
        mask = hb_range_mask(i, pos, lastpos, start, last)
        old = words[i]
        if dirty:
            if mask & ~old:
                # Write only on change: a calloc'd page that is never
                # written stays unallocated.
                if old == 0:
                    changed = True
                if bottom:
                    hb.count += fm_popcount64(mask & ~old)
                words[i] = old | mask
        elif old & mask:
            if bottom:
                hb.count -= fm_popcount64(old & mask)
            words[i] = old & ~mask
    return changed


cdef inline bint hb_set_between(HBitmap hb, int level, int64_t start,
                                int64_t last) noexcept nogil:
    return hb_change_between(hb, level, start, last, True)


cdef inline void hb_reset_between(HBitmap hb, int level, int64_t start,
                                  int64_t last) noexcept nogil:
    hb_change_between(hb, level, start, last, False)


cdef inline bint hb_clip_n(HBitmap hb, int64_t *first, int64_t *n) noexcept nogil:
    # Clip the chunk range [first, first + n) to the map (without computing
    # first + n, which may overflow); False when nothing is left.
    if first[0] < 0:
        n[0] += first[0]
        first[0] = 0
    if n[0] <= 0 or first[0] >= hb.nchunks:
        return False
    if n[0] > hb.nchunks - first[0]:
        n[0] = hb.nchunks - first[0]
    return True


cdef void hbitmap_set(HBitmap hb, int64_t first, int64_t n) noexcept nogil:
    # Dirty chunks [first, first + n), clipped to the map.
    cdef int64_t start, last
    cdef int level = hb.nlevels - 1
    if not hb_clip_n(hb, &first, &n):
        return
    start = first
    last = first + n - 1
    # Climb only while some word became non-zero: above a word that already
    # had a bit set, the summary bit is already set.
    while hb_set_between(hb, level, start, last) and level > 0:
        start >>= BITS_PER_LEVEL
        last >>= BITS_PER_LEVEL
        level -= 1


cdef void hbitmap_reset_all(HBitmap hb) noexcept nogil:
    # Clean everything.  Zeroes only the bottom words that the summary level
    # says are non-zero (so clearing a sparse 16 TiB map touches kilobytes,
    # and pages that were never dirtied stay unallocated), then the summaries.
    cdef uint64_t *bottom = hb_bottom(hb)
    cdef uint64_t *summary
    cdef uint64_t s
    cdef int64_t k
    cdef int level
    if hb.nlevels == 1:
        bottom[0] = 0
    else:
        summary = hb.levels[hb.nlevels - 2]
        for k in range(hb.level_words[hb.nlevels - 2]):
            s = summary[k]
            while s:
                bottom[(k << BITS_PER_LEVEL) + fm_ctz64(s)] = 0
                s &= s - 1
        for level in range(hb.nlevels - 1):
            memset(hb.levels[level], 0, <size_t>hb.level_words[level] * 8)
    hb.count = 0


cdef void hbitmap_reset(HBitmap hb, int64_t first, int64_t n) noexcept nogil:
    # Clean chunks [first, first + n), clipped to the map.
    cdef int64_t start, last, pos, lastpos
    cdef int level = hb.nlevels - 1
    cdef uint64_t *words
    if not hb_clip_n(hb, &first, &n):
        return
    if n == hb.nchunks:
        hbitmap_reset_all(hb)
        return
    start = first
    last = first + n - 1
    while True:
        hb_reset_between(hb, level, start, last)
        if level == 0:
            return
        # Which words of this level became zero?  Every word strictly inside
        # the range, and the first and last only if nothing is left in them.
        words = hb.levels[level]
        pos = start >> BITS_PER_LEVEL
        lastpos = last >> BITS_PER_LEVEL
        if words[pos] != 0:
            pos += 1
        if lastpos >= pos and words[lastpos] != 0:
            lastpos -= 1
        if pos > lastpos:
            return
        start = pos
        last = lastpos
        level -= 1


cdef inline bint hbitmap_get(HBitmap hb, int64_t chunk) noexcept nogil:
    return (hb_bottom(hb)[chunk >> BITS_PER_LEVEL] >> (chunk & BIT_MASK)) & 1


cdef inline bint hb_clip(HBitmap hb, int64_t *first, int64_t *end) noexcept nogil:
    # Clip the chunk range [first, end) to the map; False when nothing is left.
    if end[0] > hb.nchunks:
        end[0] = hb.nchunks
    if first[0] < 0:
        first[0] = 0
    return first[0] < end[0]


cdef int64_t hb_find_next(HBitmap hb, int64_t first, int64_t end) noexcept nogil:
    # First dirty chunk in [first, end), or -1.  Climb from first's bottom
    # word until a word has a set bit at or after the current position, then
    # descend along the first set bit of each word: O(nlevels) words.
    cdef int L = hb.nlevels - 1
    cdef int level = L
    cdef int64_t pos, i
    cdef uint64_t w
    if not hb_clip(hb, &first, &end):
        return -1
    pos = first                     # a bit index within `level`
    while True:
        i = pos >> BITS_PER_LEVEL
        w = hb.levels[level][i] & (FM_ALL_ONES << (pos & BIT_MASK))
        if w:
            break
        if level == 0:
            return -1
        # Nothing left in word i: continue at word i + 1, which is bit i + 1
        # one level up (QEMU's hbitmap_iter_skip_words does the same climb).
        pos = i + 1
        level -= 1
        if pos >= hb.level_words[level + 1]:
            return -1               # past the last word of the level below
        if (pos << (BITS_PER_LEVEL * (L - level))) >= end:
            return -1               # the rest lies past `end`
    pos = (i << BITS_PER_LEVEL) + fm_ctz64(w)
    while level < L:
        level += 1
        w = hb.levels[level][pos]
        if FM_DEBUG:                # a set summary bit promises a non-zero word
            fm_assert(w != 0, "w != 0 under a set summary bit")
        pos = (pos << BITS_PER_LEVEL) + fm_ctz64(w)
    return pos if pos < end else -1


cdef int64_t hbitmap_next_zero(HBitmap hb, int64_t first, int64_t end) noexcept nogil:
    # First clean chunk in [first, end), or -1.  A scan of the bottom level
    # for a word that is not all ones: O(words of the dirty stretch), eight
    # words per step over a fully dirty stretch.  Bits past nchunks are
    # always zero, so they look clean: clip the answer to `end`.
    cdef uint64_t *words = hb_bottom(hb)
    cdef int64_t i, lastw
    cdef uint64_t w
    if not hb_clip(hb, &first, &end):
        return -1
    i = first >> BITS_PER_LEVEL
    lastw = (end - 1) >> BITS_PER_LEVEL
    w = ~words[i] & (FM_ALL_ONES << (first & BIT_MASK))
    while w == 0:
        i += 1
        # Skip full words eight at a time; the AND of eight full words is all
        # ones, and the compiler turns this into wide loads.
        while i + 8 <= lastw + 1 and (
                words[i] & words[i + 1] & words[i + 2] & words[i + 3] &
                words[i + 4] & words[i + 5] & words[i + 6] & words[i + 7]
        ) == FM_ALL_ONES:
            i += 8
        if i > lastw:
            return -1
        w = ~words[i]
    i = (i << BITS_PER_LEVEL) + fm_ctz64(w)
    return i if i < end else -1


cdef int64_t hbitmap_next_dirty_area(HBitmap hb, int64_t first, int64_t end,
                                     int64_t max_n, int64_t *n) noexcept nogil:
    # The first dirty run in [first, end): returns its first chunk and stores
    # its length (at most max_n when max_n > 0) in *n; -1 if none.
    cdef int64_t c, stop, lim
    c = hb_find_next(hb, first, end)
    if c < 0:
        n[0] = 0
        return -1
    lim = end if end < hb.nchunks else hb.nchunks
    if max_n > 0 and max_n < lim - c:
        lim = c + max_n
    stop = hbitmap_next_zero(hb, c + 1, lim)
    if stop < 0:
        stop = lim
    n[0] = stop - c
    return c


cdef int64_t hb_count_between(HBitmap hb, int64_t start, int64_t last) noexcept nogil:
    # Set bits of the bottom level in [start, last] (used by the self-check).
    cdef uint64_t *words = hb_bottom(hb)
    cdef int64_t pos = start >> BITS_PER_LEVEL
    cdef int64_t lastpos = last >> BITS_PER_LEVEL
    cdef int64_t i, total = 0
    for i in range(pos, lastpos + 1):
        total += fm_popcount64(words[i] & hb_range_mask(i, pos, lastpos, start, last))
    return total


cdef void hbitmap_merge(HBitmap dst, HBitmap src) noexcept nogil:
    # dst |= src, for maps of the same geometry.  A summary bit of dst | src
    # is the OR of the two summary bits, so the (small) summary levels are
    # ORed wholesale; the bottom words are visited only where src's summary
    # says they are non-zero, so merging a sparse map is cheap.
    cdef int L = dst.nlevels - 1
    cdef int level
    cdef int64_t j, k, w
    cdef uint64_t s, o, old
    cdef uint64_t *dbottom = hb_bottom(dst)
    cdef uint64_t *sbottom = hb_bottom(src)
    cdef uint64_t *summary
    for level in range(L):
        for j in range(dst.level_words[level]):
            dst.levels[level][j] |= src.levels[level][j]
    if L == 0:
        o = sbottom[0]
        dst.count += fm_popcount64(o & ~dbottom[0])
        dbottom[0] |= o
        return
    summary = src.levels[L - 1]
    for k in range(src.level_words[L - 1]):
        s = summary[k]
        while s:
            w = (k << BITS_PER_LEVEL) + fm_ctz64(s)
            s &= s - 1
            o = sbottom[w]
            old = dbottom[w]
            if o & ~old:
                dst.count += fm_popcount64(o & ~old)
                dbottom[w] = old | o


cdef void hb_rebuild_summaries(HBitmap hb) noexcept nogil:
    # Recompute `count` and every summary level from the bottom level (after
    # the bottom words were loaded wholesale by from_bytes).
    cdef int level
    cdef int64_t j, total = 0
    cdef uint64_t *bottom = hb_bottom(hb)
    for j in range(hb.level_words[hb.nlevels - 1]):
        total += fm_popcount64(bottom[j])
    hb.count = total
    for level in range(hb.nlevels - 2, -1, -1):
        memset(hb.levels[level], 0, <size_t>hb.level_words[level] * 8)
        for j in range(hb.level_words[level + 1]):
            if hb.levels[level + 1][j]:
                hb.levels[level][j >> BITS_PER_LEVEL] |= (<uint64_t>1) << (j & BIT_MASK)


cdef int hb_check(HBitmap hb) noexcept nogil:
    # The invariants, for tests: 0 when they hold, else a code (see
    # HBitmap._check_invariants).
    cdef int level
    cdef int64_t j, nw
    cdef uint64_t *bottom = hb_bottom(hb)
    cdef bint summary_bit
    nw = hb.level_words[hb.nlevels - 1]
    if hb.nchunks == 0:
        if bottom[0]:
            return 2
    else:
        if hb_count_between(hb, 0, nw * BITS_PER_WORD - 1) != hb.count:
            return 1
        if hb.count != hb_count_between(hb, 0, hb.nchunks - 1):
            return 2    # bits past nchunks are set
    for level in range(hb.nlevels - 1):
        for j in range(hb.level_words[level] * BITS_PER_WORD):
            summary_bit = (hb.levels[level][j >> BITS_PER_LEVEL] >> (j & BIT_MASK)) & 1
            if j >= hb.level_words[level + 1]:
                if summary_bit:
                    return 4    # a summary bit past the end of its level
            elif summary_bit != (hb.levels[level + 1][j] != 0):
                return 3        # a summary bit that disagrees with its word
    return 0


# ----------------------------------------------------------------------------
# Python-side helpers.


cdef inline void _lock_from_python(HBitmap hb) noexcept:
    # Take hb.mutex from code that holds the GIL.  Never block on the mutex
    # with the GIL held: try it, and if it is busy, wait with the GIL released.
    if pthread_mutex_trylock(&hb.mutex) != 0:
        with nogil:
            pthread_mutex_lock(&hb.mutex)


cdef int64_t _int_arg(object value, int64_t hi, str name) except -1:
    # An integer argument in [0, hi].  Non-integers raise TypeError (from the
    # conversion); anything out of range, however large, raises ValueError.
    cdef int64_t v
    cdef int overflow = 0
    if type(value) is not int:
        value = PyNumber_Index(value)   # refuses floats, accepts numpy ints
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow:
        raise ValueError(f"{name} out of range: {value!r}")
    if v < 0 or v > hi:
        if v < 0:
            raise ValueError(f"{name} must not be negative, got {v}")
        raise ValueError(f"{name} {v} is past the end (at most {hi})")
    return v


cdef inline int64_t _chunks_ceil(HBitmap hb, int64_t offset) noexcept nogil:
    # The number of chunks that start before `offset` (ceil(offset / g)),
    # without overflow.
    return (offset >> hb.shift) + ((offset & (hb.granularity - 1)) != 0)


cdef inline int64_t _chunk_offset(HBitmap hb, int64_t chunk) noexcept nogil:
    # Byte offset where `chunk` starts, or size for chunk >= nchunks (so that
    # a run ending at the last chunk is clipped to size).
    if chunk >= hb.nchunks:
        return hb.size
    return chunk << hb.shift


cdef void _apply(HBitmap hb, bint dirty, int64_t first, int64_t n) noexcept:
    # set or reset chunks [first, first + n) for a Python caller; big ranges
    # (milliseconds of work) run with the GIL released.
    if n > BIG_RANGE_CHUNKS:
        with nogil:
            hb.lock()
            if dirty:
                hbitmap_set(hb, first, n)
            else:
                hbitmap_reset(hb, first, n)
            hb.unlock()
    else:
        _lock_from_python(hb)
        if dirty:
            hbitmap_set(hb, first, n)
        else:
            hbitmap_reset(hb, first, n)
        hb.unlock()


cdef int64_t _end_arg(HBitmap hb, object end) except -1:
    # The optional `end` of a search: size when None.
    if end is None:
        return hb.size
    return _int_arg(end, hb.size, "end")


cdef class HBitmap:
    """A hierarchical dirty bitmap over ``size`` bytes, one bit per chunk of
    ``granularity`` bytes (a power of two, at least 512).

    All offsets and lengths are in bytes.  Every method is thread-safe: other
    threads may mark chunks while the copy engine picks and clears extents
    with the GIL released.
    """

    def __cinit__(self, size, granularity=65536):
        cdef int64_t c_size, c_gran, w
        cdef int64_t words[HBITMAP_MAX_LEVELS]
        cdef int n = 0, i
        if pthread_mutex_init(&self.mutex, NULL) != 0:
            raise MemoryError("cannot initialise the bitmap mutex")
        self.mutex_ready = True
        c_size = _int_arg(size, INT64_MAX, "size")
        c_gran = _int_arg(granularity, (<int64_t>1) << 62, "granularity")
        if c_gran < 512 or (c_gran & (c_gran - 1)) != 0:
            raise ValueError(
                f"granularity must be a power of two >= 512, got {granularity!r}")
        self.size = c_size
        self.granularity = c_gran
        self.shift = fm_ctz64(<uint64_t>c_gran)
        self.nchunks = (c_size >> self.shift) + ((c_size & (c_gran - 1)) != 0)
        # Level sizes, bottom up, until a level fits in one word.  An empty
        # map still gets one (always zero) word, so no pointer is ever NULL.
        w = (self.nchunks + BITS_PER_WORD - 1) >> BITS_PER_LEVEL
        if w < 1:
            w = 1
        words[n] = w
        n += 1
        while w > 1:
            w = (w + BITS_PER_WORD - 1) >> BITS_PER_LEVEL
            words[n] = w
            n += 1
        self.nlevels = n
        for i in range(n):
            self.level_words[i] = words[n - 1 - i]
            # calloc: zeroed, and for big levels the kernel hands out zero
            # pages lazily, so a clean map costs almost no resident memory.
            self.levels[i] = <uint64_t *>calloc(<size_t>self.level_words[i], 8)
            if self.levels[i] == NULL:
                raise MemoryError(
                    f"cannot allocate a bitmap of {self.level_words[i] * 8} bytes")
        self.count = 0

    def __dealloc__(self):
        cdef int i
        for i in range(HBITMAP_MAX_LEVELS):
            free(self.levels[i])
            self.levels[i] = NULL
        if self.mutex_ready:
            pthread_mutex_destroy(&self.mutex)
            self.mutex_ready = False

    # -- the C-level contract (see _hbitmap.pxd) -----------------------------

    cdef void lock(self) noexcept nogil:
        pthread_mutex_lock(&self.mutex)

    cdef void unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self.mutex)

    cdef void set_locked(self, int64_t first, int64_t n) noexcept nogil:
        hbitmap_set(self, first, n)

    cdef void reset_locked(self, int64_t first, int64_t n) noexcept nogil:
        hbitmap_reset(self, first, n)

    cdef bint get_locked(self, int64_t chunk) noexcept nogil:
        if chunk < 0 or chunk >= self.nchunks:
            return False
        return hbitmap_get(self, chunk)

    cdef int64_t next_dirty_locked(self, int64_t first, int64_t end) noexcept nogil:
        return hb_find_next(self, first, end)

    cdef int64_t next_clean_locked(self, int64_t first, int64_t end) noexcept nogil:
        return hbitmap_next_zero(self, first, end)

    cdef void c_set(self, int64_t first, int64_t n) noexcept nogil:
        self.lock()
        hbitmap_set(self, first, n)
        self.unlock()

    cdef void c_reset(self, int64_t first, int64_t n) noexcept nogil:
        self.lock()
        hbitmap_reset(self, first, n)
        self.unlock()

    cdef int64_t c_count(self) noexcept nogil:
        cdef int64_t count
        self.lock()
        count = self.count
        self.unlock()
        return count

    cdef int64_t next_dirty_area_locked(self, int64_t first, int64_t end,
                                        int64_t max_n, int64_t *n) noexcept nogil:
        return hbitmap_next_dirty_area(self, first, end, max_n, n)

    # -- Python API (bytes) ---------------------------------------------------

    def set(self, offset, length):
        """Dirty every chunk that overlaps [offset, offset + length)."""
        cdef int64_t off = _int_arg(offset, self.size, "offset")
        cdef int64_t ln = _int_arg(length, self.size - off, "length")
        cdef int64_t first
        if ln == 0:
            return
        first = off >> self.shift
        _apply(self, True, first, ((off + ln - 1) >> self.shift) - first + 1)

    def reset(self, offset, length):
        """Clean the chunks in [offset, offset + length).  offset and the end
        must be multiples of the granularity (the end may also be size)."""
        cdef int64_t off = _int_arg(offset, self.size, "offset")
        cdef int64_t ln = _int_arg(length, self.size - off, "length")
        cdef int64_t end = off + ln
        cdef int64_t first
        if off & (self.granularity - 1):
            raise ValueError(
                f"reset offset {off} is not aligned to the granularity {self.granularity}")
        if (end & (self.granularity - 1)) and end != self.size:
            raise ValueError(
                f"reset end {end} is not aligned to the granularity "
                f"{self.granularity} nor equal to size {self.size}")
        if ln == 0:
            return
        first = off >> self.shift
        _apply(self, False, first, _chunks_ceil(self, end) - first)

    def get(self, offset):
        """Whether the chunk holding byte ``offset`` is dirty."""
        cdef int64_t off = _int_arg(offset, self.size - 1, "offset")
        cdef bint dirty
        _lock_from_python(self)
        dirty = hbitmap_get(self, off >> self.shift)
        self.unlock()
        return dirty

    @property
    def dirty_count(self):
        """Number of dirty chunks."""
        cdef int64_t count
        _lock_from_python(self)
        count = self.count
        self.unlock()
        return count

    @property
    def dirty_bytes(self):
        """Bytes covered by dirty chunks; a dirty last chunk counts only up to
        size."""
        cdef int64_t count
        cdef bint last_dirty = False
        _lock_from_python(self)
        count = self.count
        if self.nchunks:
            last_dirty = hbitmap_get(self, self.nchunks - 1)
        self.unlock()
        if count == 0:
            return 0
        if last_dirty:
            return ((count - 1) << self.shift) + (
                self.size - ((self.nchunks - 1) << self.shift))
        return count << self.shift

    @property
    def memory_bytes(self):
        """Bytes allocated for the bit levels (the object header aside)."""
        cdef int i
        cdef int64_t total = 0
        for i in range(self.nlevels):
            total += self.level_words[i] * 8
        return total

    def __sizeof__(self):
        return type(self).__basicsize__ + self.memory_bytes

    def __len__(self):
        return self.nchunks

    def __repr__(self):
        return (f"<{type(self).__qualname__} size={self.size} "
                f"granularity={self.granularity} chunks={self.nchunks} "
                f"dirty={self.dirty_count}>")

    def __reduce__(self):
        return (HBitmap.from_bytes, (self.to_bytes(),))

    def next_dirty(self, offset, end=None):
        """The first dirty byte offset in [offset, end), or -1: offset itself
        if its chunk is dirty, else the start of the next dirty chunk."""
        return self._next_offset(offset, end, True)

    def next_clean(self, offset, end=None):
        """The first clean byte offset in [offset, end), or -1.  Costs a scan
        of the bottom words over the dirty stretch that starts at offset
        (O(n/64) words on a fully dirty map, memory speed)."""
        return self._next_offset(offset, end, False)

    cdef object _next_offset(self, offset, end, bint dirty):
        cdef int64_t off = _int_arg(offset, self.size, "offset")
        cdef int64_t e = _end_arg(self, end)
        cdef int64_t c
        if off >= e:
            return -1
        _lock_from_python(self)
        if dirty:
            c = hb_find_next(self, off >> self.shift, _chunks_ceil(self, e))
        else:
            c = hbitmap_next_zero(self, off >> self.shift, _chunks_ceil(self, e))
        self.unlock()
        if c < 0:
            return -1
        return max(off, c << self.shift)

    def next_dirty_area(self, offset, end=None, max_length=None):
        """The dirty run that starts at next_dirty(offset, end), extended while
        chunks stay dirty, clipped to end, size and max_length:
        (offset, length), or None when nothing is dirty in [offset, end)."""
        cdef int64_t off = _int_arg(offset, self.size, "offset")
        cdef int64_t e = _end_arg(self, end)
        cdef int64_t maxlen = INT64_MAX
        cdef int64_t c, start, limit, stop
        if max_length is not None:
            maxlen = _int_arg(max_length, INT64_MAX, "max_length")
            if maxlen == 0:
                raise ValueError("max_length must be positive")
        if off >= e:
            return None
        _lock_from_python(self)
        c = hb_find_next(self, off >> self.shift, _chunks_ceil(self, e))
        if c >= 0:
            start = c << self.shift
            if start < off:
                start = off
            limit = e if maxlen >= e - start else start + maxlen
            stop = hbitmap_next_zero(self, c + 1, _chunks_ceil(self, limit))
        self.unlock()
        if c < 0:
            return None
        # stop < 0: dirty up to limit; else the run ends where chunk stop begins.
        stop = limit if stop < 0 else min(_chunk_offset(self, stop), limit)
        return (start, stop - start)

    def dirty_areas(self):
        """An iterator over the maximal dirty runs (offset, length), in order,
        the last clipped to size.  Each step costs O(log n) words plus the
        run; it sees the bitmap as it is at that step, so runs dirtied
        behind it are not revisited."""
        return _DirtyAreas(self)

    def dirty_extents(self):
        """The dirty runs as a numpy (N, 2) int64 array of (offset, length),
        taken in one consistent pass."""
        import numpy   # a runtime dependency only, never a build one

        cdef int64_t *buf = NULL
        cdef int64_t *grown
        cdef int64_t cap = 0, nruns = 0, c = 0, n = 0
        cdef bint oom = False
        cdef int64_t[:, ::1] view
        with nogil:
            # Collected into a C buffer under the lock; numpy objects are
            # made after unlocking.
            self.lock()
            while True:
                c = hbitmap_next_dirty_area(self, c, self.nchunks, 0, &n)
                if c < 0:
                    break
                if nruns == cap:
                    cap = cap * 2 if cap else 256
                    grown = <int64_t *>realloc(buf, <size_t>cap * 16)
                    if grown == NULL:
                        oom = True
                        break
                    buf = grown
                buf[2 * nruns] = c << self.shift
                buf[2 * nruns + 1] = _chunk_offset(self, c + n) - (c << self.shift)
                nruns += 1
                c += n
            self.unlock()
        try:
            if oom:
                raise MemoryError("cannot collect the dirty extents")
            out = numpy.empty((nruns, 2), dtype=numpy.int64)
            if nruns:
                view = out
                memcpy(&view[0, 0], buf, <size_t>nruns * 16)
            return out
        finally:
            free(buf)

    def merge(self, HBitmap other not None):
        """OR in another bitmap of the same size and granularity."""
        cdef HBitmap first, second
        if other.size != self.size or other.granularity != self.granularity:
            raise ValueError(
                f"cannot merge a bitmap of size {other.size} granularity "
                f"{other.granularity} into one of size {self.size} granularity "
                f"{self.granularity}")
        if other is self:
            return
        # Two mutexes: always take them in address order, so two threads
        # merging a into b and b into a cannot deadlock.
        if <size_t><void *>self < <size_t><void *>other:
            first, second = self, other
        else:
            first, second = other, self
        with nogil:
            first.lock()
            second.lock()
            hbitmap_merge(self, other)
            second.unlock()
            first.unlock()

    def clear(self):
        """Clean every chunk."""
        with nogil:
            self.lock()
            hbitmap_reset_all(self)
            self.unlock()

    def to_bytes(self):
        """Serialize: a versioned header, the bottom-level words (little
        endian) and a CRC-32 of everything before it."""
        cdef int64_t nwords = (self.nchunks + BITS_PER_WORD - 1) >> BITS_PER_LEVEL
        cdef int64_t total = HEADER_SIZE + nwords * 8 + 4
        cdef int64_t j
        cdef uint64_t *src
        cdef uint64_t *dst
        cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
        cdef char *p = PyBytes_AS_STRING(out)
        header = _HEADER.pack(_MAGIC, _VERSION, 0, self.size, self.granularity, nwords)
        memcpy(p, <char *>header, HEADER_SIZE)
        with nogil:
            dst = <uint64_t *>(p + HEADER_SIZE)
            self.lock()
            src = hb_bottom(self)
            for j in range(nwords):
                dst[j] = fm_le64(src[j])
            self.unlock()
        with memoryview(out) as mv:
            crc = _zlib.crc32(mv[:total - 4])
        trailer = _TRAILER.pack(crc)
        memcpy(p + total - 4, <char *>trailer, 4)
        return out

    @classmethod
    def from_bytes(cls, data):
        """Rebuild a bitmap from to_bytes(); ValueError for anything corrupt,
        truncated, of another format or version, or inconsistent."""
        cdef const uint8_t[::1] buf
        cdef HBitmap bm
        cdef int64_t j, nwords, total
        cdef const uint8_t *src
        cdef uint64_t *dst
        cdef uint64_t w
        cdef int err = 0
        buf = memoryview(data).cast("B")   # any contiguous buffer, as bytes
        total = buf.shape[0]
        if total < HEADER_SIZE + 4:
            raise ValueError(f"HBitmap data truncated: {total} bytes")
        magic, version, flags, size, granularity, nw = _HEADER.unpack_from(buf, 0)
        if magic != _MAGIC:
            raise ValueError("not HBitmap data (bad magic)")
        if version != _VERSION:
            raise ValueError(f"unsupported HBitmap format version {version}")
        if total != HEADER_SIZE + nw * 8 + 4:
            raise ValueError(
                f"HBitmap data truncated or padded: {total} bytes for {nw} words")
        (crc,) = _TRAILER.unpack_from(buf, total - 4)
        if _zlib.crc32(buf[:total - 4]) != crc:
            raise ValueError("HBitmap data corrupt (checksum mismatch)")
        if flags != 0:
            raise ValueError(f"unknown HBitmap flags {flags:#x}")
        if size > INT64_MAX or granularity > INT64_MAX:
            raise ValueError("HBitmap header out of range")
        bm = cls(size, granularity)
        nwords = (bm.nchunks + BITS_PER_WORD - 1) >> BITS_PER_LEVEL
        if nw != nwords:
            raise ValueError(
                f"HBitmap header mismatch: {nw} words for {bm.nchunks} chunks")
        if nwords:
            src = &buf[HEADER_SIZE]
            with nogil:
                bm.lock()
                dst = hb_bottom(bm)
                for j in range(nwords):
                    memcpy(&w, src + 8 * j, 8)    # the buffer may be unaligned
                    dst[j] = fm_le64(w)
                # No bit past nchunks may be set.
                if (bm.nchunks & BIT_MASK) and (
                        dst[nwords - 1] >> (bm.nchunks & BIT_MASK)):
                    err = 1
                    dst[nwords - 1] = 0
                hb_rebuild_summaries(bm)
                bm.unlock()
        if err:
            raise ValueError("HBitmap data mismatch: bits set past the last chunk")
        return bm

    def _check_invariants(self):
        """Check the internal invariants (for tests); return the word count of
        each level, top first.  Raises AssertionError when one is broken."""
        cdef int err
        with nogil:
            self.lock()
            err = hb_check(self)
            self.unlock()
        if err:
            raise AssertionError({
                1: "count disagrees with the bottom level",
                2: "bits set past the last chunk",
                3: "a summary bit disagrees with the word under it",
                4: "a summary bit set past the end of its level",
            }[err])
        return tuple(self.level_words[i] for i in range(self.nlevels))


@cython.final
cdef class _DirtyAreas:
    # The iterator behind HBitmap.dirty_areas().  Its position is read and
    # written under the bitmap's mutex, so it stays sane even when several
    # threads share one iterator (free-threaded Python).
    cdef HBitmap bm     # the bitmap walked
    cdef int64_t pos    # the chunk where the next search starts

    def __cinit__(self, HBitmap bm not None):
        self.bm = bm
        self.pos = 0

    def __iter__(self):
        return self

    def __next__(self):
        cdef HBitmap bm = self.bm
        cdef int64_t c, n = 0
        _lock_from_python(bm)
        c = hbitmap_next_dirty_area(bm, self.pos, bm.nchunks, 0, &n)
        self.pos = c + n if c >= 0 else bm.nchunks
        bm.unlock()
        if c < 0:
            raise StopIteration
        return (c << bm.shift, _chunk_offset(bm, c + n) - (c << bm.shift))
