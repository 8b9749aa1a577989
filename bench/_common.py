"""What the benchmark modules share: the size of their images, how a missing
peer tool is answered, and the images themselves (fixtures in conftest.py)."""

from __future__ import annotations

import os

import pytest

from fastmirror.bench import harness as fmbench
from fastmirror.units import short

REQUIRE_ALL = os.environ.get("FASTMIRROR_REQUIRE_ALL") == "1"
SIZE = fmbench.parse_size(os.environ.get("FASTMIRROR_BENCH_SIZE", "1G"))
SIZE_LABEL = short(SIZE, "iB")


def missing(why: str) -> None:
    """Skip, or fail under FASTMIRROR_REQUIRE_ALL=1, for a missing tool."""
    if REQUIRE_ALL:
        pytest.fail("FASTMIRROR_REQUIRE_ALL=1 but " + why, pytrace=False)
    pytest.skip(why)


def tool_path(tool: str) -> str:
    """Where a benchmarked tool runs from (fmbench.find_tool), or missing()."""
    path, why = fmbench.find_tool(tool)
    if path is None:
        missing(why or "%s is not available" % tool)
    return path


def require_uring() -> None:
    from fastmirror._core import blockio as _io

    if _io.uring_error() is not None:
        missing("io_uring is refused here: %s" % _io.uring_error())
