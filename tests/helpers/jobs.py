"""Running a MirrorJob the whole way; an export's state file left "stopped"."""

from __future__ import annotations

import fastmirror
from fastmirror import EventType
from fastmirror.job import state as _state
from helpers.files import make_image


def run_to_end(job, ready_timeout: float = 60):
    """Start `job`, complete it at READY, close it and its source: the last
    event (COMPLETED unless something went wrong)."""
    job.start()
    assert job.wait_ready(ready_timeout)
    job.complete()
    final = job.wait()
    job.source.close()
    job.close()
    return final


def stopped_export_state(tmp_path, size):
    """An export's mirror cancelled at READY: (source, target, state file),
    the file in phase "stopped"."""
    src = make_image(tmp_path / "src", size)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    with fastmirror.Export(src, socket=str(tmp_path / "s"), state=st) as e:
        job = e.mirror(dst)
        assert job.wait_ready(30)
        job.cancel(force=True)
        assert job.wait().type == EventType.CANCELLED
    assert _state.load(st).phase == "stopped"
    return src, dst, st
