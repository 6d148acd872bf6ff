"""The ``tofu-export`` command line: a thin layer of option groups over one library function per command.

``app.py`` assembles the commands (one file each), ``options.py`` holds the option groups they share,
``errors.py`` maps every error to its exit code.

Signals (``signals.py``): this module is the first code the console script runs (the package's ``__init__``
imports nothing heavy), so it makes SIGINT / SIGTERM / SIGHUP exit at once and quietly (one line, no traceback)
while torch and the commands are imported and the arguments parsed, before anything is written. At the command's
boundary (``errors.guarded``) they become exceptions, so that the staging folders are removed on the way out.
"""

import gc
import os
import signal
import sys

from tofu_export.cli.signals import (
    SIGNALS,
    exit_quietly,
    exit_quietly_on_signals,
    finish,
    flush_and_exit,
    quiet_exit_installed,
)


def _is_entry_point() -> bool:
    """Whether this import is the command starting (console script, or ``python -m tofu_export.cli``)."""
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("tofu-export", "-m")


# Python's own SIGINT handler, or SIGINT ignored since the start (a background job, ``nohup ... &``): no host
# program installed its own, so the signals are this command's to handle.
_ENTRY_POINT = _is_entry_point() and signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_IGN)
if _ENTRY_POINT:
    exit_quietly_on_signals()  # before the heavy imports below (typer, rich, then torch in the commands)

from tofu_export.cli.app import app  # noqa: E402
from tofu_export.cli.app import main as _run  # noqa: E402


def fewer_collections() -> None:
    """The cyclic garbage collector's youngest generation collected every 50,000 allocations instead of Python's
    700: torch.export makes millions of short-lived objects, and an export of deit_small took 0.88-0.91 of the CPU
    it took with Python's settings, for 1-3% more peak memory (``bench/results/gc_threshold.md``; ViT-L/16: the
    same CPU and peak, its time going elsewhere). Set only when this process is the command, never on import."""
    gc.set_threshold(50_000, 20, 10)


def main() -> None:
    """The console script's entry point: ``app.main`` (signals become exceptions while a command runs, so its
    cleanup runs), with a signal outside any command's boundary, or after it, ending quietly too."""
    if _ENTRY_POINT:
        fewer_collections()
    try:
        _run()
    except KeyboardInterrupt as interrupt:  # during argument parsing, outside the commands' error boundary
        exit_quietly_on_signals()
        exit_quietly(getattr(interrupt, "signum", signal.SIGINT))
    except SystemExit as done:
        if _ENTRY_POINT and (done.code is None or isinstance(done.code, int)):
            finish(done.code or 0)  # no interpreter teardown, where a signal would kill the process silently
        if done.code in {128 + signum for signum in SIGNALS}:  # a command stopped by a signal, cleanup done:
            exit_quietly_on_signals()
            flush_and_exit(done.code)
        raise
    finally:
        exit_quietly_on_signals()  # a signal during interpreter shutdown: no traceback either


__all__ = ["app", "exit_quietly_on_signals", "main", "quiet_exit_installed"]
