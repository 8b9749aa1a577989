"""Never write where another owner is (docs/design.md, invariant 8), judged by
real peers: QEMU's image locks against qemu-io, qemu-img and a stopped
qemu-system-x86_64 holding a disk; exclusive block devices against a
mounted ext4 on a loop device; image format headers against images made by
qemu-img.  Tools missing: skipped, or failed with FASTMIRROR_REQUIRE_ALL=1.

The lock checks read the kernel's answer directly (fcntl F_OFD_GETLK and
/proc/locks), not fastmirror's own helpers."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from fastmirror import EventType, MirrorJob
from fastmirror.job.owners import ImageTargetError, InUseError, detect_format

from helpers import (KiB, MiB, assert_same, fm, make_image, read_bytes, require, require_root,
                      sha256)

TIMEOUT = 60
_FLOCK = struct.Struct("@hhqqi4x")
F_OFD_GETLK = 36


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def lock_held(path, byte: int) -> bool:
    """Does any open file description hold a lock on `byte` of path?  (Asked
    through a fresh descriptor, which holds nothing itself.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        return _FLOCK.unpack(fcntl.fcntl(fd, F_OFD_GETLK, arg))[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def locked_ranges(path) -> set[tuple[int, int]]:
    """The (start, end) ranges of OFD locks on path's inode, from /proc/locks."""
    st = os.stat(path)
    ident = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    out = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "OFDLCK" in fields and ident in fields:
                out.add((int(fields[-2]), int(fields[-1])))
    return out


def held_bytes(path) -> set[int]:
    return {b for start, end in locked_ranges(path) for b in range(start, end + 1)}


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for %s" % what, pytrace=False)
        time.sleep(0.05)


def qemu_io(*args) -> subprocess.CompletedProcess:
    return subprocess.run([require("qemu-io"), *args], capture_output=True, text=True,
                          timeout=TIMEOUT)


class Holder:
    """A QEMU process that keeps an image open until stopped."""

    def __init__(self, argv, path, byte: int):
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not lock_held(path, byte):
            if self.proc.poll() is not None:
                pytest.fail("%s exited %d: %s" % (argv[0], self.proc.returncode,
                                                  self.proc.stderr.read()), pytrace=False)
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("%s never locked byte %d of %s" % (argv[0], byte, path),
                            pytrace=False)
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        self.proc.stderr.close()


def qemu_system_holding(path) -> Holder:
    """A stopped VM (-S) with the image as a virtio disk: QEMU takes the
    disk's "write" permission (byte 101) and does not share it (byte 201)
    at startup, before the guest runs.  (With -drive if=none alone and no
    device, nothing asks for write: only byte 100 is taken.)"""
    return Holder([require("qemu-system-x86_64"), "-S", "-nodefaults", "-display", "none",
                   "-machine", "accel=tcg", "-drive",
                   "file=%s,format=raw,if=none,id=d0" % path,
                   "-device", "virtio-blk-pci,drive=d0"], path, 101)


def qemu_io_holding(path, read_only: bool = False) -> Holder:
    args = [require("qemu-io"), "-f", "raw"] + (["-r"] if read_only else [])
    return Holder(args + ["-c", "sleep 60000", str(path)], path, 100 if read_only else 101)


def run_ready_job(mkjob, src, dst, **kw):
    job = mkjob(src, dst, **kw)
    job.start()
    assert job.wait_ready(TIMEOUT)
    return job


def complete(job):
    job.complete()
    final = job.wait(TIMEOUT)
    assert final is not None and final.type == EventType.COMPLETED, final
    job.close()


# ---------------------------------------------------------------------------
# 1. Image locks, as QEMU takes them
# ---------------------------------------------------------------------------

def test_lock_bytes_are_qemus(tmp_path, mkjob):
    """The bytes QEMU's file-posix driver uses: 100 + bit index for a
    permission held, 200 + bit index for one not shared.  The target: read
    and write held (100-101), write and resize not shared (201, 203); the
    source: read held (100), write and resize not shared.  All gone after
    close()."""
    src = make_image(tmp_path / "src.img", 1 * MiB, seed=1)
    dst = make_image(tmp_path / "dst.img", 1 * MiB, pattern=0xAB)
    job = mkjob(src, dst)
    assert held_bytes(dst) == {100, 101, 201, 203}
    assert held_bytes(src) == {100, 201, 203}
    job.start()
    assert job.wait_ready(TIMEOUT)
    assert held_bytes(dst) == {100, 101, 201, 203}
    complete(job)
    assert held_bytes(dst) == set() and held_bytes(src) == set()


def test_qemu_io_cannot_write_the_target_during_a_job(tmp_path, mkjob):
    require("qemu-io")
    src = make_image(tmp_path / "src.img", 2 * MiB, seed=2)
    dst = make_image(tmp_path / "dst.img", 2 * MiB, pattern=0xAB)
    job = run_ready_job(mkjob, src, dst)
    r = qemu_io("-f", "raw", "-c", "write -P 0x5a 0 64k", str(dst))
    assert r.returncode != 0
    assert 'Failed to get "write" lock' in r.stdout + r.stderr, r
    complete(job)
    assert_same(src, dst)           # the refused write left nothing behind
    r = qemu_io("-f", "raw", "-c", "write -P 0x5a 0 64k", str(dst))
    assert r.returncode == 0, r.stderr
    assert read_bytes(dst, 0, 64 * KiB) == b"\x5a" * (64 * KiB)


def test_second_job_onto_the_same_target_is_refused(tmp_path, mkjob):
    src = make_image(tmp_path / "src.img", 2 * MiB, seed=3)
    other = make_image(tmp_path / "other.img", 2 * MiB, seed=4)
    dst = tmp_path / "dst.img"
    job = run_ready_job(mkjob, src, dst)
    with pytest.raises(InUseError) as ei:
        mkjob(other, dst)
    assert ei.value.errno == errno.EBUSY and ei.value.side == "target"
    assert "in use by another job of this process" in str(ei.value)
    # The first job's target as the second job's source: written by the
    # first job, so not a consistent source.
    with pytest.raises(InUseError) as ei:
        mkjob(dst, tmp_path / "third.img")
    assert ei.value.side == "source"
    assert not (tmp_path / "third.img").exists()
    complete(job)
    assert_same(src, dst)


def test_two_jobs_may_read_one_source(tmp_path, mkjob):
    src = make_image(tmp_path / "src.img", 2 * MiB, seed=5)
    a = run_ready_job(mkjob, src, tmp_path / "a.img")
    b = run_ready_job(mkjob, src, tmp_path / "b.img")
    complete(a)
    complete(b)
    assert_same(src, tmp_path / "a.img")
    assert_same(src, tmp_path / "b.img")


def test_second_mirror_command_onto_the_same_target_exits_2(tmp_path):
    src = make_image(tmp_path / "src.img", 4 * MiB, seed=6)
    other = make_image(tmp_path / "other.img", 4 * MiB, seed=7)
    dst = tmp_path / "dst.img"
    first = subprocess.Popen([sys.executable, "-m", "fastmirror", "mirror", str(src), str(dst),
                              "--speed", "1M"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: dst.exists() and lock_held(dst, 201), what="the first command's lock")
        # Stopped, it keeps its locks and cannot end before the second
        # command has run, however slow this machine is.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            r = fm("mirror", str(other), str(dst))
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert r.returncode == 2, r
        assert "target is in use by another process" in r.stderr, r.stderr
        assert 'holds the "write" lock' in r.stderr
        out, err = first.communicate(timeout=TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert_same(src, dst)


@pytest.mark.parametrize("peer", ["qemu-system", "qemu-io"])
def test_source_a_qemu_writes_is_refused_unless_forced(tmp_path, peer):
    src = make_image(tmp_path / "src.img", 1 * MiB, seed=8)
    dst = tmp_path / "dst.img"
    holder = qemu_system_holding(src) if peer == "qemu-system" else qemu_io_holding(src)
    try:
        r = fm("mirror", str(src), str(dst))
        assert r.returncode == 2, r
        assert "source is in use by another process" in r.stderr, r.stderr
        assert 'holds the "write" lock' in r.stderr
        assert "--force-share" in r.stderr
        assert not dst.exists(), "a refused job left a target behind"
        with pytest.raises(InUseError) as ei:
            MirrorJob(src, dst)
        assert ei.value.side == "source" and ei.value.lock
        r = fm("mirror", str(src), str(dst), "--force-share")
        assert r.returncode == 0, r.stderr
        assert "may not be consistent" in r.stderr, r.stderr
        assert holder.proc.poll() is None       # QEMU kept its disk all along
    finally:
        holder.stop()
    assert_same(src, dst)


def test_source_that_qemu_only_reads_is_accepted(tmp_path, mkjob):
    src = make_image(tmp_path / "src.img", 1 * MiB, seed=9)
    holder = qemu_io_holding(src, read_only=True)
    try:
        job = run_ready_job(mkjob, src, tmp_path / "dst.img")
        complete(job)
    finally:
        holder.stop()
    assert_same(src, tmp_path / "dst.img")


def test_qemu_img_info_reads_the_source_during_a_job(tmp_path, mkjob):
    qemu_img = require("qemu-img")
    src = make_image(tmp_path / "src.img", 1 * MiB, seed=10)
    job = run_ready_job(mkjob, src, tmp_path / "dst.img")
    r = subprocess.run([qemu_img, "info", str(src)], capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert "file format: raw" in r.stdout
    # ...while a writer is kept out of the source.
    r = qemu_io("-f", "raw", "-c", "write 0 4k", str(src))
    assert r.returncode != 0 and 'Failed to get "write" lock' in r.stdout + r.stderr, r
    complete(job)


def test_force_share_warns_even_when_nobody_writes(tmp_path, mkjob, caplog):
    src = make_image(tmp_path / "src.img", 1 * MiB, seed=11)
    with caplog.at_level(logging.WARNING, logger="fastmirror"):
        job = mkjob(src, tmp_path / "dst.img", force_share=True)
    assert "may not be consistent" in caplog.text
    assert held_bytes(src) == set()          # -U takes nothing on the source
    assert held_bytes(tmp_path / "dst.img") == {100, 101, 201, 203}
    job.close()


# ---------------------------------------------------------------------------
# 2. Exclusive block devices
# ---------------------------------------------------------------------------

def test_mounted_loop_device_is_refused_and_survives(tmp_path, loopdev):
    require_root()
    mkfs, mount, umount, fsck = (require(t) for t in ("mkfs.ext4", "mount", "umount",
                                                    "fsck.ext4"))
    dev = loopdev(make_image(tmp_path / "fs.img", 32 * MiB, pattern="sparse"))
    subprocess.run([mkfs, "-q", "-F", dev], check=True, timeout=TIMEOUT)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    src = make_image(tmp_path / "src.img", 4 * MiB, seed=12)
    subprocess.run([mount, dev, str(mnt)], check=True, timeout=TIMEOUT)
    try:
        (mnt / "keep.txt").write_text("still here\n")
        os.sync()
        r = fm("mirror", str(src), dev)
        assert r.returncode == 2, r
        assert "target is mounted or in use (EBUSY" in r.stderr, r.stderr
        assert "mounted on %s" % mnt in r.stderr, r.stderr
        with pytest.raises(InUseError) as ei:
            MirrorJob(src, dev)
        assert ei.value.errno == errno.EBUSY and ei.value.side == "target"
        # As a source it is copied, with a word on what cannot be promised.
        r = fm("mirror", dev, str(tmp_path / "copy.img"))
        assert r.returncode == 0, r.stderr
        assert "source %s is mounted on %s" % (dev, mnt) in r.stderr, r.stderr
        assert "may not be consistent" in r.stderr
    finally:
        subprocess.run([umount, str(mnt)], check=True, timeout=TIMEOUT)
    r = subprocess.run([fsck, "-fn", dev], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    subprocess.run([mount, dev, str(mnt)], check=True, timeout=TIMEOUT)
    try:
        assert (mnt / "keep.txt").read_text() == "still here\n"
    finally:
        subprocess.run([umount, str(mnt)], check=True, timeout=TIMEOUT)
    # Unmounted, it is a disk like any other.
    r = fm("mirror", str(src), dev)
    assert r.returncode == 0, r.stderr
    assert_same(src, dev, 4 * MiB)


def test_exclusively_opened_device_is_refused(tmp_path, loopdev, mkjob):
    require_root()
    require("qemu-io")
    src = make_image(tmp_path / "src.img", 1 * MiB, seed=13)
    dev = loopdev(make_image(tmp_path / "dst.img", 1 * MiB, pattern=0xAB))
    before = sha256(dev)
    fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(InUseError) as ei:
            mkjob(src, dev)
        assert "opened exclusively by another program" in str(ei.value)
    finally:
        os.close(fd)
    assert sha256(dev) == before
    # While the job runs, the job is the exclusive opener, and QEMU's
    # image locks apply to the device node as to a file.
    job = run_ready_job(mkjob, src, dev)
    with pytest.raises(OSError) as ei:
        os.close(os.open(dev, os.O_RDONLY | os.O_EXCL))
    assert ei.value.errno == errno.EBUSY
    r = qemu_io("-f", "raw", "-c", "write 0 4k", dev)
    assert r.returncode != 0 and 'Failed to get "write" lock' in r.stdout + r.stderr, r
    complete(job)
    assert_same(src, dev)


# ---------------------------------------------------------------------------
# 3. Image format headers
# ---------------------------------------------------------------------------

def test_detect_format_headers():
    vdi = bytearray(512)
    vdi[:4] = b"<<< "
    vdi[0x40:0x44] = (0xBEDA107F).to_bytes(4, "little")
    assert detect_format(bytes(vdi)) == "vdi"
    assert detect_format(b"QFI\xfb\0\0\0\x03" + bytes(100)) == "qcow2"
    assert detect_format(b"QFI\xfb\0\0\0\x01" + bytes(100)) == "qcow"
    assert detect_format(b"KDMV" + bytes(100)) == "vmdk"
    assert detect_format(b"# Disk DescriptorFile\nversion=1\n") == "vmdk"
    assert detect_format(b"vhdxfile" + bytes(100)) == "vhdx"
    assert detect_format(b"LUKS\xba\xbe\0\x02" + bytes(100)) == "LUKS"
    assert detect_format(_luks1_header().ljust(512, b"\0")) == "LUKS"   # the fallback below
    # Raw disks: zeros, an MBR, an ext4 superblock area, random bytes.
    assert detect_format(bytes(4096)) is None
    assert detect_format(bytes(510) + b"\x55\xaa") is None
    assert detect_format(b"QFI" + bytes(100)) is None
    assert detect_format(b"") is None


FORMATS = {
    "qcow2": ["-f", "qcow2"],
    "qcow2-preallocated": ["-f", "qcow2", "-o", "preallocation=full"],
    "vmdk": ["-f", "vmdk"],
    "vmdk-descriptor": ["-f", "vmdk", "-o", "subformat=monolithicFlat"],
    "vhdx": ["-f", "vhdx"],
    "vdi": ["-f", "vdi"],
    "vpc": ["-f", "vpc"],
    "qed": ["-f", "qed"],
    "luks": ["-f", "luks", "--object", "secret,id=s0,data=x",
             "-o", "key-secret=s0,iter-time=100"],
}
NAMES = {"qcow2-preallocated": "qcow2", "vmdk-descriptor": "vmdk", "luks": "LUKS",
         "vpc": "vpc (VHD)"}


def _luks1_header() -> bytes:
    """The first fields of a LUKS1 header (the on-disk format's phdr)."""
    return (b"LUKS\xba\xbe" + (1).to_bytes(2, "big") + b"aes".ljust(32, b"\0")
            + b"xts-plain64".ljust(32, b"\0") + b"sha256".ljust(32, b"\0")
            + (4096).to_bytes(4, "big") + (64).to_bytes(4, "big"))


@pytest.fixture(scope="module")
def qemu_images(tmp_path_factory):
    """make(path, kind): a copy of an image that qemu-img created once per
    module and kind (a LUKS header costs seconds of PBKDF benchmarking)."""
    made: dict[str, str] = {}
    folder = tmp_path_factory.mktemp("images")

    def make(path, kind: str):
        if kind not in made:
            qemu_img = require("qemu-img")
            orig = folder / ("orig-" + kind)
            for _ in range(5):      # luks: the PBKDF timing can fail on a busy machine
                r = subprocess.run([qemu_img, "create", "-q", *FORMATS[kind], str(orig),
                                    str(4 * MiB)], capture_output=True, text=True,
                                   timeout=TIMEOUT)
                if r.returncode == 0:
                    break
            else:
                if kind == "luks" and "accurate CPU usage" in r.stderr:
                    # qemu-img times its PBKDF with the thread's CPU clock,
                    # which a loaded machine can leave at 0 ms ("Unable to
                    # get accurate CPU usage"): write the LUKS1 header that
                    # cryptsetup would (magic, version, cipher, mode, hash).
                    orig.write_bytes(_luks1_header().ljust(4 * MiB, b"\0"))
                else:
                    pytest.fail("qemu-img create %s failed: %s" % (kind, r.stderr),
                                pytrace=False)
            made[kind] = str(orig)
        # A flat vmdk's descriptor names its extent by a relative path: a
        # copy of the descriptor alone is all the header check reads.
        shutil.copyfile(made[kind], path)
        return path

    return make


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_image_target_is_refused_unless_asked(tmp_path, kind, qemu_images):
    name = NAMES.get(kind, kind)
    dst = qemu_images(tmp_path / "dst.img", kind)
    # Smaller than every image file here (a vmdk descriptor is 344 bytes),
    # so that the option is enough.
    src = make_image(tmp_path / "src.img", 256, seed=14)
    before = sha256(dst)
    r = fm("mirror", str(src), str(dst))
    assert r.returncode == 2, r
    assert "target %s is a %s image, not a raw disk" % (dst, name) in r.stderr, r.stderr
    assert "--overwrite-image" in r.stderr
    assert sha256(dst) == before, "a refused target was written"
    with pytest.raises(ImageTargetError) as ei:
        MirrorJob(src, dst)
    assert ei.value.format == name
    assert sha256(dst) == before
    r = fm("mirror", str(src), str(dst), "--overwrite-image")
    assert r.returncode == 0, r.stderr
    assert read_bytes(dst, 0, 256) == read_bytes(src)
    job = MirrorJob(src, dst, allow_image_target=True)    # no longer an image
    job.close()


@pytest.mark.parametrize("kind", ["qcow2", "vmdk", "vhdx", "vdi", "luks"])
def test_image_source_is_copied_as_bytes_with_a_note(tmp_path, kind, caplog, qemu_images):
    name = NAMES.get(kind, kind)
    src = qemu_images(tmp_path / "src.img", kind)
    dst = tmp_path / "dst.img"
    r = fm("mirror", str(src), str(dst))
    assert r.returncode == 0, r.stderr
    note = [line for line in r.stderr.splitlines() if "container bytes are copied" in line]
    assert len(note) == 1, r.stderr
    assert note[0].startswith("fastmirror: source %s is a %s image" % (src, name))
    assert_same(src, dst)
    with caplog.at_level(logging.WARNING, logger="fastmirror"):
        job = MirrorJob(src, tmp_path / "dst2.img")
    job.close()
    assert "is a %s image: its container bytes are copied as they are" % name in caplog.text
