"""May tofu-export write here? One answer for every writer: a path is written only when it is new or holds a file
tofu-export wrote (recognised by its content), never through a link or into a special file, never onto an input.

- ``check_file_outputs([FileOutput(path, recogniser, what), ...], inputs=...)``: the files one command writes
  (a policy and its plot, a report and its JSON). Refused: a folder, a link, a FIFO / device / socket, an existing
  file the recogniser does not claim, two outputs at one path (``-o result.png`` for a policy whose plot is
  ``result.png``), an output that is one of the inputs, a folder above that cannot be made.
- ``check_output_folder(folder, ours)``: a folder a command adds files to (a sweep): new, empty, or ours.
- ``check_new_path(path, what)``: an output made whole and moved into place (a tuned model's folder): new only.
- ``check_not_an_input(out, inputs)``: an output that equals or contains an input is refused.

The recognisers read at most ``_SNIFF_BYTES`` of a file and never follow special files.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tofu_export.errors import Hint, UserError

Recogniser = Callable[[Path], bool]
_SNIFF_BYTES = 1 << 20
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_SOFTWARE = "tofu-export"  # the PNG ``Software`` text chunk tofu-export's plots carry


class OutputPathError(UserError):
    """An output path tofu-export cannot or must not write: a file, a link, a folder it did not write, no access."""


@dataclass(frozen=True)
class FileOutput:
    """One file a command writes: its path, how to recognise an earlier one tofu-export wrote, and its name."""

    path: Path
    ours: Recogniser
    what: str  # "policy", "profile report": how the message names it
    option: str = "out"  # the setting that chose the path (for the hint)


def _head(path: Path) -> bytes | None:
    """The first bytes of a regular file (None for anything else or an unreadable file)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        with open(path, "rb") as handle:
            return handle.read(_SNIFF_BYTES)
    except OSError:
        return None


def _json(path: Path) -> object:
    head = _head(path)
    try:
        return None if head is None or len(head) >= _SNIFF_BYTES else json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def is_policy_file(path: Path) -> bool:
    """A policy.json tofu-export calibrate wrote (its ``format`` record)."""
    data = _json(path)
    return isinstance(data, dict) and data.get("format") == "tofu-export/policy"


def is_dense_policy_file(path: Path) -> bool:
    """A denoiser policy tofu-export calibrate-denoiser wrote (its ``kind`` record)."""
    data = _json(path)
    return isinstance(data, dict) and data.get("kind") == "tofu-dense-policy"


def is_profile_markdown(path: Path) -> bool:
    """A profile report (``--report``): a Markdown file headed ``# Latency profile`` with the latency table."""
    head = _head(path) or b""
    return head.startswith(b"# Latency profile") and b"| backend | batch |" in head


def is_profile_json(path: Path) -> bool:
    """The JSON beside a profile report: a list of profile results (``backend`` and ``batches`` in each)."""
    data = _json(path)
    return isinstance(data, list) and bool(data) and all(
        isinstance(item, dict) and {"backend", "batches"} <= item.keys() for item in data)


def is_tofu_png(path: Path) -> bool:
    """A PNG whose ``Software`` text chunk says tofu-export (the plots tofu-export writes carry it)."""
    head = _head(path) or b""
    return head.startswith(_PNG_MAGIC) and b"Software\x00" + PNG_SOFTWARE.encode() in head[:4096]


_SWEEP_NAMES = {"artifacts", "sweep_state.json", "sweep.md", "sweep.json", "latency_vs_r.png", "pareto.png"}


def is_sweep_folder(folder: Path) -> bool:
    """A folder a sweep made: only the names a sweep writes (its state, reports, plots, artifact cache, a timm
    name's random weights, hidden work files), a regular ``sweep_state.json`` or an artifact cache among them.
    (A damaged state file is then reported by the sweep itself, by name.)"""
    try:
        names = {entry.name for entry in os.scandir(folder)}
        cached = list(os.scandir(folder / "artifacts")) if "artifacts" in names else []
        state_ok = "sweep_state.json" not in names or stat.S_ISREG(os.lstat(folder / "sweep_state.json").st_mode)
    except OSError:
        return False
    known = all(name in _SWEEP_NAMES or name.endswith(".random.safetensors") or name.startswith(".")
                for name in names)
    return (known and state_ok and bool(names & {"sweep_state.json", "artifacts"})
            and all(entry.name.startswith(".") or (Path(entry.path) / "manifest.json").is_file() for entry in cached))


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def check_parent(path: Path, option: str = "out") -> None:
    """The nearest existing folder above ``path`` must be a writable folder (so ``path`` can be made)."""
    hint = Hint(option, None, "with a path in a writable folder")
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if parent.is_symlink() and not parent.exists():
        raise OutputPathError(f"cannot create {path}: {parent} is a broken symbolic link", hint=hint)
    if not parent.is_dir():
        raise OutputPathError(f"cannot create {path}: {parent} is a file, not a folder", hint=hint)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create {path}: no permission to write in {parent} (read-only)", hint=hint)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _inside(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` lies in the folder ``outer`` (links resolved)."""
    inner_real, outer_real = os.path.realpath(inner), os.path.realpath(outer)
    return inner_real.startswith(outer_real.rstrip(os.sep) + os.sep)


