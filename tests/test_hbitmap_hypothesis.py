"""HBitmap as a hypothesis state machine against a Python set of chunk indices."""

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fastmirror import HBitmap

GRANULARITIES = [512, 4096, 65536]
# Chunk counts around the level edges (64, 64**2), kept small so that the
# invariants can afford to look at every chunk.
CHUNKS = [1, 2, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097]


def runs_of(chunks, g, size):
    """Maximal runs of a set of chunk indices, in bytes, clipped to size."""
    out = []
    for c in sorted(chunks):
        if out and out[-1][1] == c:
            out[-1][1] = c + 1
        else:
            out.append([c, c + 1])
    return [(a * g, min(b * g, size) - a * g) for a, b in out]


class HBitmapMachine(RuleBasedStateMachine):
    @initialize(nchunks=st.sampled_from(CHUNKS), g=st.sampled_from(GRANULARITIES),
                data=st.data())
    def create(self, nchunks, g, data):
        short = data.draw(st.sampled_from([0, 0, 1, g // 2, g - 1]), label="short")
        self.g = g
        self.size = nchunks * g - short
        self.n = nchunks
        self.bm = HBitmap(self.size, g)
        self.model = set()

    def _chunks(self, offset, length):
        if length == 0:
            return set()
        return set(range(offset // self.g, (offset + length - 1) // self.g + 1))

    def _byte_range(self, data):
        offset = data.draw(st.integers(0, self.size), label="offset")
        length = data.draw(st.integers(0, self.size - offset), label="length")
        return offset, length

    @rule(data=st.data())
    def set(self, data):
        offset, length = self._byte_range(data)
        self.bm.set(offset, length)
        self.model |= self._chunks(offset, length)

    @rule(data=st.data())
    def set_short(self, data):
        # Short ranges make many runs, which is where edges go wrong.
        offset = data.draw(st.integers(0, self.size), label="offset")
        length = data.draw(st.integers(0, min(3 * self.g, self.size - offset)), label="length")
        self.bm.set(offset, length)
        self.model |= self._chunks(offset, length)

    @rule(data=st.data())
    def reset(self, data):
        first = data.draw(st.integers(0, self.size // self.g), label="first")
        stop = data.draw(st.integers(first, self.n), label="stop")
        offset = first * self.g
        end = self.size if stop == self.n else stop * self.g
        self.bm.reset(offset, end - offset)
        self.model -= set(range(first, stop))

    @rule()
    def clear(self):
        self.bm.clear()
        self.model.clear()

    @rule(chunks=st.sets(st.integers(0, 5000), max_size=20))
    def merge(self, chunks):
        other = HBitmap(self.size, self.g)
        chunks = {c for c in chunks if c < self.n}
        for c in chunks:
            other.set(c * self.g, 1)
        self.bm.merge(other)
        self.model |= chunks

    @rule()
    def roundtrip(self):
        blob = self.bm.to_bytes()
        self.bm = HBitmap.from_bytes(blob)
        assert self.bm.to_bytes() == blob

    @precondition(lambda self: self.size > 0)
    @rule(data=st.data())
    def searches_agree(self, data):
        offset = data.draw(st.integers(0, self.size), label="offset")
        end = data.draw(st.one_of(st.none(), st.integers(offset, self.size)), label="end")
        limit = self.size if end is None else end
        window = range(offset // self.g, -(-limit // self.g)) if offset < limit else range(0)
        dirty = [c for c in window if c in self.model]
        clean = [c for c in window if c not in self.model]
        want_dirty = max(offset, dirty[0] * self.g) if dirty else -1
        want_clean = max(offset, clean[0] * self.g) if clean else -1
        assert self.bm.next_dirty(offset, end) == want_dirty
        assert self.bm.next_clean(offset, end) == want_clean
        area = self.bm.next_dirty_area(offset, end)
        if want_dirty < 0:
            assert area is None
        else:
            start, length = area
            assert start == want_dirty and length > 0
            # Dirty all the way, and it stops at a clean chunk or the limit.
            assert all(c in self.model
                       for c in range(start // self.g, (start + length - 1) // self.g + 1))
            assert start + length == limit or (start + length) // self.g not in self.model

    @invariant()
    def counts_agree(self):
        if not hasattr(self, "bm"):
            return
        self.bm._check_invariants()
        assert self.bm.dirty_count == len(self.model)
        assert all(c < self.n for c in self.model)

    @invariant()
    def areas_agree(self):
        if not hasattr(self, "bm"):
            return
        runs = runs_of(self.model, self.g, self.size)
        assert list(self.bm.dirty_areas()) == runs
        assert self.bm.dirty_extents().tolist() == [list(r) for r in runs]
        assert self.bm.dirty_bytes == sum(length for _, length in runs)
        first = runs[0][0] if runs else -1
        assert self.bm.next_dirty(0) == first


TestHBitmapMachine = HBitmapMachine.TestCase
TestHBitmapMachine.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
