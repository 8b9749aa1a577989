"""Sizes as people type and read them: '64K', '1.5G', '16 MiB'."""

from __future__ import annotations

import argparse

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
# One convention, dd's: a bare letter or "iB" is binary (64K = 64KiB = 65536),
# a letter with "B" is decimal (64kB = 64KB = 64000, 16MB = 16000000).  A
# "16MB" that silently meant 16 MiB would be 5 % more than the user asked.
_DECIMAL = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12, "p": 10 ** 15}


def parse_size(text: str) -> int:
    """'65536', '64K', '64KiB', '1.5G', '16 MiB' (binary), '16MB', '64kB'
    (decimal) -> bytes.  Raises argparse.ArgumentTypeError (a ValueError)
    on anything else."""
    s = str(text).strip().lower().replace(" ", "")
    units = _UNITS
    if s.endswith("ib") and len(s) > 2 and s[-3] in "kmgtp":
        s = s[:-2]
    elif s.endswith("b") and len(s) > 1 and s[-2] in "kmgtp":
        s = s[:-1]
        units = _DECIMAL
    elif s.endswith("b") and len(s) > 1 and s[-2].isdigit():
        s = s[:-1]          # '512B': bytes
    unit = s[-1:] if s[-1:] and s[-1:] in units else ""
    number = s[: len(s) - len(unit)]
    try:
        value = float(number) if "." in number else int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "not a size: %r (a number of bytes, or with K, M, G, T: binary, "
            "1M = 1 MiB = 1048576; kB, MB, GB: decimal, 1MB = 1000000)" % text) from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError("size must not be negative: %r" % text)
    return int(value * units[unit])


def human(n: float, digits: int = 1) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%.0f %s" % (n, unit)) if unit == "B" else \
                ("%.*f %s" % (digits, n, unit))
        n /= 1024
    raise AssertionError("unreachable")


def short(n: int, suffix: str = "") -> str:
    """An exact binary size in few letters: 64 MiB -> '64M' (or '64MiB' with
    suffix='iB'), 1.5 MiB -> '1536K'."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return "%d%s%s" % (n >> shift, unit, suffix)
    return "%d%s" % (n, "B" if suffix else "")