def check_not_an_input(out: Path, inputs: Sequence[str | Path], option: str = "out") -> None:
    """Refuse an output that is one of ``inputs`` or a folder holding one (replacing it would destroy the input)."""
    for source in inputs:
        source = Path(source)
        if not os.path.lexists(source):
            continue
        if _same(out, source) or _inside(source, out):
            how = "is" if _same(out, source) else "contains"
            raise OutputPathError(f"the output {out} {how} the input {source}; writing it would destroy the input",
                                  hint=Hint(option, None, "with a path apart from the inputs"))


def check_file_outputs(outputs: Sequence[FileOutput], *, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any work, every output in ``outputs`` that may not be written (see the module docstring)."""
    seen: dict[str, FileOutput] = {}
    for output in outputs:
        key = os.path.abspath(output.path)
        if key in seen:
            raise OutputPathError(
                f"{output.path} would be both the {seen[key].what} and the {output.what}; one would overwrite the "
                "other", hint=Hint(output.option, None, f"with a path whose suffix is not {output.path.suffix}"))
        seen[key] = output
    for output in outputs:
        _check_file_output(output)
        check_not_an_input(output.path, inputs, output.option)


def _check_file_output(output: FileOutput) -> None:
    path, hint = output.path, Hint(output.option, None, "with a new file path")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        check_parent(path, output.option)
        return
    except OSError as error:  # ENOTDIR: a file where a folder of the path should be
        check_parent(path, output.option)
        raise OutputPathError(f"cannot write {path}: {error.strerror}", hint=hint) from error
    kind = _kind(mode)
    if kind is not None:
        raise OutputPathError(f"the {output.what} path {path} is {kind}; tofu-export writes only regular files it "
                              "made itself", hint=hint)
    if not output.ours(path):
        raise OutputPathError(f"{path} exists and is not a tofu-export {output.what} (it was not written by "
                              "tofu-export), so it is left alone", hint=hint)
    check_parent(path, output.option)


def check_new_path(path: Path, what: str, inputs: Sequence[str | Path] = (), option: str = "out") -> None:
    """An output made whole and moved into place, never added to or replaced: nothing may be at ``path``."""
    if os.path.lexists(path):
        raise OutputPathError(f"{path} exists; the {what} is written as a new path and nothing is replaced",
                              hint=Hint(option, None, "with a new path"))
    check_parent(path, option)
    check_not_an_input(path, inputs, option)


def check_output_folder(folder: Path, ours: Recogniser, *, what: str, option: str = "out") -> None:
    """A folder a command adds files to: it must be new, empty, or one ``ours`` recognises; never a link or a file.
    (Nothing in it is deleted, so an input inside it is safe.)"""
    hint = Hint(option, None, "with a new folder")
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        check_parent(folder, option)
        return
    except OSError as error:
        check_parent(folder, option)
        raise OutputPathError(f"cannot write {folder}: {error.strerror}", hint=hint) from error
    if not stat.S_ISDIR(mode):
        raise OutputPathError(f"the {what} folder {folder} is {_kind(mode) or 'a file'}, not a folder; tofu-export "
                              "never replaces it", hint=hint)
    with os.scandir(folder) as entries:  # closed here, not left to the collector (a ResourceWarning otherwise)
        empty = not any(entries)
    if not empty and not ours(folder):
        raise OutputPathError(f"{folder} already exists, is not empty and was not made by tofu-export (it is not a "
                              f"{what} folder), so nothing is written into it", hint=hint)
    check_parent(folder / "x", option)
