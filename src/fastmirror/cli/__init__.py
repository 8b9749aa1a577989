"""The `fastmirror` command line: mirror, verify, bench, demo."""

from fastmirror.cli.main import main

__all__ = ["main"]
