"""The one error boundary of the command line: every failure becomes a message and a documented exit code.

- 0 success; 1 a check failed; 2 bad input (the message says what and how to fix it); 3 the ONNX artifact was
  written but no TensorRT engine could be built here; 4 an internal error (a bug: rerun with ``--debug`` and report
  it); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM; SIGHUP: 129). Staging folders are removed either way.
- No Python traceback reaches the user unless ``--debug`` is given (or ``TOFU_EXPORT_DEBUG=1``).
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from tofu_export.cli.groups import argument_names, flag_for
from tofu_export.cli.output import print_line
from tofu_export.cli.signals import describe, quiet_exit_installed, raise_on_signals, second_signal_exits_quietly
from tofu_export.errors import Hint, ToFuError, exception_chain

EXIT_CHECK_FAILED, EXIT_USER_ERROR, EXIT_ENGINE_NOT_BUILT, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
F = TypeVar("F", bound=Callable[..., Any])
console = Console(stderr=True)


def _enter_command() -> None:
    """At the command's boundary in the console script, signals start raising (see ``cli.signals``). Before it,
    while click parses the arguments, they keep exiting at once with 128 + signum (there is nothing to clean up,
    and click would turn an exception into a silent exit 130). Elsewhere (a library caller, a test's CliRunner)
    the process's own handlers are left alone."""
    if quiet_exit_installed():
        raise_on_signals()


_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space and rerun",
    errno.EDQUOT: "the disk quota is exhausted: free space and rerun",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f) or the disk allows",
    errno.EACCES: "check the permissions of the path, or choose another one",
    errno.EPERM: "check the permissions of the path, or choose another one",
    errno.EROFS: "the file system is read-only: choose a path on a writable one",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "the path is a folder where a file is expected: pass the file",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and rerun",
}


def describe_os_error(error: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` -> ``No space left on device (x): the disk is full: ...``."""
    where = f" ({error.filename})" if error.filename else ""
    advice = _OS_ADVICE.get(error.errno or 0, "check the path, its permissions and free disk space")
    return f"{error.strerror or error}{where}: {advice}."


_OS_WORDS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
             "File too large": errno.EFBIG, "Read-only file system": errno.EROFS}


def os_error_within(error: BaseException) -> OSError | None:
    """The file-system error behind ``error``: one in its cause/context chain, or one a library only quoted in its
    message (protobuf, ONNX and torch rewrap a full disk as their own errors)."""
    for current in exception_chain(error):
        if isinstance(current, OSError) and current.errno in _OS_ADVICE:
            return current
    text = str(error)
    code = next((code for words, code in _OS_WORDS.items() if words in text), None)
    return None if code is None else OSError(code, os.strerror(code))


def debug_enabled() -> bool:
    return os.environ.get("TOFU_EXPORT_DEBUG", "") not in ("", "0")


def render_hint(hint: Hint, arguments: frozenset[str] = frozenset()) -> str:
    """``Hint("r", "8", "or less")`` -> ``"Use --r 8 or less."``; a hint on one of the command's positional
    ``arguments`` names it as it is typed: ``Hint("data", None, "a folder of images")`` -> ``"DATA: a folder of
    images."``"""
    if hint.option in arguments:
        words = " ".join(part for part in (f"{hint.option.upper()}:", hint.value, hint.text) if part)
    else:
        words = " ".join(part for part in ("Use", flag_for(hint.option), hint.value, hint.text) if part)
    if hint.alternative is not None:
        words = f"{words.rstrip('.')}, or {render_hint(hint.alternative, arguments).removeprefix('Use ')}"
    return words.rstrip(".") + "."


def render(error: ToFuError, arguments: frozenset[str] = frozenset()) -> str:
    """The message, with the hint's flag at the end of its first line (the one line that must say the fix);
    ``arguments``: the command's positional ones (``render_hint``)."""
    first, _, rest = str(error).partition("\n")
    if error.hint is not None:
        first = first.rstrip()
        hint = render_hint(error.hint, arguments)
        first = f"{first if first.endswith(('.', '!', '?', ':')) else first + '.'} {hint}"
    return f"{first}\n{rest}" if rest else first


def _print_error(message: str) -> None:
    print_line(console, message, label="[bold red]error:[/] ")


def guarded(fn: F) -> F:
    """Run a command inside the boundary: typed errors and environment errors become messages and exit codes."""
    arguments = argument_names(fn)

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            _enter_command()
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except ToFuError as error:
            if debug_enabled():
                raise
            _print_error(render(error, arguments))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as interrupt:
            second_signal_exits_quietly()
            if debug_enabled():
                raise
            signum = getattr(interrupt, "signum", signal.SIGINT)
            _print_error(f"{describe(signum)}; no partial output was left behind")
            raise typer.Exit(128 + signum) from None
        except BrokenPipeError:  # stdout closed early (`| head`): not an error of the command
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(128 + signal.SIGPIPE) from None
        except OSError as error:  # the file system said no: a path, a permission, a full disk
            if debug_enabled():
                raise
            _print_error(describe_os_error(error))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except MemoryError:
            if debug_enabled():
                raise
            _print_error("out of memory: use a smaller batch size or a smaller model, or free memory and rerun.")
            raise typer.Exit(EXIT_USER_ERROR) from None
        except Exception as error:
            if debug_enabled():
                raise
            cause = os_error_within(error)
            if cause is not None:
                _print_error(describe_os_error(cause))
                raise typer.Exit(EXIT_USER_ERROR) from None
            _print_error(f"internal error: {type(error).__name__}: {error}. This is a bug in tofu-export: rerun "
                         "with --debug for the traceback and report it.")
            raise typer.Exit(EXIT_INTERNAL) from None

    return command  # type: ignore[return-value]
