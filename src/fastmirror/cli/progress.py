"""The progress line that `fastmirror mirror` and the demo draw on stderr."""

from __future__ import annotations

import sys
from typing import Optional

from fastmirror.units import human


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "--:--"
    s = int(s + 0.5)
    return "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60) if s >= 3600 else \
        "%d:%02d" % (s // 60, s % 60)


class Progress:
    """A one-line progress bar on stderr, redrawn in place."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.width = 30
        self.last = ""

    def draw(self, st) -> None:
        frac = st.offset / st.len if st.len else 1.0
        filled = int(frac * self.width)
        phase = "ready" if st.ready else ("paused" if st.paused else "bulk")
        line = "[%s%s] %5.1f%% %s/%s %s/s ETA %s %s" % (
            "#" * filled, "-" * (self.width - filled), 100 * frac, human(st.offset),
            human(st.len), human(st.copy_rate), _duration(st.eta if not st.ready else 0),
            phase)
        pad = " " * max(0, len(self.last) - len(line))
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self.last = line

    def close(self) -> None:
        if self.last:
            self.stream.write("\n")
            self.stream.flush()
