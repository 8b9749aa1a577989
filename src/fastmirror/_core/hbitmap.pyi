"""Typed stub for fastmirror._core.hbitmap (a Cython module): the hierarchical
dirty bitmap.  Offsets and lengths are in bytes; every method is thread-safe."""

from collections.abc import Iterator
from typing import SupportsIndex, final

import numpy
import numpy.typing
from typing_extensions import Buffer, Self, disjoint_base

@disjoint_base
class HBitmap:
    """One dirty bit per chunk of ``granularity`` bytes (a power of two, at
    least 512) over ``size`` bytes."""

    def __new__(cls, size: SupportsIndex, granularity: SupportsIndex = 65536) -> Self: ...
    @property
    def size(self) -> int:
        """Bytes covered."""
    @property
    def granularity(self) -> int:
        """Bytes per chunk."""
    def set(self, offset: SupportsIndex, length: SupportsIndex) -> None:
        """Dirty every chunk that overlaps [offset, offset + length)."""
    def reset(self, offset: SupportsIndex, length: SupportsIndex) -> None:
        """Clean the chunks of [offset, offset + length); offset and end aligned
        to the granularity (the end may be size)."""
    def get(self, offset: SupportsIndex) -> bool:
        """Whether the chunk holding ``offset`` is dirty."""
    @property
    def dirty_count(self) -> int:
        """Dirty chunks."""
    @property
    def dirty_bytes(self) -> int:
        """Bytes covered by dirty chunks, the last one clipped to size."""
    @property
    def memory_bytes(self) -> int:
        """Bytes allocated for the bit levels."""
    def next_dirty(self, offset: SupportsIndex, end: SupportsIndex | None = None) -> int:
        """First dirty byte offset in [offset, end), or -1."""
    def next_clean(self, offset: SupportsIndex, end: SupportsIndex | None = None) -> int:
        """First clean byte offset in [offset, end), or -1."""
    def next_dirty_area(
        self,
        offset: SupportsIndex,
        end: SupportsIndex | None = None,
        max_length: SupportsIndex | None = None,
    ) -> tuple[int, int] | None:
        """The dirty run from next_dirty(offset, end), as (offset, length),
        clipped to end, size and max_length; None when there is none."""
    def dirty_areas(self) -> _DirtyAreas:
        """The maximal dirty runs (offset, length), in order."""
    def dirty_extents(self) -> numpy.typing.NDArray[numpy.int64]:
        """The dirty runs as an (N, 2) int64 array of (offset, length)."""
    def merge(self, other: HBitmap) -> None:
        """OR in a bitmap of the same size and granularity."""
    def clear(self) -> None:
        """Clean every chunk."""
    def to_bytes(self) -> bytes:
        """Serialize (versioned header, bottom-level words, CRC-32)."""
    @classmethod
    def from_bytes(cls, data: Buffer) -> HBitmap:
        """Rebuild a bitmap from to_bytes(); ValueError when it is corrupt."""
    def _check_invariants(self) -> tuple[int, ...]:
        """For tests: check the internal invariants; the words of each level."""
    def __len__(self) -> int: ...
    def __sizeof__(self) -> int: ...
    def __reduce__(self) -> tuple[object, tuple[bytes]]: ...

@final
class _DirtyAreas(Iterator[tuple[int, int]]):
    def __new__(cls, bm: HBitmap) -> Self: ...
    def __iter__(self) -> Self: ...
    def __next__(self) -> tuple[int, int]: ...
