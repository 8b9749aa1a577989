"""The mirror job: its state table, control thread, policies and the handle
through which writers reach a disk that is being mirrored."""

from fastmirror.job.mirror import MirrorJob

__all__ = ["MirrorJob"]
