"""The option framework the settings are declared in: `option` and `group` fields (their
metadata is what cli/options.py turns into command-line options), the checks their
`__post_init__` bounds use, and reading (`from_dict`, validated: a config file or run.json
may hold anything) and writing (`to_dict`) a config as plain data."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

from transferkit.errors import ConfigError


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_finite(config: Any) -> None:
    """Every number in a config is finite: inf or nan would pass a range check such as
    `> 0` and train to NaN."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number; "
                                  f"got {value}.")


def option(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002
           flag: str | None = None, short: str | None = None, panel: str | None = None,
           choices: tuple[str, ...] | str | None = None, argument: bool = False,
           metavar: str | None = None, advanced: bool | None = None,
           alias: str | None = None, named_by_group: bool = False) -> Any:
    """A config field that is also a command-line option: the CLI (options.py) declares it
    from here, so adding a setting is adding a field.

    Args:
        flag: the option's spelling when not `--field-name` (`--a/--no-a` for booleans).
        short: a one-letter alias, e.g. "-o".
        panel: the --help panel; a nested config's group panel otherwise.
        choices: the allowed values, or the name of a table the CLI knows ("bases").
        argument: a positional argument instead of an option.
        advanced: listed by --help-all only (None: as its group says).
        alias: an old spelling, still taken, with a warning that names the new one.
        named_by_group: the option takes its group's name (`--optimizer NAME`).
    """
    return field(default=default, metadata={
        "help": help, "flag": flag, "short": short, "panel": panel, "choices": choices,
        "argument": argument, "metavar": metavar, "advanced": advanced, "alias": alias,
        "named_by_group": named_by_group})


def group(factory: Any = dataclasses.MISSING, *, prefix: str = "", panel: str | None = None,
          enabled_by: str | None = None, advanced: bool = False) -> Any:
    """A nested config whose fields are the command's options too, spelled `--{prefix}name`.
    A field declared `named_by_group` takes the group's own name (`--optimizer`). With
    `enabled_by`, the group is optional (None) and built only when that option is given."""
    metadata = {"group": True, "prefix": prefix, "panel": panel, "enabled_by": enabled_by,
                "advanced": advanced}
    if enabled_by is not None:
        return field(default=None, metadata=metadata)
    if factory is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default_factory=factory, metadata=metadata)


T = TypeVar("T")


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """Turns a JSON/TOML value into the type a config field declares."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        if hint is Any or type(None) in args:
            return None
        raise ConfigError(f"Setting '{name}' must not be null.")
    if origin in (typing.Union, types.UnionType):
        return _coerce(next(a for a in args if a is not type(None)), value, name)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"Setting '{name}' must be a table of settings; got {value!r}.")
        return from_dict(hint, value, prefix=f"{name}.")
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"Setting '{name}' must be a path; got {value!r}.")
        return Path(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Setting '{name}' must be a list; got {value!r}.")
        inner = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(inner) != len(value):
            raise ConfigError(f"Setting '{name}' takes {len(inner)} values; got {value!r}.")
        return tuple(_coerce(h, v, name) for h, v in zip(inner, value, strict=True))
    return _scalar(hint, value, name)


def _scalar(hint: Any, value: Any, name: str) -> Any:
    """`value` as the bool, int, float or str that `hint` says, or a ConfigError: a config
    file or run.json may hold anything."""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, float, str) and (type(value) is not hint):
        kind = {bool: "true or false", int: "a whole number", float: "a number",
                str: "text"}[hint]
        raise ConfigError(f"Setting '{name}' must be {kind}; got {value!r}.")
    return value


def from_dict(cls: type[T], values: Mapping[str, Any], prefix: str = "",
              ready: Mapping[str, Any] | None = None) -> T:
    """Builds a config dataclass from plain data (run.json, a config file); validates it.
    `ready` holds fields already built (taken as they are).

    Raises:
        ConfigError: an unknown, missing or invalid setting.
    """
    ready = ready or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"Unknown setting{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + u for u in unknown)}.")
    hints = typing.get_type_hints(cls)
    coerced = {k: _coerce(hints[k], v, prefix + k) for k, v in values.items() if k not in ready}
    try:
        return cls(**coerced, **ready)
    except TypeError as exc:
        raise ConfigError(f"Incomplete settings for {cls.__name__}: {exc}.") from exc


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready view of a config (paths as strings, tuples as lists)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(config))
