"""Images and plain byte-level reads and compares, with no help from the code
under test (fastmirror.job.verify); qemu-img compare as an independent judge."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess

import pytest

from fastmirror.bench import images
from helpers.require import require

KiB = 1024
MiB = 1024 * 1024


def pattern_bytes(length: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(length)


def make_image(path, size: int, pattern="random", holes=(), seed: int = 0):
    """Create (or overwrite) the file `path` of `size` bytes with the
    package's generator (fastmirror.bench.images.make_image).

    pattern: "random" (deterministic from seed), "zero" (allocated zeros),
    "sparse" (no data at all: one big hole), or an int byte value to fill with.
    holes: (offset, length) ranges left unwritten, so they are real holes of
    the file where they cover whole filesystem blocks (4 KiB here).
    Returns path."""
    images.make_image(path, size, pattern=pattern, holes=holes, seed=seed)
    return os.fspath(path)


def allocated_bytes(path) -> int:
    return os.stat(path).st_blocks * 512


def device_size(path) -> int:
    """Size of a regular file or a block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def read_bytes(path, offset: int = 0, length: int | None = None) -> bytes:
    """Read with plain buffered I/O (a fresh descriptor each time)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if length is None:
            length = os.lseek(fd, 0, os.SEEK_END) - offset
        out = bytearray()
        while len(out) < length:
            b = os.pread(fd, min(8 * MiB, length - len(out)), offset + len(out))
            if not b:
                break
            out += b
        return bytes(out)
    finally:
        os.close(fd)


def write_bytes(path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path, length: int | None = None) -> str:
    h = hashlib.sha256()
    if length is None:
        length = device_size(path)
    pos = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while pos < length:
            b = os.pread(fd, min(8 * MiB, length - pos), pos)
            if not b:
                break
            h.update(b)
            pos += len(b)
    finally:
        os.close(fd)
    return h.hexdigest()


def first_difference(a, b, length: int | None = None, chunk: int = 4 * MiB) -> int:
    """First offset in [0, length) where a and b differ (a side that ends early
    differs at its end), or -1.  length defaults to the size of a."""
    if length is None:
        length = device_size(a)
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            x, y = os.pread(fa, n, pos), os.pread(fb, n, pos)
            if x != y:
                for i in range(min(len(x), len(y))):
                    if x[i] != y[i]:
                        return pos + i
                return pos + min(len(x), len(y))
            if len(x) < n:
                return pos + len(x)
            pos += n
        return -1
    finally:
        os.close(fa)
        os.close(fb)


def assert_same(a, b, length: int | None = None) -> None:
    d = first_difference(a, b, length)
    if d >= 0:
        ctx_a = read_bytes(a, d, 16)
        ctx_b = read_bytes(b, d, 16)
        pytest.fail("%s and %s differ at offset %d (chunk %d of 64 KiB): %s vs %s"
                    % (a, b, d, d // (64 * KiB), ctx_a.hex(), ctx_b.hex()))


def assert_all_bytes(path, offset: int, length: int, value: int) -> None:
    data = read_bytes(path, offset, length)
    assert len(data) == length, "%s: short read at %d" % (path, offset)
    if data.count(value) != length:
        bad = next(i for i, c in enumerate(data) if c != value)
        pytest.fail("%s: byte at %d is %#x, expected %#x"
                    % (path, offset + bad, data[bad], value))


# qemu-img compare: an independent judge of equality

def qemu_img_compare(a, b) -> subprocess.CompletedProcess:
    """Run `qemu-img compare -f raw -F raw a b`.  Exit status 0: identical,
    1: different (when sizes differ, the extra part must read as zeros),
    2 and above: an error."""
    qemu_img = require("qemu-img")
    # -U: no image locking; the job that used the files is over, and a loop
    # device or another reader must not make the comparison fail.
    return subprocess.run([qemu_img, "compare", "-U", "-f", "raw", "-F", "raw",
                           os.fspath(a), os.fspath(b)],
                          capture_output=True, text=True, timeout=120)


def assert_qemu_equal(a, b) -> None:
    r = qemu_img_compare(a, b)
    assert r.returncode == 0, "qemu-img compare %s %s: rc=%d %s%s" % (
        a, b, r.returncode, r.stdout, r.stderr)
