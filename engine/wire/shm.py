"""POSIX shared-memory segments of the engine's rings and the private directory of its ipc sockets: create (the
owner), attach (a reader), unlink, sweep.

Every name starts with a per-engine prefix (`new_prefix()`): "omni2-<pid>-<start>-<random>-", where <pid> is the
engine process and <start> the time it started (clock ticks after boot). While an engine runs, the supervisor
`sweep(prefix)`s what one of its killed workers left; when a whole engine was killed (kill -9, out of memory), the
next engine's `sweep_dead()` finds its names, sees that no process with that pid and start time exists any more,
and removes them. The start time is what tells a dead engine from a live process that was given the same pid
later. Cleanup is ours alone (close, weakref.finalize, sweeps): Python's resource tracker is kept out of it, see
`create`.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import stat
import tempfile
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # segment and ipc names: no '/', nothing a shell or a path would mangle
ENGINE_TAG = "omni2"  # the tag of engine prefixes; tests and benchmarks use others, which no sweep_dead touches


def proc_stat(pid: int, tid: int | None = None) -> tuple[str, list[str]] | None:
    """(name, fields) of /proc/<pid>/stat, or of its thread `tid`; the fields follow the name: [0] is the state
    letter, [11]/[12] utime/stime, [19] the start time in clock ticks after boot. None if there is no such process
    or thread (or no /proc to ask)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    # The name is in parentheses and may itself hold spaces or ')'.
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot; None if it does not exist."""
    found = proc_stat(pid)
    return None if found is None else int(found[1][19])


def new_prefix(tag: str = ENGINE_TAG) -> str:
    """A prefix unique to one engine, e.g. "omni2-4242-57581-9f1c2a7b-"; every segment and ipc path of it starts
    so."""
    pid = os.getpid()
    return f"{tag}-{pid}-{process_start(pid) or 0}-{secrets.token_hex(4)}-"


def owner_alive(pid: int, start: int | None) -> bool:
    """Whether the engine that made a prefix with `pid` (and `start`, None for names without one) still runs.
    When in doubt (no /proc to ask), alive: a live engine's files are never removed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    found = proc_stat(pid)
    if found is None:
        return True
    fields = found[1]
    if fields[0] in "ZX":
        return False  # exited, not yet reaped by its parent: it will never use them again
    return start is None or start == 0 or int(fields[19]) == start


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


def make_ipc_dir(prefix: str, tmp_dir: str | None = None) -> str:
    """A new directory only this user can enter (mode 0700) for one engine's ipc socket files, named
    `<prefix>ipc` in the temp dir so that `sweep_dead` finds it if the engine dies."""
    if not NAME.fullmatch(prefix):
        raise ValueError(f"ipc dir prefix must be a plain name, got {prefix!r}")
    path = os.path.join(tmp_dir or tempfile.gettempdir(), prefix + "ipc")
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)  # mkdir's mode went through the umask
    return path


def remove_dir(path: str) -> None:
    """Remove an ipc dir and the socket files in it; gone already is fine."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in names:
        unlink(os.path.join(path, name))
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # something that is not ours was put there: leave it to a person
        log.warning("cannot remove %s: %s", path, e)


def sweep(prefix: str, ipc_dir: str | None = None) -> list[str]:
    """Unlink the segments in /dev/shm (and ipc socket files or dirs in `ipc_dir`, default the temp dir) whose
    names start with `prefix`: what a dead engine left, or a dead producer given `prefix + edge + "."`. Call it
    only for owners known to be dead. Returns the names removed."""
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
                _remove(os.path.join(d, name))
                removed.append(name)
    return removed


def sweep_dead(tag: str = ENGINE_TAG, tmp_dir: str | None = None) -> list[str]:
    """Remove what engines that no longer run left behind: their segments in /dev/shm, their ipc dirs (and the
    loose ipc files of older versions) in `tmp_dir` (default the temp dir). Only this user's entries named
    "<tag>-<pid>-[<start>-]<8 hex>-..." are looked at, and only those whose pid is gone, or now belongs to a
    process that started at another time, are removed. Returns the paths removed."""
    owner = re.compile(re.escape(tag) + r"-(\d+)-(?:(\d+)-)?[0-9a-f]{8}-")
    alive: dict[tuple[int, int | None], bool] = {}
    removed = []
    for d in (SHM_DIR, tmp_dir or tempfile.gettempdir()):
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in names:
            m = owner.match(name)
            if m is None:
                continue
            path = os.path.join(d, name)
            try:
                if os.lstat(path).st_uid != os.getuid():
                    continue
            except FileNotFoundError:
                continue  # its engine (or another sweep) removed it meanwhile
            key = (int(m[1]), None if m[2] is None else int(m[2]))
            if key not in alive:
                alive[key] = owner_alive(*key)
            if alive[key]:
                continue
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: str) -> None:
    try:
        is_dir = stat.S_ISDIR(os.lstat(path).st_mode)  # lstat: a link is removed, never followed
    except FileNotFoundError:
        return
    if is_dir:
        remove_dir(path)
    else:
        unlink(path)
