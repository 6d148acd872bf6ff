"""Option groups: a set of flags declared once, shown under one heading in ``--help``, that builds one object.

A group is a dataclass whose fields are ``Annotated[type, typer.Option(...)]`` with defaults. A command names the
groups it takes as parameters typed by the group (``tofu: ToFuOptions``); ``@uses_groups`` puts every field of
those groups into the command's signature (so typer sees ordinary options) and hands the command one built group
instance per parameter. ``flag_for("img_size")`` gives the flag of a library setting, so error hints can name it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from typer.models import OptionInfo

F = TypeVar("F", bound=Callable[..., Any])
_FLAGS: dict[str, str] = {}  # library setting name -> its flag, filled as groups are declared


def option_group(panel: str) -> Callable[[type], type]:
    """Class decorator: make a dataclass group whose options appear under ``panel`` in ``--help``."""

    def decorate(cls: type) -> type:
        cls = dataclasses.dataclass(cls)
        cls.__panel__ = panel
        cls.__option_hints__ = typing.get_type_hints(cls, include_extras=True)  # resolved once: typer reads these
        for name, hint in cls.__option_hints__.items():
            info = _option_info(hint)
            if info is not None:
                info.rich_help_panel = panel
                flag = next((d for d in _decls(info) if d.startswith("--")), f"--{name.replace('_', '-')}")
                _FLAGS.setdefault(name, flag.split("/")[0])
        return cls

    return decorate


def _option_info(hint: Any) -> OptionInfo | None:
    if typing.get_origin(hint) is typing.Annotated:
        return next((m for m in hint.__metadata__ if isinstance(m, OptionInfo)), None)
    return None


def _decls(info: OptionInfo) -> tuple[str, ...]:
    decls = tuple(info.param_decls or ())
    if isinstance(info.default, str) and info.default.startswith("-"):
        decls = (info.default, *decls)  # Annotated style: the first flag sits in `default`
    return decls


def flag_for(setting: str) -> str:
    """The command-line flag of a library setting (``"img_size"`` -> ``"--img-size"``)."""
    return _FLAGS.get(setting, f"--{setting.replace('_', '-')}")


def uses_groups(fn: F) -> F:
    """Expand the command's group-typed parameters into their options, and build the groups on each call."""
    hints = typing.get_type_hints(fn, include_extras=True)
    signature = inspect.signature(fn)
    groups = {name: hints[name] for name in signature.parameters if dataclasses.is_dataclass(hints.get(name))}
    parameters = []
    for name, parameter in signature.parameters.items():
        if name not in groups:
            parameters.append(parameter.replace(annotation=hints.get(name, parameter.annotation)))
            continue
        group_hints = groups[name].__option_hints__
        for f in dataclasses.fields(groups[name]):
            parameters.append(inspect.Parameter(
                f"{name}__{f.name}", inspect.Parameter.KEYWORD_ONLY, annotation=group_hints[f.name], default=f.default,
            ))

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        for name, group in groups.items():
            fields = [f.name for f in dataclasses.fields(group)]
            kwargs[name] = group(**{f: kwargs.pop(f"{name}__{f}") for f in fields})
        return fn(*args, **kwargs)

    command.__signature__ = signature.replace(parameters=sorted(parameters, key=_positional_first))  # type: ignore[attr-defined]
    return typing.cast(F, command)


def argument_names(fn: Callable[..., Any]) -> frozenset[str]:
    """The command's positional arguments (``typer.Argument``: CHECKPOINT, DATA, SOURCE), which a hint names as
    themselves, not as a flag."""
    return frozenset(name for name, parameter in inspect.signature(fn).parameters.items()
                     if any(isinstance(extra, typer.models.ArgumentInfo)
                            for extra in typing.get_args(parameter.annotation)[1:]))


def _positional_first(parameter: inspect.Parameter) -> int:
    return 0 if parameter.kind is not inspect.Parameter.KEYWORD_ONLY else 1


__all__ = ["argument_names", "flag_for", "option_group", "typer", "uses_groups"]
