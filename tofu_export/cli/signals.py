"""SIGINT / SIGTERM / SIGHUP in the command line: a quiet exit outside a command, an exception inside one, and
never an exception inside an import.

- Before a command starts (imports, argument parsing) and after it ended, a signal ends the process at once:
  one line on stderr, exit 128 + signum. Nothing has been written, so there is nothing to clean up.
- While a command runs, a signal raises (``KeyboardInterrupt``; ``Terminated`` for SIGTERM and SIGHUP), so every
  ``finally`` and staging cleanup runs on the way out.
- The console script ends without the interpreter's teardown (``finish``): the teardown restores the default
  actions, and a signal arriving then (a late Ctrl-C, or one that waited for an import) killed the process with no
  message.
- A signal that arrives while a module is being imported waits until the import ends. An exception raised
  inside an extension module's initialisation leaves it half made: torch turns it into a warning and a later
  ``import numpy`` fails ("cannot load module more than once per process"), or its C++ aborts the process. A
  second signal while the first waits ends the process at once.
- A signal the process was started with ignored stays ignored (``nohup`` ignores SIGHUP; a shell's background job,
  SIGINT): the others are handled as above. SIGTERM, ``kill``'s default, still cleans up under ``nohup ... &``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from types import FrameType

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# read when this module is first imported, i.e. as the console script starts, before any handler is installed
IGNORED_AT_START = frozenset(signum for signum in SIGNALS if signal.getsignal(signum) is signal.SIG_IGN)
HANDLED = tuple(signum for signum in SIGNALS if signum not in IGNORED_AT_START)
_IMPORT_MACHINERY = "<frozen importlib._bootstrap"


def describe(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def exit_quietly(signum: int, _frame: FrameType | None = None) -> None:
    """Leave now with 128 + signum: one line on stderr, no traceback, no cleanup left to interrupt."""
    try:
        sys.stderr.write(f"\nerror: {describe(signum)}\n")
        sys.stderr.flush()
    except Exception:  # stderr closed: exit all the same
        pass
    os._exit(128 + signum)


def flush_and_exit(code: int) -> None:
    """Leave without the interpreter's shutdown (which restores the default actions: a signal there would kill
    the process mid-exit), after flushing what was printed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream: exit all the same
            stream.flush()
    os._exit(code)


def finish(code: int) -> None:
    """End the console script with ``code``: signals exit quietly from here on, the ``atexit`` handlers run
    (temporary folders are removed), the streams are flushed, and the interpreter's teardown is skipped."""
    exit_quietly_on_signals()
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    flush_and_exit(code)


def quiet_exit_installed() -> bool:
    """Whether the signals exit quietly now (the console script before its command starts, or after it ended)."""
    return any(signal.getsignal(signum) is exit_quietly for signum in HANDLED)


def exit_quietly_on_signals() -> None:
    """From now on the signals end the process at once (nothing to clean up, or cleanup is done)."""
    for signum in HANDLED:
        signal.signal(signum, exit_quietly)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every ``finally`` and staging cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Waiting:
    """The one signal that waits for an import to end, and whether the signal now arriving is its redelivery."""

    signum: int | None = None
    redelivered = False


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an import (the import machinery is on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(_IMPORT_MACHINERY):
            return True
        frame = frame.f_back
    return False


def _redeliver_after_import(signum: int) -> None:
    """Watch the main thread; once it is out of the import, send it the signal again."""
    main = threading.main_thread().ident
    while _importing(sys._current_frames().get(main)):  # type: ignore[arg-type]
        time.sleep(0.01)
    _Waiting.redelivered = True
    signal.pthread_kill(main, signum)  # type: ignore[arg-type]


def _raise_signal(signum: int, frame: FrameType | None) -> None:
    if _Waiting.signum is not None and not _Waiting.redelivered:  # a second signal while the first waits
        exit_quietly(signum)
    _Waiting.redelivered = False
    if _importing(frame) and hasattr(signal, "pthread_kill"):  # (not on Windows: raise at once there)
        _Waiting.signum = signum
        threading.Thread(target=_redeliver_after_import, args=(signum,), name="signal-after-import",
                         daemon=True).start()
        return
    _Waiting.signum = None
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def raise_on_signals() -> None:
    """While a command runs: the signals raise (see the module's docstring), so its cleanup runs. This replaces
    the quiet exit ``tofu_export.cli`` installs for the import and argument-parsing phase."""
    for signum in HANDLED:
        signal.signal(signum, _raise_signal)


def second_signal_exits_quietly() -> None:
    """While the first signal is being reported, a second one ends the process quietly (entry point only)."""
    if any(signal.getsignal(signum) is _raise_signal for signum in HANDLED):
        exit_quietly_on_signals()
