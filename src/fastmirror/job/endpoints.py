"""Opening and checking a job's two sides before anything is written.

Every check here runs before the first byte reaches the target (invariant 7):
the source exists and is a regular file or a block device, the target is
not the source (by inode, by device number, as a loop device backed by
the other side, or as two loop devices over one file), the target is
writable (a read-only block device is refused too, though it opens for
writing) and at least as large as the source, and a missing target's folder
exists.  The checks run on the descriptors
that the job will use, so a path swapped between check and use cannot slip
through; later descriptors of the same file are reopened through a checked
descriptor (reopen()), never by path.

Then the other owners (owners.py, invariant 8): a block device target is
opened with O_EXCL (refused while mounted or held), a target with an image
format header is refused unless allow_image_target, and both sides take
QEMU's image locks: a side that another process holds in a conflicting way
is refused (the source is copied anyway with force_share, with a warning).
The locks stay held until the endpoints are closed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import sys
from typing import Optional

from fastmirror._core import blockio as _io
from fastmirror.job import owners

_log = logging.getLogger("fastmirror")


class Endpoint:
    """One side of a job: an open descriptor and what we know of it."""

    def __init__(self, path: str, fd: int, direct: bool, info: "_io.DeviceInfo",
                 created: bool = False, tail_fd: Optional[int] = None):
        self.path = path
        self.fd = fd
        self.direct = direct            # O_DIRECT in effect on fd
        self.info = info
        self.created = created          # we created this file (it reads zeros)
        self.tail_fd = fd if tail_fd is None else tail_fd
        self.locks: Optional[owners.ImageLocks] = None   # QEMU's lock bytes held on fd
        self.image_format: Optional[str] = None          # header the disk starts with

    def current_size(self) -> int:
        if self.info.is_block:
            return _io.probe(self.fd).size
        return os.fstat(self.fd).st_size

    def open_buffered(self) -> int:
        """A new buffered read-write descriptor of the same file."""
        return reopen(self.fd, os.O_RDWR)

    def remove_created(self) -> None:
        """Unlink the file that open created, if its path still names it
        (not a file put there since)."""
        if self.created and self.fd >= 0:
            _unlink_if_same(self.path, os.fstat(self.fd))

    def close(self) -> None:
        # Unlock explicitly: closing fd alone keeps the locks while a child
        # forked meanwhile (between its fork and exec) still shares them.
        if self.locks is not None:
            self.locks.release()
            self.locks = None
        for fd in {self.fd, self.tail_fd}:
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.tail_fd = -1


def reopen(fd: int, flags: int) -> int:
    """A new open file description, with `flags`, of the file behind fd:
    /proc/self/fd/N names that inode whatever its path names now."""
    return os.open("/proc/self/fd/%d" % fd, flags | os.O_CLOEXEC)


def _unlink_if_same(path: str, st: os.stat_result) -> None:
    try:
        if _same_object(os.stat(path), st):
            os.unlink(path)
    except OSError:
        pass


_KINDS = ((stat.S_ISREG, "file"), (stat.S_ISBLK, "block"), (stat.S_ISDIR, "directory"),
          (stat.S_ISCHR, "character device"), (stat.S_ISFIFO, "fifo"),
          (stat.S_ISSOCK, "socket"))


def _kind(st: os.stat_result) -> str:
    return next((name for test, name in _KINDS if test(st.st_mode)), "special file")


def _refuse_kind(path: str, st: os.stat_result, role: str) -> None:
    kind = _kind(st)
    if kind == "directory":
        raise IsADirectoryError(errno.EISDIR, "%s is a directory" % role, path)
    if kind not in ("file", "block"):
        raise ValueError("%s %s is a %s; fastmirror needs a regular file or a "
                         "block device" % (role, path, kind))


def loop_backing_file(st: os.stat_result) -> Optional[str]:
    """The file behind a loop device, from sysfs; None for other devices."""
    if not stat.S_ISBLK(st.st_mode):
        return None
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    try:
        with open("/sys/dev/block/%d:%d/loop/backing_file" % (major, minor)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _same_object(a: os.stat_result, b: os.stat_result) -> bool:
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        return a.st_rdev == b.st_rdev
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _backed_by(dev: os.stat_result, other: os.stat_result) -> bool:
    """Is block device `dev` a loop device whose backing file is `other`?"""
    backing = loop_backing_file(dev)
    if backing is None:
        return False
    try:
        return _same_object(os.stat(backing), other)
    except OSError:
        return False


def _same_backing(a: os.stat_result, b: os.stat_result) -> bool:
    """Are `a` and `b` two loop devices over the same file?"""
    backing_a, backing_b = loop_backing_file(a), loop_backing_file(b)
    if backing_a is None or backing_b is None:
        return False
    try:
        return _same_object(os.stat(backing_a), os.stat(backing_b))
    except OSError:
        return False


def check_not_same(src_path: str, src: os.stat_result, dst_path: str,
                   dst: os.stat_result) -> None:
    if (_same_object(src, dst) or _backed_by(src, dst) or _backed_by(dst, src)
            or _same_backing(src, dst)):
        raise ValueError("source %s and target %s are the same disk; refusing to "
                         "mirror a disk onto itself" % (src_path, dst_path))


BLKROGET = 0x125E     # _IO(0x12, 94): is the block device read-only


def check_writable_block(path: str, fd: int) -> None:
    """A read-only block device (losetup --read-only, a write-protected
    disk) opens for writing all the same; refuse it before any write."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, BLKROGET, buf)
    except OSError:
        return          # cannot tell: the first write will say
    if int.from_bytes(buf, sys.byteorder):
        raise PermissionError(errno.EROFS, "target is a read-only block device", path)


