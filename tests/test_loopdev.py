"""Block devices: loop devices with 512-byte and 4 KiB logical sectors (and
direct I/O to their backing files) as source and as target, with writers,
judged by qemu-img compare.  Needs root and losetup: skipped otherwise, or
failed with FASTMIRROR_REQUIRE_ALL=1 (see helpers.require)."""

from __future__ import annotations

import os

import pytest

from fastmirror import EventType, MirrorJob

from helpers import (KiB, MiB, Writers, assert_all_bytes, assert_qemu_equal, assert_same,
                     device_size, make_image, phase1_then_phase2, read_bytes, sha256)

# Every test building a job runs once per I/O engine (conftest.py).
IO_ENGINES = ("io_uring", "threads")

TIMEOUT = 90
SECTORS = [512, 4096]


def _mirror_with_writers(job, seed, writes=60, align=512):
    """Writers through job.source in phase 1 (throttled) and phase 2, then
    complete; returns the final event."""
    writers = Writers(job.source, n=4, seed=seed, job=job, align=align)
    try:
        phase1_then_phase2(job, writers, writes, timeout=TIMEOUT)
        writers.stop()
    finally:
        writers.stop_event.set()
    job.complete()
    final = job.wait(TIMEOUT)
    assert final is not None and final.type == EventType.COMPLETED, final
    return final


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
@pytest.mark.parametrize("sector", SECTORS)
@pytest.mark.parametrize("direction", ["file-to-loop", "loop-to-file", "loop-to-loop"])
def test_loop_devices_as_source_and_target(tmp_path, mkjob, loopdev, sector, direction,
                                           copy_mode):
    size = 8 * MiB
    src_img = make_image(tmp_path / "src.img", size, seed=sector,
                         holes=[(2 * MiB, 1 * MiB), (5 * MiB + 64 * KiB, 512 * KiB)])
    src = loopdev(src_img, sector) if direction.startswith("loop") else src_img
    if direction.endswith("loop"):
        dst_img = make_image(tmp_path / "dst.img", size, pattern=0xAB)
        dst = loopdev(dst_img, sector)
    else:
        dst = tmp_path / "dst.img"          # created by the job
    job = mkjob(src, dst, granularity=64 * KiB, speed=2 * MiB, copy_mode=copy_mode)
    info = job.status()
    assert info.len == size
    _mirror_with_writers(job, seed=sector)
    job.close()
    assert device_size(dst) == size
    assert_same(src, dst)
    assert_qemu_equal(src, dst)


@pytest.mark.parametrize("sector", SECTORS)
def test_holes_onto_a_garbage_loop_device(tmp_path, mkjob, loopdev, sector):
    """A sparse source onto a block device full of 0xAB: the holes are zeroed
    on the device (BLKZEROOUT or a written copy of zeros)."""
    size = 8 * MiB
    holes = [(0, 1 * MiB), (3 * MiB + 4 * KiB, 1 * MiB), (7 * MiB, 1 * MiB)]
    src = make_image(tmp_path / "src.img", size, seed=3, holes=holes)
    dst = loopdev(make_image(tmp_path / "dst.img", size, pattern=0xAB), sector)
    job = mkjob(src, dst)
    job.start()
    assert job.wait_ready(TIMEOUT)
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    job.close()
    for off, length in holes:
        assert_all_bytes(dst, off, length, 0)
    assert_same(src, dst)
    assert_qemu_equal(src, dst)


def test_loop_device_of_the_source_as_target_is_refused(tmp_path, loopdev):
    src = make_image(tmp_path / "src.img", 4 * MiB, seed=4)
    digest = sha256(src)
    dev = loopdev(src, 512)
    with pytest.raises(ValueError, match="same disk"):
        MirrorJob(src, dev)
    with pytest.raises(ValueError, match="same disk"):
        MirrorJob(dev, src)
    assert sha256(src) == digest


