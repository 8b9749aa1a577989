"""Helpers for the fastmirror tests: import them with ``from helpers import ...``
(pytest puts tests/ on sys.path, as it does for conftest.py).

  require(tool) / require_root() / require_loop() / require_uring() / require_that(ok, why)
                                    skip, or fail with FASTMIRROR_REQUIRE_ALL=1
  fm(*args)                         the fastmirror command, in a separate process
  make_image(path, size, pattern=..., holes=..., seed=...)   a test image
  read_bytes / write_bytes / sha256 / device_size / allocated_bytes   plain I/O
  first_difference / assert_same / assert_all_bytes          plain-Python compares
  qemu_img_compare / assert_qemu_equal                       qemu-img as a judge
  Writers, phase1_then_phase2       threads writing through job.source, logged
  helpers.nbd: connect(path), recv_exact(s, n)   a raw NBD client's handshake
  helpers.jobs: run_to_end(job)     start, complete at READY, close: the last event

The equality checks here deliberately do not use fastmirror.job.verify: the
code under test must not judge itself.
"""

from helpers.files import (KiB, MiB, allocated_bytes, assert_all_bytes, assert_qemu_equal,
                           assert_same, device_size, first_difference, make_image,
                           pattern_bytes, qemu_img_compare, read_bytes, sha256, write_bytes)
from helpers.require import (REQUIRE_ALL, fm, require, require_loop, require_root,
                             require_that, require_uring)
from helpers.writers import Writers, phase1_then_phase2

__all__ = ["KiB", "MiB", "REQUIRE_ALL", "Writers", "allocated_bytes", "assert_all_bytes",
           "assert_qemu_equal", "assert_same", "device_size", "first_difference", "fm",
           "make_image", "pattern_bytes", "phase1_then_phase2", "qemu_img_compare",
           "read_bytes", "require", "require_loop", "require_root", "require_that",
           "require_uring", "sha256", "write_bytes"]
