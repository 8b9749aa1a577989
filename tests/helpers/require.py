"""What a test needs from the machine: skip with a reason, or fail on a
machine that must run everything (FASTMIRROR_REQUIRE_ALL=1); and the
fastmirror command as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REQUIRE_ALL = os.environ.get("FASTMIRROR_REQUIRE_ALL") == "1"


def _missing(reason: str) -> None:
    if REQUIRE_ALL:
        pytest.fail("FASTMIRROR_REQUIRE_ALL=1 but " + reason, pytrace=False)
    pytest.skip(reason)


def require_that(ok: bool, reason: str) -> None:
    """Skip (or fail) with `reason` unless ok."""
    if not ok:
        _missing(reason)


def require(tool: str) -> str:
    """The full path of `tool`; skips (or fails) when it is not installed."""
    path = shutil.which(tool)
    if path is None:
        _missing("%s is not installed (not on PATH)" % tool)
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        _missing("needs root (running as uid %d)" % os.geteuid())


def require_uring() -> None:
    """io_uring usable for reads and writes here (kernel, seccomp, sysctl)."""
    from fastmirror._core import blockio as _io

    why = _io.uring_error()
    require_that(why is None, "io_uring is refused here: %s" % why)


def require_loop() -> str:
    """Root, losetup and the loop driver; returns losetup's path."""
    require_root()
    losetup = require("losetup")
    if not os.path.exists("/dev/loop-control"):
        _missing("no loop device support (/dev/loop-control is missing)")
    return losetup


def fm(*args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the fastmirror command as a user does: a separate process."""
    return subprocess.run([sys.executable, "-m", "fastmirror", *args],
                          capture_output=True, text=True, timeout=timeout, **kw)
