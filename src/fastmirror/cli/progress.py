"""The progress line that `fastmirror mirror` and the demo draw on stderr."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

from fastmirror.units import human

BAR_MAX = 30        # columns of the bar itself when the terminal is wide
BAR_MIN = 8         # narrower than this, the bar is left out


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "--:--"
    s = int(s + 0.5)
    return "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60) if s >= 3600 else \
        "%d:%02d" % (s // 60, s % 60)


def columns(stream) -> int:
    """The width of the terminal that `stream` writes to: $COLUMNS when set
    (as shutil.get_terminal_size honours it), else the stream's own
    terminal, else 80."""
    try:
        env = int(os.environ.get("COLUMNS", ""))
        if env > 0:
            return env
    except ValueError:
        pass
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return shutil.get_terminal_size((80, 24)).columns


def progress_text(st) -> tuple[Optional[float], str]:
    """(fraction done or None, the words after the bar) for a JobStatus.

    The fraction is over the data to copy, not over the disk's size: the
    holes of a sparse source are not copied, so counting them would start
    the bar at the share of holes.  Copies again (a write dirtied a chunk)
    add to the work, so the total is what was copied plus what is left."""
    word = {"paused": "paused", "standby": "paused", "draining": "completing",
            "concluded": "ended"}.get(st.state, "copying")
    if st.ready:
        return 1.0, "%s in sync, %s" % (human(st.len), "done" if word == "ended" else
                                         word if word != "copying" else "ready")
    if st.bytes_copied == 0 and st.dirty_bytes >= st.len and st.len:
        # Nothing copied yet and the extents not known: no figure is true yet.
        return None, "%s, %s" % (human(st.len), "scanning" if word == "copying" else word)
    total = st.bytes_copied + st.dirty_bytes
    frac = st.bytes_copied / total if total else 1.0
    rate = "%s/s" % human(st.copy_rate) if st.copy_rate > 0 else "--/s"
    return frac, "%5.1f%% %s of %s %s ETA %s %s" % (
        100 * frac, human(st.bytes_copied), human(total), rate, _duration(st.eta), word)


class Progress:
    """A one-line progress bar on stderr, redrawn in place, never wider
    than the terminal (a line that wraps cannot be redrawn with '\\r')."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.last = ""
        self.bar = BAR_MAX      # only shrinks: a bar that changes width jitters

    def draw(self, st) -> None:
        # One column short of the width: a terminal that wraps at the last
        # column would move the cursor to the next line.
        room = max(1, columns(self.stream) - 1)
        frac, text = progress_text(st)
        width = min(self.bar, room - len(text) - 3)
        if width >= BAR_MIN:
            self.bar = width
        if width >= BAR_MIN:
            if frac is None:
                bar = "[%s]" % ("." * width)
            else:
                filled = int(frac * width)
                bar = "[%s%s]" % ("#" * filled, "-" * (width - filled))
            line = bar + " " + text
        else:
            line = text[:room]
        pad = " " * max(0, min(len(self.last), room) - len(line))
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self.last = line

    def close(self) -> None:
        if self.last:
            self.stream.write("\n")
            self.stream.flush()
