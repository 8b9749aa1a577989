"""Benchmarks live in bench_*.py files (one module per area).

Make `pytest bench` collect bench_*.py even where the ini's python_files does
not name that pattern; where it does (or the file is named on the command
line), pytest collects the file itself and this hook stays out of the way.
"""

import fnmatch

import pytest


def pytest_collect_file(parent, file_path):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path) or any(
            fnmatch.fnmatch(file_path.name, pattern)
            for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)
