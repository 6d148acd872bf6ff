"""Atomic file system steps: file writes (a temp file in the target's directory, then ``os.replace``), folder
renames that never replace what is there, folder exchange, a folder lock, and signals held back around them."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a partial one."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:  # a file sits where a folder of the path should be
        raise NotADirectoryError(errno.ENOTDIR, "a file is where a folder is needed", str(target.parent)) from error
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
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
    parking = Path(tempfile.mkdtemp(prefix=f".{b.name}.old-", dir=b.parent)) / b.name
    os.rename(b, parking)
    try:
        os.rename(a, b)
    except BaseException:
        os.rename(parking, b)
        parking.parent.rmdir()
        raise
    os.rename(parking, a)
    parking.parent.rmdir()


@contextlib.contextmanager
def locked_folder(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (the folder itself: no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
