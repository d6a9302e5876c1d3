"""POSIX shared-memory segments of the engine's rings: create (the owner), attach (a reader), unlink, sweep.

Every name starts with a per-engine prefix (`new_prefix()`), so the supervisor can `sweep(prefix)` whatever a
killed process left in /dev/shm. Cleanup is ours alone (close, weakref.finalize, sweep): Python's resource
tracker is kept out of it, see `create`.
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import tempfile
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # segment and ipc names: no '/', nothing a shell or a path would mangle


def new_prefix(tag: str = "omni2") -> str:
    """A prefix unique to one engine, e.g. "omni2-4242-9f1c2a7b-"; every segment and ipc path of it starts so."""
    return f"{tag}-{os.getpid()}-{secrets.token_hex(4)}-"


def create(name: str, size: int) -> SharedMemory:
    """A new segment of `size` bytes; the caller owns it and must `unlink(name)` it."""
    seg = SharedMemory(name, create=True, size=size)
    # NOTE: Python < 3.13 registers every segment with the resource tracker, which then unlinks it when the
    # process tree's tracker exits and warns about segments we already removed; unregistering leaves one owner.
    resource_tracker.unregister("/" + name, "shared_memory")
    return seg


def attach(name: str, size: int) -> memoryview:
    """A writable view of the first `size` bytes of an existing segment.

    A plain mmap rather than SharedMemory: no resource-tracker registration, and no close() that fails while
    views exist. The mapping lives as long as the view or anything sliced from it (np.frombuffer keeps it)."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        have = os.fstat(fd).st_size
        if have < size:
            raise ValueError(f"segment {name!r} has {have} bytes, expected at least {size}")
        return memoryview(mmap.mmap(fd, size))
    finally:
        os.close(fd)


def unlink(path_or_name: str) -> None:
    """Remove a segment (a bare name) or an ipc socket file (a path); gone already is fine."""
    path = path_or_name if os.sep in path_or_name else os.path.join(SHM_DIR, path_or_name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # its owner or a sweep got there first


def sweep(prefix: str, ipc_dir: str | None = None) -> list[str]:
    """Unlink the segments in /dev/shm (and ipc socket files in `ipc_dir`, default the temp dir) whose names
    start with `prefix`: what a dead engine left, or a dead producer given `prefix + edge + "."`. Call it only
    for owners known to be dead. Returns the names removed."""
    if len(prefix) < 4 or not NAME.fullmatch(prefix):
        raise ValueError(f"refusing to sweep with prefix {prefix!r}: too short or not a plain name")
    removed = []
    for d in (SHM_DIR, ipc_dir or tempfile.gettempdir()):
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith(prefix):
                unlink(os.path.join(d, name))
                removed.append(name)
    return removed
