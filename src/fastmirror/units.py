"""Sizes as people type and read them: '64K', '1.5G', '16 MiB'."""

from __future__ import annotations

import argparse

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """'65536', '64K', '64KiB', '1.5G', '16MB' (binary units) -> bytes.
    Raises argparse.ArgumentTypeError (a ValueError) on anything else."""
    s = str(text).strip().lower()
    for suffix in ("ib", "b"):
        if s.endswith(suffix) and len(s) > len(suffix) and s[-len(suffix) - 1] in "kmgtp":
            s = s[: -len(suffix)]
            break
    unit = s[-1:] if s[-1:] and s[-1:] in _UNITS else ""
    number = s[: len(s) - len(unit)]
    try:
        value = float(number) if "." in number else int(number)
    except ValueError:
        raise argparse.ArgumentTypeError("not a size: %r" % text) from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError("size must not be negative: %r" % text)
    return int(value * _UNITS[unit])


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
