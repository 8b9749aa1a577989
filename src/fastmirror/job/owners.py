"""Who else owns a disk: QEMU's image locks, exclusive block devices and
image format headers (docs/design.md, invariant 8: never write where another
owner is).

**Image locks.**  QEMU (a VM, qemu-img, qemu-io, qemu-storage-daemon)
says what it does with an image by open file description locks (fcntl
F_OFD_SETLK, shared read locks on single bytes) on the image itself; see
QEMU's block/file-posix.c, raw_apply_lock_bytes and raw_check_lock_bytes:

- byte LOCK_PERM_BASE + i held: "I use permission i";
- byte LOCK_SHARED_BASE + i held: "nobody else may use permission i";

where i is the index of the permission's bit (include/block/block-common.h:
consistent read 0x1 -> 0, write 0x2 -> 1, write unchanged 0x4 -> 2,
resize 0x8 -> 3).  To use a permission one checks that nobody holds its
"not shared" byte; to refuse sharing one checks that nobody holds its "use"
byte.  A check is F_OFD_GETLK with a write lock: any other open file
description's read lock on the byte conflicts with it.  As QEMU does, the
locks are taken first and checked afterwards, so that of two openers racing
at least one sees the other.  OFD locks belong to the open file description,
not to the process: a second job in the same process conflicts like any
other process, and the locks go away with the descriptor.  They are
advisory: they stop those who ask (QEMU, another fastmirror), not a plain
write(2).  Block devices get them too (on the device node's inode), as QEMU
does.

**Exclusive block devices.**  A block device opened with O_EXCL is refused
by the kernel (EBUSY) while it is mounted, used as swap, held by
device-mapper or md, or opened exclusively by someone else; we say which
when /proc and /sys tell.

**Image formats.**  A target that starts with a qcow2, vmdk, vhdx, vdi, vpc,
qed or LUKS header is an image (or an encrypted volume), not a raw disk;
writing raw bytes over it destroys it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from typing import Iterator, Optional

_log = logging.getLogger("fastmirror")

# QEMU's permission bits (include/block/block-common.h).
PERM_CONSISTENT_READ = 0x1
PERM_WRITE = 0x2
PERM_WRITE_UNCHANGED = 0x4
PERM_RESIZE = 0x8
PERM_ALL = 0xF
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
LOCK_PERM_BASE = 100        # + bit index: "I use this permission"
LOCK_SHARED_BASE = 200      # + bit index: "nobody else may use it"

# What a job holds.  The target: read and written by us alone (QEMU's
# mirror target does not share write either); its size must not change
# under us.  The source: read consistently; nobody else may write or resize
# it, because writes that do not come through job.source are never copied.
TARGET_PERM = PERM_CONSISTENT_READ | PERM_WRITE
TARGET_UNSHARED = PERM_WRITE | PERM_RESIZE
SOURCE_PERM = PERM_CONSISTENT_READ
SOURCE_UNSHARED = PERM_WRITE | PERM_RESIZE

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock on 64-bit Linux: l_type, l_whence, (pad), l_start, l_len,
# l_pid, (pad).
_FLOCK = struct.Struct("@hhqqi4x")
# Where OFD locks cannot be used (no kernel support, a filesystem without
# locks) QEMU's locking=auto goes on without them; so do we, with a warning.
_NO_LOCKS = (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class InUseError(OSError):
    """A side of the job is in use by another owner: another process holds
    QEMU's image lock that conflicts with the job (errno EBUSY), or a block
    device target is mounted or held (the kernel's EBUSY).  `side` is
    "source" or "target"; `lock` is True for an image lock conflict, which
    force_share=True overrides on the source."""

    side: str = ""
    lock: bool = False


class ImageTargetError(ValueError):
    """The target starts with an image format's header (`format`): it is an
    image, not a raw disk.  allow_image_target=True overwrites it anyway."""

    def __init__(self, message: str, path: str, format: str):
        super().__init__(message)
        self.path = path
        self.format = format


def _bits(mask: int) -> Iterator[tuple[int, int]]:
    """(bit index, bit) of every permission in mask."""
    for i in range(PERM_ALL.bit_length()):
        if mask & (1 << i):
            yield i, 1 << i


def _fcntl_lock(fd: int, cmd: int, ltype: int, start: int) -> int:
    """One OFD lock command on one byte; returns the l_type the kernel
    answered (F_OFD_GETLK: F_UNLCK when nothing conflicts)."""
    # l_pid must be 0 for OFD locks.
    arg = _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0)
    while True:
        try:
            out = fcntl.fcntl(fd, cmd, arg)
            return _FLOCK.unpack(out)[0]
        except InterruptedError:
            continue


def _taken_elsewhere(fd: int, byte: int) -> bool:
    """Does another open file description hold a lock on `byte`?"""
    return _fcntl_lock(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def _conflicts(fd: int, perm: int, unshared: int) -> list[tuple[int, str]]:
    """(byte, what) for every lock of other owners that conflicts with using
    `perm` and not sharing `unshared`, in QEMU's order (raw_check_lock_bytes)."""
    found = []
    for i, bit in _bits(perm):
        if _taken_elsewhere(fd, LOCK_SHARED_BASE + i):
            found.append((LOCK_SHARED_BASE + i, 'does not share "%s"' % PERM_NAMES[bit]))
    for i, bit in _bits(unshared):
        if _taken_elsewhere(fd, LOCK_PERM_BASE + i):
            found.append((LOCK_PERM_BASE + i, 'holds the "%s" lock' % PERM_NAMES[bit]))
    return found


def _say(found: list[tuple[int, str]]) -> str:
    return " and ".join(what for _, what in found)


class ImageLocks:
    """QEMU's lock bytes held through one descriptor: `perm` used and
    `unshared` not shared.  release() (or closing the descriptor) lets go."""

    def __init__(self, fd: int, perm: int, unshared: int):
        self.fd = fd
        self.bytes = ([LOCK_PERM_BASE + i for i, _ in _bits(perm)]
                      + [LOCK_SHARED_BASE + i for i, _ in _bits(unshared)])
        self.held: list[int] = []

    def acquire(self) -> Optional[int]:
        """Take every byte.  QEMU's read locks never conflict with each
        other; a write lock does (not QEMU's way, but an owner all the
        same): returns the first byte held so, or None."""
        for byte in self.bytes:
            try:
                _fcntl_lock(self.fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    return byte
                raise
            self.held.append(byte)
        return None

    def release(self) -> None:
        for byte in self.held:
            try:
                _fcntl_lock(self.fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)
            except OSError:
                pass        # the descriptor is going away: so are its locks
        self.held = []


def lock_side(fd: int, path: str, side: str, perm: int, unshared: int,
              force_share: bool = False) -> Optional[ImageLocks]:
    """Take and check QEMU's image locks for one side of a job.

    Raises InUseError when another owner conflicts (the locks taken are
    released first).  force_share=True (the source only, like `qemu-img -U`):
    take nothing, and warn that a copy of a disk another process writes may
    not be consistent.  Returns the locks held, or None."""
    if force_share:
        try:
            found = _conflicts(fd, 0, PERM_WRITE | PERM_RESIZE)
        except OSError:
            found = []
        if found:
            why = "%s %s" % (_who(fd, found), _say(found))
        else:
            why = "another process may write it during the copy"
        _log.warning("%s %s: copying without image locks, as asked (force share): %s; "
                     "the copy may not be consistent", side, path, why)
        return None
    locks = ImageLocks(fd, perm, unshared)
    try:
        blocked = locks.acquire()
        if blocked is not None:
            found = [(blocked, "holds a write lock on byte %d" % blocked)]
        else:
            found = _conflicts(fd, perm, unshared)
    except OSError as e:
        locks.release()
        if e.errno in _NO_LOCKS:
            _log.warning("%s %s: image locks are not supported here (%s): "
                         "going on without them", side, path, e.strerror)
            return None
        raise OSError(e.errno, "cannot take the %s's image locks: %s" % (side, e.strerror),
                      path) from e
    if found:
        locks.release()
        pid = holder(fd, [b for b, _ in found])
        if pid == os.getpid():
            what = "%s is in use by another job of this process (pid %d): it" % (side, pid)
        else:
            what = "%s is in use by another process: %s" % (side, _who(fd, found, pid))
        err = InUseError(errno.EBUSY, "%s %s" % (what, _say(found)), path)
        err.side, err.lock = side, True
        raise err
    return locks


def _who(fd: int, found: list[tuple[int, str]], pid: Optional[int] = -1) -> str:
    """ "qemu-io (pid 5134)", or "another process" when /proc does not tell."""
    if pid == -1:
        pid = holder(fd, [b for b, _ in found])
    if pid is None:
        return "another process"
    if pid == os.getpid():
        return "this process (pid %d)" % pid
    try:
        with open("/proc/%d/comm" % pid) as f:
            return "%s (pid %d)" % (f.read().strip(), pid)
    except OSError:
        return "pid %d" % pid


def holder(fd: int, lock_bytes: list[int]) -> Optional[int]:
    """Best effort: the pid of a process that holds an OFD lock on
    one of `lock_bytes` of fd's file, from /proc/*/fdinfo (OFD locks show
    pid -1 in /proc/locks).  None when it cannot tell (another user's
    process, another PID namespace)."""
    st = os.fstat(fd)
    ident = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    me = os.getpid()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            infos = os.listdir("/proc/%s/fdinfo" % pid)
        except OSError:
            continue
        for name in infos:
            if int(pid) == me and name == str(fd):
                continue
            try:
                with open("/proc/%s/fdinfo/%s" % (pid, name)) as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                # "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2146570 100 101"
                fields = line.split()
                if not line.startswith("lock:") or ident not in fields:
                    continue
                try:
                    start = int(fields[-2])
                    end = fields[-1]
                    end_ = 1 << 63 if end == "EOF" else int(end)
                except (ValueError, IndexError):
                    continue
                if any(start <= b <= end_ for b in lock_bytes):
                    return int(pid)
    return None


# ---------------------------------------------------------------------------
# Exclusive block devices
# ---------------------------------------------------------------------------

def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _partitions(rdev: int) -> list[int]:
    """The device numbers of the partitions of the disk `rdev`."""
    base = "/sys/dev/block/%d:%d" % (os.major(rdev), os.minor(rdev))
    found = []
    try:
        names = os.listdir(base)
    except OSError:
        return found
    for name in names:
        try:
            with open(os.path.join(base, name, "dev")) as f:
                major, minor = f.read().strip().split(":")
            if os.path.exists(os.path.join(base, name, "partition")):
                found.append(os.makedev(int(major), int(minor)))
        except (OSError, ValueError):
            continue
    return found


def _rdev_of(path: str) -> Optional[int]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def busy_reason(rdev: int) -> Optional[str]:
    """Why the kernel refuses an exclusive open of block device `rdev` (or
    of one of its partitions), as far as /proc and /sys tell."""
    devs = [rdev] + _partitions(rdev)
    keys = {"%d:%d" % (os.major(d), os.minor(d)) for d in devs}
    reasons = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                # 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw
                if len(fields) < 5 or " - " not in line:
                    continue
                source = line.split(" - ", 1)[1].split()
                on_dev = fields[2] in keys or (
                    len(source) > 1 and source[1].startswith("/")
                    and _rdev_of(_unescape(source[1])) in devs)
                if on_dev:
                    reasons.append("mounted on %s" % _unescape(fields[4]))
    except OSError:
        pass
    try:
        with open("/proc/swaps") as f:
            for line in list(f)[1:]:
                if _rdev_of(_unescape(line.split()[0])) in devs:
                    reasons.append("used as swap")
    except (OSError, IndexError):
        pass
    for d in devs:
        base = "/sys/dev/block/%d:%d/holders" % (os.major(d), os.minor(d))
        try:
            holders = sorted(os.listdir(base))
        except OSError:
            continue
        for h in holders:
            reasons.append("held by %s" % _describe_holder(h))
    if not reasons:
        return None
    seen: list[str] = []
    for r in reasons:
        if r not in seen:
            seen.append(r)
    return ", ".join(seen)


def _describe_holder(name: str) -> str:
    """dm-0 -> "device-mapper dm-0 (vg-lv)", md0 -> "md RAID md0"."""
    try:
        with open("/sys/block/%s/dm/name" % name) as f:
            return "device-mapper %s (%s)" % (name, f.read().strip())
    except OSError:
        pass
    if name.startswith("md"):
        return "md RAID %s" % name
    return name


def busy_error(path: str, rdev: int) -> InUseError:
    """The error for a block device target that O_EXCL refused."""
    why = busy_reason(rdev) or "opened exclusively by another program"
    err = InUseError(errno.EBUSY, "target is mounted or in use (EBUSY: %s)" % why, path)
    err.side = "target"
    return err


# ---------------------------------------------------------------------------
# Image formats
# ---------------------------------------------------------------------------

HEAD_BYTES = 4096
_VDI_SIGNATURE = (0xBEDA107F).to_bytes(4, "little")     # at offset 0x40


def detect_format(head: bytes) -> Optional[str]:
    """The image format whose header `head` (the first bytes of a disk)
    starts with, or None for anything else (a raw disk, a partition table,
    a filesystem: all raw bytes to us)."""
    if head.startswith(b"QFI\xfb"):
        version = int.from_bytes(head[4:8], "big")
        return "qcow2" if version >= 2 else "qcow"
    if head.startswith((b"KDMV", b"COWD", b"# Disk DescriptorFile")):
        return "vmdk"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if head[0x40:0x44] == _VDI_SIGNATURE:
        return "vdi"
    if head.startswith(b"LUKS\xba\xbe"):
        return "LUKS"
    if head.startswith(b"conectix"):
        return "vpc (VHD)"
    if head.startswith(b"QED\x00"):
        return "qed"
    return None


def read_head(fd: int, alignment: int) -> bytes:
    """The first bytes of an open disk, through the job's own descriptor
    (which may be O_DIRECT: hence a page-aligned buffer of whole sectors)."""
    length = max(HEAD_BYTES, alignment)
    with mmap.mmap(-1, length) as buf:
        while True:
            try:
                n = os.preadv(fd, [buf], 0)
                break
            except InterruptedError:
                continue
        return bytes(buf[:n])
