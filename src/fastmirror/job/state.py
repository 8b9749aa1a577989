"""The state file of a resumable job: what a restarted job needs to go on.

MirrorJob(..., state=PATH) keeps PATH up to date (docs/design.md, "The
crash model"):

- the format version and a CRC-32 of everything before it;
- the job's options, the identity and size of both sides (device and inode
  numbers of a file, the device number of a block device, or the string of
  a target that is not a path, such as an NBD URI), the granularity;
- the phase: "mirroring", "ready", "pivoted" (the target is the disk now),
  "stopped" (cancelled or failed; writes after it are no longer tracked);
- the dirty bitmap to persist: every chunk whose copy on the target is not
  known to be flushed, plus every extent of the activity log;
- the activity log's extents and the run id that ties the sidecar PATH.al
  (written by the C write path, _core/actlog.pyx) to this file.

The file is replaced atomically: written to PATH.tmp, fsync'd, renamed over
PATH, and the folder fsync'd.  A reader sees the old file or the new one,
never a mix; the checksum catches the rest (a damaged disk, an edit).
"""

from __future__ import annotations

import json
import os
import stat
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Optional

from fastmirror._core.actlog import ALL_DIRTY, AL_MAGIC, AL_VERSION, RECORD_SIZE
from fastmirror._core.hbitmap import HBitmap

__all__ = ["StateError", "State", "identity", "load", "save", "read_activity_log",
           "PHASES", "AL_EXTENT", "AL_SLOTS", "PERSIST_INTERVAL"]

MAGIC = b"FMSTATE\n"
VERSION = 1
PHASES = ("mirroring", "ready", "pivoted", "stopped")
AL_EXTENT = 4 << 20         # bytes per activity log extent, as DRBD's 4 MiB
AL_SLOTS = 64               # extents kept active: 256 MiB of hot working set
PERSIST_INTERVAL = 1.0      # seconds between state files while the job runs
_HEAD = struct.Struct("<8sII")          # magic, version, header length
_BLEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")
# magic, version, crc, reserved, run id, seq, flags, shift, count (actlog.pyx)
_AL = struct.Struct("<4sIII16sQIII")


class StateError(ValueError):
    """A state file that cannot be used: damaged, of another version, or of
    another pair, size or granularity.  Nothing was written."""

    def __init__(self, path: str, why: str):
        super().__init__("state file %s: %s" % (path, why))
        self.path = path
        self.why = why


def identity(path_or_uri: str, fd: Optional[int], size: int) -> dict:
    """What names one side across restarts: a file by device and inode
    numbers, a block device by its device number (a node's inode can change
    after a reboot), anything that is not a path (fd None: an NBD URI) by
    its string.  `path` is kept to say which file, never compared."""
    if fd is None:
        return {"kind": "uri", "uri": path_or_uri, "size": size}
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return {"kind": "block", "rdev": st.st_rdev, "size": size,
                "path": os.path.abspath(path_or_uri)}
    return {"kind": "file", "dev": st.st_dev, "ino": st.st_ino, "size": size,
            "path": os.path.abspath(path_or_uri)}


def _same(a: dict, b: dict) -> bool:
    keys = {"file": ("dev", "ino"), "block": ("rdev",), "uri": ("uri",)}.get(a.get("kind"))
    return keys is not None and a.get("kind") == b.get("kind") and \
        all(a.get(k) == b.get(k) for k in keys)


def _describe(side: dict) -> str:
    if side.get("kind") == "uri":
        return side.get("uri", "?")
    if side.get("kind") == "block":
        return "%s (device %d:%d)" % (side.get("path"), os.major(side["rdev"]),
                                      os.minor(side["rdev"]))
    return "%s (device %s, inode %s)" % (side.get("path"), side.get("dev"), side.get("ino"))


