"""fastmirror: mirror a disk to a target while the source stays in use."""

from fastmirror import trace
from fastmirror._core.hbitmap import HBitmap
from fastmirror.job.events import (EventType, JobError, JobEvent, JobState, JobStateError,
                                   JobStatus)
from fastmirror.job.mirror import MirrorJob
from fastmirror.job.owners import ImageTargetError, InUseError
from fastmirror.job.source import BlockHandle
from fastmirror.nbd.export import Export

__version__ = "0.1.0"

__all__ = [
    "BlockHandle",
    "EventType",
    "Export",
    "HBitmap",
    "ImageTargetError",
    "InUseError",
    "JobError",
    "JobEvent",
    "JobState",
    "JobStateError",
    "JobStatus",
    "MirrorJob",
    "trace",
    "__version__",
]