def test_two_loop_devices_of_one_file_are_refused(tmp_path, loopdev):
    """Two loop devices over the same image are the same disk: writing one
    writes the other."""
    img = make_image(tmp_path / "src.img", 4 * MiB, seed=5)
    digest = sha256(img)
    a = loopdev(img, 512)
    b = loopdev(img, 512)
    with pytest.raises(ValueError, match="same disk"):
        MirrorJob(a, b)
    assert sha256(img) == digest


def test_granularity_below_the_sector_size_is_refused(tmp_path, loopdev):
    src = make_image(tmp_path / "src.img", 4 * MiB, seed=6)
    dst_img = make_image(tmp_path / "dst.img", 4 * MiB, pattern=0xCD)
    dev = loopdev(dst_img, 4096)
    digest = sha256(dst_img)
    for g in (512, 1024, 2048):
        with pytest.raises(ValueError, match="alignment"):
            MirrorJob(src, dev, granularity=g)
    # and as source, towards a target file that does not exist yet
    for g in (512, 2048):
        with pytest.raises(ValueError, match="alignment"):
            MirrorJob(dev, tmp_path / "new.img", granularity=g)
    assert not os.path.exists(tmp_path / "new.img"), "a refused job left a target file"
    assert sha256(dst_img) == digest
    job = MirrorJob(src, dev, granularity=4096)     # the sector size itself is fine
    job.close()


def test_read_only_loop_device_target_is_refused(tmp_path, loopdev):
    src = make_image(tmp_path / "src.img", 4 * MiB, seed=7)
    dst_img = make_image(tmp_path / "dst.img", 4 * MiB, pattern=0xCD)
    digest = sha256(dst_img)
    dev = loopdev(dst_img, 512, read_only=True)
    with pytest.raises(OSError) as info:
        MirrorJob(src, dev)
    assert dev in str(info.value)
    assert sha256(dst_img) == digest


TAIL = 5 * MiB + 1000      # not a multiple of 512 nor of 4096


def test_unaligned_source_to_a_file(tmp_path, mkjob):
    """The tail (1000 bytes past the last 4 KiB boundary) is copied, with
    writers, and the target file gets exactly the source's size."""
    src = make_image(tmp_path / "src.img", TAIL, seed=8)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=64 * KiB, speed=2 * MiB)
    _mirror_with_writers(job, seed=8)
    job.source.close()
    job.close()
    assert os.path.getsize(dst) == TAIL
    assert_same(src, dst)
    assert_qemu_equal(src, dst)


@pytest.mark.parametrize("tail", ["data", "hole"])
@pytest.mark.parametrize("sector", SECTORS)
def test_unaligned_source_to_a_bigger_loop_device(tmp_path, mkjob, loopdev, sector, tail):
    """Only [0, len) of the device is written: the rest keeps its 0xAB.  The
    source's unaligned end is data, or a hole (zeros that cannot be zeroed
    with BLKZEROOUT, as the range does not end on a sector)."""
    dev_size = 8 * MiB
    holes = [(1 * MiB, 1 * MiB)] + ([(4 * MiB, TAIL - 4 * MiB)] if tail == "hole" else [])
    src = make_image(tmp_path / "src.img", TAIL, seed=9, holes=holes)
    dst_img = make_image(tmp_path / "dst.img", dev_size, pattern=0xAB)
    dst = loopdev(dst_img, sector)
    job = mkjob(src, dst, granularity=64 * KiB, speed=2 * MiB)
    _mirror_with_writers(job, seed=9)
    job.close()
    assert device_size(dst) == dev_size
    assert_all_bytes(dst, TAIL, dev_size - TAIL, 0xAB)
    assert_same(src, dst, TAIL)
    # qemu-img judges [0, len): a plain copy of the device's first len bytes.
    head = tmp_path / "head.img"
    with open(head, "wb") as f:
        f.write(read_bytes(dst, 0, TAIL))
    assert_qemu_equal(src, head)
