"""The NBD server: a disk served to VMs and tools, mirrored while served."""

from fastmirror.nbd.export import Export
from fastmirror.nbd.qmp import QMPServer

__all__ = ["Export", "QMPServer"]
