"""The one error boundary of the command line: every failure becomes a message and a documented exit code.

- 0 success; 1 a check failed; 2 bad input (the message says what and how to fix it); 3 the ONNX artifact was
  written but no TensorRT engine could be built here; 4 an internal error (a bug: rerun with ``--debug`` and report
  it); 130 interrupted.
- No Python traceback reaches the user unless ``--debug`` is given (or ``TOFU_EXPORT_DEBUG=1``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from tofu_export.cli.groups import flag_for
from tofu_export.errors import Hint, ToFuError

EXIT_CHECK_FAILED, EXIT_USER_ERROR, EXIT_ENGINE_NOT_BUILT, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
F = TypeVar("F", bound=Callable[..., Any])
console = Console(stderr=True)


def debug_enabled() -> bool:
    return os.environ.get("TOFU_EXPORT_DEBUG", "") not in ("", "0")


def render_hint(hint: Hint) -> str:
    """``Hint("r", "8", "or less")`` -> ``"Use --r 8 or less."``"""
    words = " ".join(part for part in ("Use", flag_for(hint.option), hint.value, hint.text) if part)
    return words.rstrip(".") + "."


def render(error: ToFuError) -> str:
    """The message, with the hint's flag at the end of its first line (the one line that must say the fix)."""
    first, _, rest = str(error).partition("\n")
    if error.hint is not None:
        first = f"{first.rstrip()} {render_hint(error.hint)}"
    return f"{first}\n{rest}" if rest else first


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def _print_error(message: str) -> None:
    console.print("[bold red]error:[/] ", end="", highlight=False)
    console.print(message, highlight=False, soft_wrap=True, markup=False)


def guarded(fn: F) -> F:
    """Run a command inside the boundary: typed errors and environment errors become messages and exit codes."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except ToFuError as error:
            if debug_enabled():
                raise
            _print_error(render(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            _print_error("interrupted; nothing was left half-written")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as error:  # the file system said no: a path, a permission, a full disk
            if debug_enabled():
                raise
            where = f" ({error.filename})" if error.filename else ""
            _print_error(f"{error.strerror or error}{where}. Check the path and its permissions, and free disk space.")
            raise typer.Exit(EXIT_USER_ERROR) from None
        except Exception as error:
            if debug_enabled():
                raise
            _print_error(f"internal error: {type(error).__name__}: {error}. This is a bug in tofu-export: rerun "
                         "with --debug for the traceback and report it.")
            raise typer.Exit(EXIT_INTERNAL) from None

    return command  # type: ignore[return-value]
