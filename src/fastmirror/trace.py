"""Tracepoints: the mirror job's trace events, named and shaped as QEMU's.

Every event is declared once below (name, argument names, QEMU's log format).
`connect(name, fn)` calls fn(*args) in the declared order each time the event
fires; `enable("mirror_*")` prints matching events in QEMU's format.  When
nobody listens an event costs one dict lookup in the job's control thread and
nothing at all in the copy loop: the engine only takes the GIL per chunk when
a listener for mirror_one_iteration or mirror_iteration_done exists.

Sector arguments are in 512-byte units, as in QEMU.  Pointer arguments ("%p")
print the object's id.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
import threading
import time
from typing import Callable, TextIO

__all__ = ["EVENTS", "FORMATS", "connect", "disconnect", "enable", "disable",
           "is_active", "emit", "listeners"]

_log = logging.getLogger("fastmirror")

# name -> (argument names, QEMU's format string with %p/%d/PRId64 as %s)
_DECLARATIONS = {
    # The seed: the commit that introduced the mirror job.
    "mirror_start": (("bs", "s", "co", "opaque"), "bs %p s %p co %p opaque %p"),
    "mirror_before_flush": (("s",), "s %p"),
    "mirror_before_drain": (("s", "cnt"), "s %p dirty count %d"),
    "mirror_before_sleep": (("s", "cnt", "synced"), "s %p dirty count %d synced %d"),
    "mirror_one_iteration": (("s", "sector_num", "nb_sectors"),
                             "s %p sector_num %d nb_sectors %d"),
    # Added to QEMU later; it helps to follow the copy loop.  (QEMU also has
    # mirror_yield and mirror_restart_iter; the engine has no coroutine that
    # yields, and its sweep is not an iterator the job restarts, so they are
    # not declared: a tracepoint that never fires would only mislead.)
    "mirror_iteration_done": (("s", "offset", "bytes", "ret"),
                              "s %p offset %d bytes %d ret %d"),
}

EVENTS: dict[str, tuple[str, ...]] = {k: v[0] for k, v in _DECLARATIONS.items()}
FORMATS: dict[str, str] = {k: v[1] for k, v in _DECLARATIONS.items()}

# name -> tuple of listeners.  Tuples are replaced, never mutated, so emit()
# reads a consistent snapshot without a lock from any thread.
_listeners: dict[str, tuple[Callable[..., object], ...]] = {k: () for k in EVENTS}
_lock = threading.Lock()
_watchers: list[Callable[[], None]] = []   # jobs re-reading engine tracepoints
_printers: dict[str, Callable[..., None]] = {}


def _check(name: str) -> None:
    if name not in EVENTS:
        raise ValueError("unknown trace event %r; known: %s" % (name, ", ".join(EVENTS)))


def _changed() -> None:
    for w in list(_watchers):
        try:
            w()
        except Exception:  # a closed job; never let it break connect()
            _log.debug("trace watcher failed", exc_info=True)


def connect(name: str, fn: Callable[..., object]) -> None:
    """Call fn(*args) whenever event `name` fires."""
    _check(name)
    if not callable(fn):
        raise TypeError("listener must be callable")
    with _lock:
        _listeners[name] = _listeners[name] + (fn,)
    _changed()


def disconnect(name: str, fn: Callable[..., object]) -> None:
    """Remove one registration of fn from event `name`."""
    _check(name)
    with _lock:
        current = list(_listeners[name])
        try:
            current.remove(fn)
        except ValueError:
            raise ValueError("%r is not connected to %s" % (fn, name)) from None
        _listeners[name] = tuple(current)
    _changed()


def listeners(name: str) -> tuple[Callable[..., object], ...]:
    return _listeners[name]


def is_active(name: str) -> bool:
    return bool(_listeners[name])


def emit(name: str, *args: object) -> None:
    """Fire an event.  A listener that raises is logged and skipped: tracing
    never breaks a job."""
    for fn in _listeners[name]:
        try:
            fn(*args)
        except Exception:
            _log.exception("tracepoint %s listener %r raised", name, fn)


def format_event(name: str, args: tuple) -> str:
    fmt = FORMATS[name]
    out = []
    it = iter(args)
    parts = fmt.split("%")
    out.append(parts[0])
    for part in parts[1:]:
        spec, rest = part[0], part[1:]
        value = next(it)
        if spec == "p":
            out.append("%#x" % id(value) if value is not None else "(nil)")
        else:
            out.append("%d" % int(value))
        out.append(rest)
    return "".join(out)


def enable(pattern: str = "mirror_*", file: TextIO | None = None) -> list[str]:
    """Print events whose names match the glob `pattern` as QEMU's log backend
    does ("pid@seconds:name args").  Returns the names enabled."""
    matched = [n for n in EVENTS if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        raise ValueError("no trace event matches %r" % pattern)
    for name in matched:
        if name in _printers:
            continue

        def printer(*args, _name=name):
            out = file if file is not None else sys.stderr
            out.write("%d@%.6f:%s %s\n" % (os.getpid(), time.time(), _name,
                                           format_event(_name, args)))
        _printers[name] = printer
        connect(name, printer)
    return matched


def disable(pattern: str = "*") -> list[str]:
    """Stop printing events matching `pattern` (listeners stay connected)."""
    removed = []
    for name in list(_printers):
        if fnmatch.fnmatchcase(name, pattern):
            disconnect(name, _printers.pop(name))
            removed.append(name)
    return removed


def _watch(fn: Callable[[], None]) -> None:
    with _lock:
        _watchers.append(fn)


def _unwatch(fn: Callable[[], None]) -> None:
    with _lock:
        try:
            _watchers.remove(fn)
        except ValueError:
            pass