@dataclass
class State:
    """One state file's content."""

    phase: str
    size: int
    granularity: int
    source: dict
    target: dict
    options: dict
    run_id: str                         # hex, 32 digits: names the sidecar's records
    bitmap: Optional[HBitmap] = None    # dirty chunks to copy on resume
    al_extent: int = AL_EXTENT
    al_extents: list = field(default_factory=list)
    al_seq: int = 0                     # the sidecar's last sequence number seen

    def check_pair(self, path: str, source: dict, target: dict, size: int,
                   granularity: int) -> None:
        """StateError unless this file belongs to this pair, size and
        granularity."""
        if not _same(self.source, source):
            raise StateError(path, "it is the state of a mirror of %s, not of %s"
                             % (_describe(self.source), _describe(source)))
        if not _same(self.target, target):
            raise StateError(path, "it is the state of a mirror onto %s, not onto %s"
                             % (_describe(self.target), _describe(target)))
        if self.size != size:
            raise StateError(path, "it is the state of a %d-byte source; %s has %d bytes"
                             % (self.size, source.get("path") or source.get("uri"), size))
        if self.granularity != granularity:
            raise StateError(path, "it was written with granularity %d, not %d (give "
                             "--granularity %d to resume it)"
                             % (self.granularity, granularity, self.granularity))

    def check_onward(self, path: str, source: dict) -> None:
        """For a file that says "pivoted": StateError unless the new mirror's
        source is that mirror's target (the disk now, mirrored onward)."""
        if not _same(self.target, source):
            raise StateError(path, "the mirror it records has completed: its target %s is "
                             "the disk now" % _describe(self.target))

    def encode(self) -> bytes:
        header = json.dumps({
            "phase": self.phase, "size": self.size, "granularity": self.granularity,
            "source": self.source, "target": self.target, "options": self.options,
            "run_id": self.run_id, "al_extent": self.al_extent,
            "al_extents": self.al_extents, "al_seq": self.al_seq,
        }, sort_keys=True).encode()
        bits = self.bitmap.to_bytes() if self.bitmap is not None else b""
        body = b"".join((_HEAD.pack(MAGIC, VERSION, len(header)), header,
                         _BLEN.pack(len(bits)), bits))
        return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes, path: str) -> State:
    """A State from a file's bytes; StateError for anything damaged."""
    if len(data) < _HEAD.size + _BLEN.size + _CRC.size or data[:8] != MAGIC:
        raise StateError(path, "not a fastmirror state file")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[:-_CRC.size]) != crc:
        raise StateError(path, "damaged (checksum mismatch)")
    _, version, hlen = _HEAD.unpack_from(data, 0)
    if version != VERSION:
        raise StateError(path, "format version %d; this fastmirror reads version %d"
                         % (version, VERSION))
    try:
        pos = _HEAD.size
        h = json.loads(data[pos:pos + hlen])
        pos += hlen
        (blen,) = _BLEN.unpack_from(data, pos)
        pos += _BLEN.size
        if pos + blen + _CRC.size != len(data):
            raise ValueError("length mismatch")
        bitmap = HBitmap.from_bytes(data[pos:pos + blen]) if blen else None
        st = State(phase=h["phase"], size=int(h["size"]), granularity=int(h["granularity"]),
                   source=dict(h["source"]), target=dict(h["target"]),
                   options=dict(h["options"]), run_id=str(h["run_id"]), bitmap=bitmap,
                   al_extent=int(h["al_extent"]), al_extents=[int(x) for x in h["al_extents"]],
                   al_seq=int(h["al_seq"]))
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise StateError(path, "damaged (%s)" % e) from None
    if st.phase not in PHASES:
        raise StateError(path, "unknown phase %r" % st.phase)
    if bitmap is not None and (bitmap.size != st.size or bitmap.granularity != st.granularity):
        raise StateError(path, "damaged (its bitmap does not match its size)")
    return st


def load(path: str) -> Optional[State]:
    """The state at `path`, or None when there is no file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return decode(data, path)


def save(path: str, state: State) -> None:
    """Replace `path` atomically and durably (see the module docstring)."""
    data = state.encode()
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    sync_folder(path)


def sync_folder(path: str) -> None:
    """fsync the folder holding `path`: a rename or a new file is durable
    only then."""
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def new_run_id() -> str:
    return uuid.uuid4().hex


def al_path(path: str) -> str:
    return path + ".al"


@dataclass
class ALRecord:
    seq: int
    flags: int
    shift: int
    extents: list

    @property
    def all_dirty(self) -> bool:
        return bool(self.flags & ALL_DIRTY)


def read_activity_log(path: str, run_id: str) -> Optional[ALRecord]:
    """The newest whole record of the sidecar at `path` that belongs to
    `run_id`, or None (no file, or no such record: then the state file
    alone says what to copy)."""
    try:
        with open(path, "rb") as f:
            data = f.read(2 * RECORD_SIZE)
    except FileNotFoundError:
        return None
    rid = bytes.fromhex(run_id)
    best: Optional[ALRecord] = None
    for pos in range(0, len(data) - RECORD_SIZE + 1, RECORD_SIZE):
        rec = data[pos:pos + RECORD_SIZE]
        magic, version, crc, _, r, seq, flags, shift, count = _AL.unpack_from(rec, 0)
        if magic != AL_MAGIC or version != AL_VERSION or r != rid:
            continue
        if zlib.crc32(rec[12:]) != crc or count > (RECORD_SIZE - 56) // 8:
            continue
        extents = list(struct.unpack_from("<%dQ" % count, rec, 56))
        if best is None or seq > best.seq:
            best = ALRecord(seq, flags, shift, extents)
    return best


def set_extents(bits: HBitmap, extents, extent_size: int) -> None:
    """Dirty every chunk of the given extents (clipped to the disk)."""
    for e in extents:
        off = e * extent_size
        if off < bits.size:
            bits.set(off, min(extent_size, bits.size - off))
