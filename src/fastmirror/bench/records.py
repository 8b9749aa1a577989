"""What `fastmirror bench` runs and what one run measured: the tools, a
Variant (one row of the report) and a Run (one timed run of a variant)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["TOOLS", "FIO_PARTS", "MIRRORS", "QEMU_COPY_MODES", "Variant", "Run"]

TOOLS = ("fastmirror", "qemu-mirror", "qemu-img", "dd", "fio")
FIO_PARTS = ("fio-read", "fio-write", "fio-rw", "fio-copy")
MIRRORS = ("fastmirror", "qemu-mirror")
QEMU_COPY_MODES = ("background", "write-blocking")
GB = 1e9
MB = 1e6
GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10


@dataclass(frozen=True)
class Variant:
    """One row of the report: a tool with its settings."""
    label: str
    tool: str                          # a TOOLS entry or a FIO_PARTS one
    buf_size: int = 16 << 20
    max_io: Optional[int] = None       # fastmirror: io_size (bytes per copy)
    copy_mode: Optional[str] = None    # writer rounds: the mirror's copy mode
    io_engine: str = "auto"            # fastmirror: MirrorJob's io_engine


@dataclass
class Run:
    tool: str                       # the variant's label
    round: int                      # 1-based; 0 for warm-up rounds
    warmup: bool
    bytes: int
    ok: bool = False
    wall_s: float = 0.0
    ready_s: Optional[float] = None  # mirrors: seconds to READY
    user_s: float = 0.0
    sys_s: float = 0.0
    returncode: Optional[int] = None
    error: Optional[str] = None
    command: Optional[list] = None
    detail: dict = field(default_factory=dict)
    # writer rounds
    writer_rate: Optional[str] = None      # the rate's label ("0", "50M", "max")
    copy_mode: Optional[str] = None        # the copy mode asked for
    converged: Optional[bool] = None       # READY reached within the writer timeout

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def gbps(self) -> float:
        return self.bytes_per_s / GB

    @property
    def mibps(self) -> float:
        return self.bytes_per_s / MiB

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.bytes / GiB) if self.bytes else 0.0

    @property
    def ready_gbps(self) -> Optional[float]:
        if self.ready_s is None or self.ready_s <= 0:
            return None
        return self.bytes / self.ready_s / GB

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(cpu_s=self.cpu_s, bytes_per_s=self.bytes_per_s, gbps=self.gbps,
                 mibps=self.mibps, cpu_s_per_gib=self.cpu_s_per_gib,
                 ready_gbps=self.ready_gbps)
        return d
