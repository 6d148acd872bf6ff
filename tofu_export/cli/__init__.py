"""The ``tofu-export`` command line: a thin layer of option groups over one library function per command.

``app.py`` assembles the commands (one file each), ``options.py`` holds the option groups they share,
``errors.py`` maps every error to its exit code.

Signals: this module is the first code the console script runs (the package's ``__init__`` imports nothing
heavy), so it makes SIGINT / SIGTERM / SIGHUP exit at once and quietly (one line, no traceback) while torch and
the commands are imported and the arguments parsed, before anything is written. At the command's boundary
(``errors.guarded``) they become exceptions, so that the staging folders are removed on the way out; a second
signal while the first is being handled exits quietly.
"""

import contextlib
import os
import signal
import sys

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _exit_quietly(signum: int, _frame: object) -> None:
    """Leave now with 128 + signum: one line on stderr, no traceback, no cleanup left to interrupt."""
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    try:
        sys.stderr.write(f"\nerror: {what}\n")
        sys.stderr.flush()
    except Exception:  # stderr closed: exit all the same
        pass
    os._exit(128 + signum)


def quiet_exit_installed() -> bool:
    """Whether the signals exit quietly now (the console script before its command starts, or after it ended)."""
    return signal.getsignal(signal.SIGTERM) is _exit_quietly


def exit_quietly_on_signals() -> None:
    """From now on SIGINT / SIGTERM / SIGHUP end the process at once (nothing to clean up, or cleanup is done)."""
    for signum in _SIGNALS:
        signal.signal(signum, _exit_quietly)


def _is_entry_point() -> bool:
    """Whether this import is the command starting (console script, or ``python -m tofu_export.cli``)."""
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("tofu-export", "-m")


if _is_entry_point() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    exit_quietly_on_signals()  # before the heavy imports below (typer, rich, then torch in the commands)

from tofu_export.cli.app import app  # noqa: E402
from tofu_export.cli.app import main as _run  # noqa: E402


def main() -> None:
    """The console script's entry point: ``app.main`` (signals become exceptions while a command runs, so its
    cleanup runs), with a signal outside any command's boundary, or after it, ending quietly too."""
    try:
        _run()
    except KeyboardInterrupt as interrupt:  # during argument parsing, outside the commands' error boundary
        exit_quietly_on_signals()
        _exit_quietly(getattr(interrupt, "signum", signal.SIGINT), None)
    except SystemExit as done:
        if done.code in {128 + signum for signum in _SIGNALS}:  # a command stopped by a signal, cleanup done:
            exit_quietly_on_signals()  # leave without the interpreter's shutdown, which restores the default
            _flush_and_exit(done.code)  # actions (a second signal there would kill the process mid-exit)
        raise
    finally:
        exit_quietly_on_signals()  # a signal during interpreter shutdown: no traceback either


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream: exit all the same
            stream.flush()
    os._exit(code)


__all__ = ["app", "exit_quietly_on_signals", "main", "quiet_exit_installed"]
