"""The NBD server: a disk served to VMs and tools, mirrored while served."""

from fastmirror.nbd.export import Export

__all__ = ["Export"]
