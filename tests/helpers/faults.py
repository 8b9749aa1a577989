"""The fault-injection shim (tests/faults/faultinject.c), built for a test
module: an LD_PRELOAD library that fails, shortens or interrupts chosen
system calls of a child process (see tests/test_faults.py)."""

from __future__ import annotations

import os
import shutil
import subprocess

from helpers.require import require_that

FAULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "faults")


def build_shim(folder) -> str:
    """Compile the shim into folder; its path.  Skips (or fails under
    FASTMIRROR_REQUIRE_ALL=1) without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    require_that(cc is not None, "no C compiler to build the fault-injection shim")
    out = os.path.join(os.fspath(folder), "faultinject.so")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", out,
                    os.path.join(FAULTS, "faultinject.c"), "-ldl", "-lpthread"], check=True)
    return out
