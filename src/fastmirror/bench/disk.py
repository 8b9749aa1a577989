"""The source, the target and the machine around a run: the marker blocks
that catch a tool that copied nothing, the page cache, the filesystem and
the disk queue under a path, the tools' versions."""

from __future__ import annotations

import mmap
import os
import stat
import subprocess
from typing import Optional

from fastmirror._core import blockio

__all__ = ["device_size", "drop_caches", "reset_target", "check_markers", "full_compare",
           "fs_type", "queue_limits", "tool_version"]

MARK = 4096                 # bytes of each marker block written before a run


def device_size(path: str) -> int:
    """Bytes of a regular file or a block device (blockio.probe)."""
    fd, _ = blockio.open_file(path, os.O_RDONLY, False)
    try:
        return blockio.probe(fd).size
    finally:
        os.close(fd)


def drop_caches() -> bool:
    """sync, then drop clean page cache, dentries and inodes; True when
    dropped (needs root)."""
    os.sync()
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _marker_offsets(size: int) -> list[int]:
    if size < MARK:
        return []
    last = (size - MARK) // MARK * MARK
    return sorted({0, (size // 2) // MARK * MARK, last})


def reset_target(dst: str, size: int, fresh: bool = False) -> None:
    """Before a run: a file target is truncated to nothing and back to `size`
    with fresh=True; then the marker blocks are overwritten with a pattern
    no source block holds, and flushed."""
    if fresh and stat.S_ISREG(os.stat(dst).st_mode):
        os.truncate(dst, 0)
        os.truncate(dst, size)
    offsets = _marker_offsets(size)
    if not offsets:
        return
    buf = mmap.mmap(-1, MARK)          # page aligned, for O_DIRECT
    try:
        buf.write(b"fastmirror-bench-marker\xa5" * (MARK // 24) + b"\xa5" * (MARK % 24))
        fd = blockio.open_file(dst, os.O_WRONLY, True)[0]
        try:
            for off in offsets:
                if os.pwritev(fd, [buf], off) != MARK:
                    raise OSError("short write of a marker block to %s" % dst)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    finally:
        buf.close()


def check_markers(src: str, dst: str, size: int) -> Optional[int]:
    """After a run: the first marker offset where dst differs from src, or None."""
    offsets = _marker_offsets(size)
    if not offsets:
        return None
    a, b = mmap.mmap(-1, MARK), mmap.mmap(-1, MARK)
    sfd = blockio.open_file(src, os.O_RDONLY, True)[0]
    try:
        tfd = blockio.open_file(dst, os.O_RDONLY, True)[0]
        try:
            for off in offsets:
                na, nb = os.preadv(sfd, [a], off), os.preadv(tfd, [b], off)
                if na != nb or a[:na] != b[:nb]:
                    return off
        finally:
            os.close(tfd)
    finally:
        os.close(sfd)
        a.close()
        b.close()
    return None


def full_compare(src: str, dst: str, size: int) -> int:
    from fastmirror.job.verify import first_difference
    return first_difference(src, dst, size)


def fs_type(path: str) -> Optional[str]:
    """The filesystem type holding path, from /proc/self/mounts."""
    try:
        real = os.path.realpath(path)
        if not os.path.exists(real):
            real = os.path.dirname(real)
        best, fstype = "", None
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if ((real == mnt or real.startswith(mnt.rstrip("/") + "/"))
                        and len(mnt) >= len(best)):
                    best, fstype = mnt, parts[2]
        return fstype
    except OSError:
        return None


def queue_limits(path: str) -> Optional[tuple[str, int, int]]:
    """(disk name, max_segments, max_sectors_kb) of the disk holding path
    (a file's filesystem, or the block device itself), or None."""
    try:
        st = os.stat(path)
        dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
        sys_dir = os.path.realpath("/sys/dev/block/%d:%d" % (os.major(dev), os.minor(dev)))
        if not os.path.isdir(os.path.join(sys_dir, "queue")):
            sys_dir = os.path.dirname(sys_dir)      # a partition: its disk's queue
        with open(os.path.join(sys_dir, "queue", "max_segments")) as f:
            segments = int(f.read())
        with open(os.path.join(sys_dir, "queue", "max_sectors_kb")) as f:
            sectors_kb = int(f.read())
        return os.path.basename(sys_dir), segments, sectors_kb
    except (OSError, ValueError):
        return None


def tool_version(tool: str, path: Optional[str]) -> Optional[str]:
    if tool == "fastmirror":
        import fastmirror
        return "fastmirror " + fastmirror.__version__
    if path is None:
        return None
    try:
        p = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        return (p.stdout or p.stderr).splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
