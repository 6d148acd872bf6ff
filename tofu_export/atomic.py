"""Atomic file system steps: file writes (a temp file in the target's directory, then ``os.replace``), folder
renames that never replace what is there, folder exchange, a bounded folder lock, signals held back around them,
and owner tags (``HOST-PID-START``) in hidden work files' names so a later run can prove them stale."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tofu_export.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def usual_permissions(path: str | Path) -> None:
    """Give a file that was created private (``mkstemp``, safetensors' writer: 0600) the permissions any new file
    gets here (0666 less the umask): weights and artifacts are meant to be shared."""
    os.chmod(path, 0o666 & ~_UMASK)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a partial one."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:  # a file sits where a folder of the path should be
        raise NotADirectoryError(errno.ENOTDIR, "a file is where a folder is needed", str(target.parent)) from error
    remove_stale(target.parent, f".{target.name}.", ".tmp")  # left by a killed earlier write
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{owner_tag()}-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        usual_permissions(tmp_name)  # mkstemp creates 0600
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Serialize ``data`` (indented, keys in insertion order) before touching the file system."""
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


# ----------------------------------------------------------------------------------------------------
# Folders: a rename that never replaces, an exchange, a lock, and signals held back around both
# ----------------------------------------------------------------------------------------------------

_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
_HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the C library or the file system does not offer it."""
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "renameat2", None)
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """Move ``src`` to ``dst``, failing with ``FileExistsError`` if anything is at ``dst`` (never replacing it)."""
    src, dst = Path(src), Path(dst)
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):  # fallback: a small window remains; callers hold ``locked_folder`` around it
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def exchange_folders(a: str | Path, b: str | Path) -> None:
    """Swap the folders ``a`` and ``b`` in one step where the system can (else in two renames, undone on failure)."""
    a, b = Path(a), Path(b)
    if _renameat2(a, b, _RENAME_EXCHANGE):
        return
    parking = Path(tempfile.mkdtemp(prefix=f".{b.name}.old-{owner_tag()}-", dir=b.parent)) / b.name
    os.rename(b, parking)
    try:
        os.rename(a, b)
    except BaseException:
        os.rename(parking, b)
        parking.parent.rmdir()
        raise
    os.rename(parking, a)
    parking.parent.rmdir()


LOCK_WAIT_S = 30.0  # how long a lock held by another process is waited for before giving up


class LockBusyError(UserError):
    """Another process holds the folder lock past the bounded wait; the message names it."""


def lock_holders(folder: str | Path) -> list[int]:
    """Pids holding a ``flock`` on ``folder`` (from ``/proc/locks``; empty where that cannot be read)."""
    try:
        info = os.stat(folder)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders = []
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted and fields[4].isdigit():
            holders.append(int(fields[4]))
    return holders


@contextlib.contextmanager
def locked_folder(folder: str | Path, *, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (the folder itself: no lock file is left behind).

    Waits at most ``wait_s`` for another holder (Ctrl-C works while waiting), then raises ``LockBusyError``
    naming the holder's pid."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holders = ", ".join(map(str, lock_holders(folder))) or "unknown"
                    raise LockBusyError(
                        f"another process (pid {holders}) has held the lock on {folder} for over {wait_s:.0f} s; "
                        "wait for it to finish (or stop it) and rerun") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ----------------------------------------------------------------------------------------------------
# Owner tags: hidden work files carry their process's pid and start time, so a later run can prove them stale
# ----------------------------------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, ``/proc/PID/stat`` field 22), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
    """``HOST-PID-START`` of this process: the part of a hidden work file's name that says who made it."""
    return f"{_host()}-{os.getpid()}-{_start_ticks(os.getpid()) or 0}"


_TAG = re.compile(r"^(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-")


def owner_is_dead(name_tail: str) -> bool:
    """Whether the owner named at the start of ``name_tail`` (``HOST-PID-START-...``) is provably gone: same host,
    and no process with that pid, or one started at another time (the pid was reused)."""
    match = _TAG.match(name_tail)
    if match is None or match["host"] != _host():
        return False
    start = _start_ticks(int(match["pid"]))
    return start is None or start != int(match["start"])


def remove_stale(folder: str | Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the entries of ``folder`` named ``PREFIX<owner tag>-...SUFFIX`` whose owner is provably dead (a run
    killed by SIGKILL or a power cut left them); returns what was removed. Anything else is left alone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(suffix)):
            continue
        if not owner_is_dead(entry.name[len(prefix):]):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    return removed
@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back (main thread only) so a few file system steps finish or do not start;
    a signal that arrives meanwhile is delivered when the block ends."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