def open_source(path: str, direct: bool, force_share: bool = False) -> Endpoint:
    st = os.stat(path)        # FileNotFoundError names the path
    _refuse_kind(path, st, "source")
    fd, is_direct = _io.open_file(path, os.O_RDONLY, direct)
    try:
        fst = os.fstat(fd)
        _refuse_kind(path, fst, "source")
        src = Endpoint(path, fd, is_direct, _io.probe(fd))
        src.image_format = _source_format(src)
        if src.info.is_block:
            # Not refused (QEMU does not either), but said: the kernel's
            # writes to a mounted filesystem never come through job.source.
            why = owners.busy_reason(fst.st_rdev)
            if why is not None:
                _log.warning("source %s is %s: writes that do not come through fastmirror "
                             "are not copied, so the copy may not be consistent", path, why)
        src.locks = owners.lock_side(fd, path, "source", owners.SOURCE_PERM,
                                     owners.SOURCE_UNSHARED, force_share)
        return src
    except BaseException:
        os.close(fd)
        raise


def _source_format(src: Endpoint) -> Optional[str]:
    """A source that is an image is copied as the bytes it holds: say so."""
    try:
        fmt = owners.detect_format(owners.read_head(src.fd, src.info.alignment))
    except OSError:
        return None       # the copy reads it again and reports under its policy
    if fmt is not None:
        _log.warning("source %s is a %s image: its container bytes are copied as they "
                     "are (fastmirror copies raw bytes, it does not convert images)",
                     src.path, fmt)
    return fmt


def _check_target_format(dst_path: str, fd: int, alignment: int) -> None:
    fmt = owners.detect_format(owners.read_head(fd, alignment))
    if fmt is not None:
        raise owners.ImageTargetError(
            "target %s is a %s image, not a raw disk; pass --overwrite-image "
            "(allow_image_target=True) to overwrite it" % (dst_path, fmt), dst_path, fmt)


def _open_target(dst_path: str, dst_st: os.stat_result, direct: bool) -> tuple[int, bool]:
    """Open an existing target; a block device exclusively (O_EXCL), which
    the kernel refuses while it is mounted or held by someone else."""
    if not stat.S_ISBLK(dst_st.st_mode):
        return _io.open_file(dst_path, os.O_RDWR, direct)
    try:
        return _io.open_file(dst_path, os.O_RDWR | os.O_EXCL, direct)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise owners.busy_error(dst_path, dst_st.st_rdev) from None
        raise


def validate_pair(src_path: str, dst_path: str, direct: bool, force_share: bool = False,
                  allow_image_target: bool = False) -> tuple[Endpoint, Endpoint]:
    """Open and check both sides; on any refusal nothing was written and no
    descriptor stays open (a target this call created is removed)."""
    src = open_source(src_path, direct, force_share)
    created = False
    dst_fd = tail_fd = -1
    try:
        src_st = os.fstat(src.fd)
        try:
            dst_st = os.stat(dst_path)
        except FileNotFoundError:
            dst_st = None
        if dst_st is not None:
            _refuse_kind(dst_path, dst_st, "target")
            check_not_same(src_path, src_st, dst_path, dst_st)
            dst_fd, dst_direct = _open_target(dst_path, dst_st, direct)
        else:
            parent = os.path.dirname(os.path.abspath(dst_path))
            if not os.path.isdir(parent):
                raise FileNotFoundError(errno.ENOENT, "target folder does not exist",
                                        parent)
            dst_fd, dst_direct = _io.open_file(
                dst_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, direct)
            created = True
            # A fresh sparse file of the source's size: it reads as zeros.
            os.ftruncate(dst_fd, src.info.size)
        fst = os.fstat(dst_fd)
        _refuse_kind(dst_path, fst, "target")
        check_not_same(src_path, src_st, dst_path, fst)
        info = _io.probe(dst_fd)
        if info.is_block:
            check_writable_block(dst_path, dst_fd)
        # An image first: its file is often smaller than the disk it holds,
        # and "is a qcow2 image" is the refusal that explains.
        if not created and not allow_image_target:
            _check_target_format(dst_path, dst_fd, info.alignment)
        if info.size < src.info.size:
            raise ValueError("target %s (%d bytes) is smaller than source %s (%d bytes)"
                             % (dst_path, info.size, src_path, src.info.size))
        locks = owners.lock_side(dst_fd, dst_path, "target", owners.TARGET_PERM,
                                 owners.TARGET_UNSHARED)
        # The unaligned tail of the source goes through a buffered descriptor,
        # so that O_DIRECT never writes past the source's size.
        if dst_direct and src.info.size % max(info.alignment, src.info.alignment):
            tail_fd = reopen(dst_fd, os.O_WRONLY)
        dst = Endpoint(dst_path, dst_fd, dst_direct, info, created,
                       tail_fd if tail_fd >= 0 else None)
        dst.locks = locks
        return src, dst
    except BaseException:
        src.close()
        if created:
            _unlink_if_same(dst_path, os.fstat(dst_fd))
        for fd in (dst_fd, tail_fd):
            if fd >= 0:
                os.close(fd)
        raise
