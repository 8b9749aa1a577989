"""Benchmarks live in bench_*.py files (one module per area).

Make `pytest bench` collect bench_*.py even where the ini's python_files does
not name that pattern; where it does (or the file is named on the command
line), pytest collects the file itself and this hook stays out of the way.
The images the copy benchmarks share are fixtures here.
"""

import fnmatch
import os

import pytest

from _common import SIZE
from fastmirror.bench import harness as fmbench
from fastmirror.bench.images import make_image


def pytest_collect_file(parent, file_path):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path) or any(
            fnmatch.fnmatch(file_path.name, pattern)
            for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(scope="session")
def bench_source(tmp_path_factory):
    """The source image: SIZE bytes of non-zero pseudo-random data with no
    holes, made once per session (writer benchmarks change its content)."""
    path = str(tmp_path_factory.mktemp("bench-source") / "source.img")
    make_image(path, SIZE, exclusive=True)
    yield path
    os.unlink(path)


@pytest.fixture
def bench_target(bench_source, tmp_path):
    """A target file of the source's size, fully written once (untimed) so
    every tool overwrites allocated blocks, as `fastmirror bench` does."""
    path = str(tmp_path / "target.img")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    fill = fmbench.run_tool("fastmirror", bench_source, path, SIZE)
    assert fill.ok, "filling the target failed: %s" % fill.error
    yield path
    os.unlink(path)
