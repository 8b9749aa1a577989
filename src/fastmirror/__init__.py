"""fastmirror: mirror a disk to a target while the source stays in use."""

from fastmirror._hbitmap import HBitmap

__version__ = "0.1.0"

__all__ = ["HBitmap", "__version__"]
