"""Command-line options generated from the config dataclasses (config.py), so a setting is
declared once: its field gives the option's name, type, default, help, choices and panel,
and its `__post_init__` the bounds. `--config FILE.toml` loads the same settings for any
command; options given on the command line win over the file, the file over the defaults.

Typer builds options from a function's signature; `configured` writes that signature from
the fields. Only cli.py uses this module.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from transferkit.config import OUTPUT, from_dict
from transferkit.errors import ConfigError

_FILE_SETTINGS = "transferkit.config_file"  # click context meta key


@dataclass(frozen=True)
class Leaf:
    """One option: where its value goes in the config tree (one path, or several for a
    shared option such as --overwrite), and how it is declared."""

    param: str  # Python name, also the key in a --config file
    paths: tuple[tuple[str, ...], ...]
    hint: Any
    default: Any  # dataclasses.MISSING: required
    meta: Mapping[str, Any]
    panel: str | None
    optional_group: tuple[str, ...] | None  # the `enabled_by` group it belongs to
    enables: bool = False  # it is that group's `enabled_by` option
    advanced: bool = False  # listed by --help-all only

    @property
    def flag(self) -> str:
        if self.meta.get("flag"):
            return self.meta["flag"]
        dashed = self.param.replace("_", "-")
        return f"--{dashed}/--no-{dashed}" if _unwrap(self.hint) is bool else f"--{dashed}"

    @property
    def option(self) -> str:
        """How messages name it: DATA for an argument, else its first spelling."""
        first = self.flag.split("/")[0]
        return (self.meta.get("metavar") or first) if self.meta.get("argument") else first

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def _unwrap(hint: Any) -> Any:
    """`X` for `X | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _walk(cls: type, path: tuple[str, ...], prefix: str, panel: str | None, defaults: Any,
          optional: tuple[str, ...] | None, group_name: str,
          enabled_by: str | None = None, advanced: bool = False) -> Iterator[Leaf]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("group"):
            inner = _unwrap(hints[f.name])
            instance = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                        else None)
            yield from _walk(inner, (*path, f.name), prefix + meta["prefix"],
                             meta["panel"] or panel, instance,
                             (*path, f.name) if meta["enabled_by"] else optional,
                             prefix + f.name, meta["enabled_by"],
                             advanced or meta["advanced"])
        elif "help" in meta:
            param = (group_name if meta.get("named_by_group") else
                     meta["flag"].split("/")[0].removeprefix("--").replace("-", "_")
                     if meta.get("flag") else prefix + f.name)
            default = getattr(defaults, f.name) if defaults is not None else f.default
            own = meta.get("advanced")
            yield Leaf(param, ((*path, f.name),), hints[f.name], default, meta,
                       meta["panel"] or panel, optional, f.name == enabled_by,
                       advanced if own is None else own)


def leaves(cls: type) -> list[Leaf]:
    """Every option of config `cls`, nested configs flattened; options of the same name
    (an --overwrite in two configs) become one that sets both."""
    merged: dict[str, Leaf] = {}
    for leaf in _walk(cls, (), "", None, None, None, ""):
        if leaf.param in merged:
            first = merged[leaf.param]
            leaf = dataclasses.replace(first, paths=first.paths + leaf.paths)
        merged[leaf.param] = leaf
    return list(merged.values())


def _declare(leaf: Leaf, optional: bool) -> inspect.Parameter:
    meta = leaf.meta
    hint = leaf.hint
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[-1] is Ellipsis:
        hint = list[typing.get_args(hint)[0]]  # a variadic argument
    choices = meta.get("choices")
    # help is shown with Rich markup on: "transferkit[onnx]" must not read as a style tag
    extra: dict[str, Any] = {"help": meta["help"].replace("[", "\\["),
                             "show_default": leaf.default not in (None, dataclasses.MISSING)}
    if isinstance(choices, str):  # a long table: checked by its owner, listed by a command
        extra["help"] += f" Choices: `transferkit {choices.split('+')[0]}`."
        extra["metavar"] = "NAME"
        choices = None
    if _unwrap(hint) is bool and not meta.get("argument"):
        extra["metavar"] = ""  # a flag takes no value
    if choices:  # a str Enum, which Typer lists in --help and checks
        hint = Enum(leaf.param, {c.replace("-", "_"): c for c in choices}, type=str)
        hint = hint | None if leaf.default is None else hint
    if meta.get("metavar"):
        extra["metavar"] = meta["metavar"]
    # a required setting is a required argument or option, unless the command may go
    # without it, or its group is optional (then its absence turns the group off)
    default = None if optional or leaf.enables else leaf.default
    if meta.get("argument"):
        declared = typer.Argument(**extra)
    else:
        names = [leaf.flag, *([meta["short"]] if meta.get("short") else [])]
        declared = typer.Option(*names, rich_help_panel=leaf.panel, hidden=leaf.advanced,
                                **extra)
    return inspect.Parameter(
        leaf.param, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[hint, declared],
        default=inspect.Parameter.empty if default is dataclasses.MISSING else default)


def _alias(leaf: Leaf) -> inspect.Parameter:
    """The old spelling of an option: hidden, taken, and warned about."""
    return inspect.Parameter(
        f"{leaf.param}__alias", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[leaf.hint | None, typer.Option(
            leaf.meta["alias"], hidden=True, show_default=False)])


def _read_config_file(ctx: typer.Context, param: typer.CallbackParam,
                      path: Path | None) -> None:
    """--config FILE.toml: read now (eagerly), applied when the command builds its config."""
    if path is None:
        return
    try:
        ctx.meta[_FILE_SETTINGS] = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise typer.BadParameter(f"cannot read '{path}': {exc}") from exc


def _show_all(ctx: typer.Context, param: typer.CallbackParam, value: bool) -> None:
    """--help-all: the help with every option, the advanced ones included."""
    if value:
        for option in ctx.command.params:
            option.hidden = False
        typer.echo(ctx.get_help())
        raise typer.Exit()


HELP_ALL = inspect.Parameter(
    "help_all", inspect.Parameter.KEYWORD_ONLY, default=False,
    annotation=Annotated[bool, typer.Option(
        "--help-all", help="Show every option, the advanced ones too, and exit.",
        callback=_show_all, is_eager=True, expose_value=False, metavar="")])

CONFIG_OPTION = inspect.Parameter(
    "config_file", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Path | None, typer.Option(
        "--config", help="TOML file of this command's settings: its option names as keys "
                         "(with _ or -), or tables as in a run's run.json. Options on the "
                         "command line override it.",
        callback=_read_config_file, is_eager=True, exists=True, dir_okay=False,
        rich_help_panel=OUTPUT, show_default=False)])


class _FlagHelp:
    """--help takes no value: shown without a type, like every other flag; and option names
    wrap instead of being cut short (set up when help is shown: Typer's rich_utils costs
    start-up time every other command would pay)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _fold_option_names()
        super().format_help(ctx, formatter)  # type: ignore[misc]


class Command(_FlagHelp, typer.core.TyperCommand):
    pass


class Group(_FlagHelp, typer.core.TyperGroup):
    pass


def reflow(text: str | None) -> str | None:
    """A docstring's paragraphs each on one line, so help wraps them at the terminal's width
    instead of breaking them where the source did."""
    if text is None:
        return None
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines())
                        for paragraph in inspect.cleandoc(text).split("\n\n"))


class _Folding:
    """Typer's highlighter of option names, whose text wraps at a narrow terminal instead of
    ending in '…' (Typer builds that table itself and offers no setting for it)."""

    def __init__(self, highlight: Any) -> None:
        self.highlight = highlight

    def __call__(self, text: Any) -> Any:
        highlighted = self.highlight(text)
        highlighted.overflow = "fold"
        return highlighted


def _fold_option_names() -> None:
    from typer import rich_utils

    for name in ("highlighter", "negative_highlighter"):
        found = getattr(rich_utils, name, None)
        if found is not None and not isinstance(found, _Folding):
            setattr(rich_utils, name, _Folding(found))


def polish_help(app: typer.Typer) -> None:
    """Every command of `app` with reflowed help, a --help without a type, and option names
    that are never cut short."""
    for info in app.registered_commands:
        info.cls = Command
        info.callback.__doc__ = reflow(info.callback.__doc__)  # type: ignore[union-attr]
    if app.registered_callback is not None and app.registered_callback.callback is not None:
        callback = app.registered_callback.callback
        callback.__doc__ = reflow(callback.__doc__)


def _file_values(settings: Mapping[str, Any], known: list[Leaf]) -> dict[str, Any]:
    """A --config file's settings as {option: value}; keys are option names or config paths
    (nested tables, as run.json writes them), with - or _. A path may leave out its outer
    tables where that is unambiguous: cv reads finetune's [optimizer] as its recipe's."""
    by_path: dict[str, str | None] = {}
    for leaf in known:
        for path in leaf.paths:
            for start in range(len(path)):
                key = ".".join(path[start:])
                by_path[key] = leaf.param if by_path.get(key, leaf.param) == leaf.param \
                    else None  # two options end in this key: ambiguous
    by_param = {leaf.param for leaf in known}

    def flatten(table: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
        for key, value in table.items():
            name = prefix + key.replace("-", "_")  # two spellings of one key meet in values
            if isinstance(value, Mapping):  # a table: no option takes one as its value
                yield from flatten(value, name + ".")
            else:
                yield name, value

    values, unknown, spelled = {}, [], {}
    for name, value in flatten(settings, ""):
        param = by_path.get(name) or (name if name in by_param else None)
        if param is None:
            unknown.append(name)
        elif param in values:  # e.g. learning_rate and learning-rate, or a key and its table
            raise ConfigError(f"The --config file sets {param} twice, as {spelled[param]} = "
                              f"{values[param]!r} and as {name} = {value!r}. Keep one.")
        else:
            values[param], spelled[param] = value, name
    if unknown:
        raise ConfigError(f"The --config file has unknown setting(s) {', '.join(unknown)}; "
                          f"valid ones are this command's options: "
                          f"{', '.join(sorted(by_param))}.")
    return values


@dataclass(frozen=True)
class Settings:
    """What a command was given: every option's value (command line over --config file over
    default), and which of them the user set."""

    cls: type
    known: tuple[Leaf, ...]
    values: Mapping[str, Any]
    given: frozenset[str]

    def build(self, **overrides: Any) -> Any:
        """The config, validated; `overrides` replace options' values, or set top-level
        fields that are no option (predict's `listed`).

        Raises:
            ConfigError: a missing or invalid value (a usage error).
        """
        values = {**self.values, **overrides}
        enablers = {leaf.optional_group: leaf for leaf in self.known if leaf.enables}
        off = {group for group, leaf in enablers.items() if values[leaf.param] is None}
        params = {leaf.param for leaf in self.known}
        tree: dict[str, Any] = {k: v for k, v in overrides.items() if k not in params}
        for leaf in self.known:
            value = values[leaf.param]
            if leaf.optional_group in off:
                if leaf.param in self.given:
                    raise ConfigError(
                        f"{leaf.option} applies only with "
                        f"{enablers[leaf.optional_group].option}; got it without.")
                continue
            if value is None and leaf.required and _unwrap(leaf.hint) is leaf.hint:
                raise ConfigError(f"Missing {leaf.option}: {leaf.meta['help']}")
            for path in leaf.paths:
                if not any(path[:len(group)] == group for group in off):
                    _put(tree, path, value)
        return from_dict(self.cls, tree)

    def given_options(self) -> list[str]:
        """The options the user set, as they are spelled on the command line."""
        return sorted(leaf.option for leaf in self.known if leaf.param in self.given)


# A command's `settings` parameter defaults to this; `configured` always passes the real one.
GIVEN = typing.cast(Settings, None)


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = list(value) if isinstance(value, tuple) else value


def configured(cls: type, optional: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Declares every option of config `cls` (and --config) on a command, and hands it their
    values as `settings: Settings`. `optional` names options the command may go without
    (finetune's DATA and -o with --resume)."""
    known = tuple(leaves(cls))

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)

        @functools.wraps(command)
        def wrapper(ctx: typer.Context, **kwargs: Any) -> Any:
            from transferkit.cli.console import RichReporter, print_error

            try:
                from_file = _file_values(ctx.meta.get(_FILE_SETTINGS, {}), list(known))
            except ConfigError as exc:
                print_error(str(exc))
                raise typer.Exit(2) from None
            kwargs.pop("config_file")
            kwargs.pop("help_all", None)
            values = {leaf.param: _plain(kwargs.pop(leaf.param)) for leaf in known}
            for leaf in known:
                old = kwargs.pop(f"{leaf.param}__alias", None)
                if old is not None and _set_by_user(ctx, leaf.param):
                    print_error(f"{leaf.meta['alias']} is the old name of {leaf.option}; got "
                                f"both ({old} and {values[leaf.param]}). Give {leaf.option} "
                                f"alone.")
                    raise typer.Exit(2)
                if old is not None:
                    RichReporter().warning(f"{leaf.meta['alias']} is now {leaf.option}; the "
                                           f"old name still works for now.")
                    values[leaf.param] = old
                    ctx.set_parameter_source(leaf.param, ctx.get_parameter_source(
                        f"{leaf.param}__alias"))
            typed = {p for p in values if _set_by_user(ctx, p)}
            values = {**values, **from_file, **{p: values[p] for p in typed}}
            settings = Settings(cls, known, values, frozenset(typed | set(from_file)))
            return command(**kwargs, settings=settings)

        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in signature.parameters.values() if p.name != "settings"]
        generated = [_declare(leaf, leaf.param in optional) for leaf in known]
        generated += [_alias(leaf) for leaf in known if leaf.meta.get("alias")]
        arguments = [p for p in generated if _is_argument(p)]
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[CONTEXT, *arguments, *own, CONFIG_OPTION,
                        *([HELP_ALL] if any(leaf.advanced for leaf in known) else []),
                        *(p for p in generated if not _is_argument(p))])
        return wrapper

    return decorate


CONTEXT = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)


def _set_by_user(ctx: typer.Context, param: str) -> bool:
    """Whether `param` came from the command line or the environment, not its default."""
    return getattr(ctx.get_parameter_source(param), "name", "DEFAULT") != "DEFAULT"


def _plain(value: Any) -> Any:
    """A choice's str value instead of its Enum member."""
    return value.value if isinstance(value, Enum) else value


def _is_argument(parameter: inspect.Parameter) -> bool:
    return any(isinstance(m, typer.models.ArgumentInfo)
               for m in getattr(parameter.annotation, "__metadata__", ()))
