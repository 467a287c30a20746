"""Typer options made from config dataclasses: one option per field, its help the field's docstring.

A command names the dataclasses it builds:

    @app.command("train")
    @fields_as_options(TrainConfig, into="given", choices={"method": METHODS})
    def train_command(given: dict, cache: str = typer.Option(...), ...): ...

Every field the command does not declare itself becomes a keyword option `--field-name` whose default
is None, meaning "not given": the command receives the given ones in the dict `given` and lays them
over its defaults (a `--config` file, an evaluation preset, the dataclass defaults). So a new config
field is a new option with no second copy of its help or default, and a command still declares by
hand the few parameters that need more (arguments, short names, a different type).

Types: bool -> --x/--no-x; Literal[...] and `choices` -> an Enum listed in --help and checked by
the parser; tuple[T, T] -> two values; tuple[str, ...] -> a comma-separated list.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path

import click
import typer

METAVARS = {"cache": "CACHE", "out": "PATH", "src": "IMAGES", "vae": "ID|DIR", "model": "PRESET",
            "dino_weights": "FILE", "compressor": "FILE", "norm_stats": "FILE", "inception": "FILE", "ref": "NPZ",
            "fid_ref": "NPZ", "init_from": "CKPT", "png_dir": "DIR", "trackers": "LIST", "fill": "CACHE",
            "pca_file": "FILE", "encoder": "TIMM_ID", "encoder_weights": "FILE", "layers": "I,J,..."}
"""Words for the value of path-like options (typer's default is TEXT)."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring, on one line}: the string literal under each annotated field of the class."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def choice_enum(name: str, values) -> type[enum.Enum]:
    """A str Enum of `values` (what typer lists in --help and checks in one line)."""
    return enum.Enum(name, {str(v): str(v) for v in values}, type=str)


def _option_type(hint, name: str, choices: dict) -> tuple[object, typing.Callable]:
    """(the annotation typer sees, value -> the field's value)."""
    plain = lambda v: v  # noqa: E731
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # X | None: None is "not given" anyway
    if name in choices or typing.get_origin(hint) is typing.Literal:
        kind = choice_enum(name, choices.get(name) or typing.get_args(hint))
        return kind, lambda v: v.value
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[-1] is Ellipsis:
        item = typing.get_args(hint)[0]
        return str, lambda v: tuple(item(x.strip()) for x in v.split(",") if x.strip())
    return hint, plain


def _help(doc: str, default, kind) -> str:
    """The docstring, then the default as click would show it (the option's own default is None)."""
    if any(default is nothing for nothing in (dataclasses.MISSING, None, False)) or default == "":
        return doc
    if isinstance(default, tuple):
        shown = ("," if kind is str else " ").join(map(str, default))  # a comma list, or a fixed-size tuple's values
    else:
        shown = "on" if default is True else str(default)
    return f"{doc}  [default: {shown or 'none'}]"


def fields_as_options(cls: type, into: str, *, skip: tuple[str, ...] = (), names: dict | None = None,
                      choices: dict | None = None, defaults: dict | None = None):
    """Add the fields of dataclass `cls` as options of the decorated typer command (see the module doc).

    into: the parameter that receives {field: value} for the options given; skip: fields left out;
    names: field -> option declarations (e.g. ("--num", "-n")); choices: field -> allowed values;
    defaults: field -> this command's default where it differs from the dataclass's (shown, and given)."""
    names, choices, defaults = names or {}, choices or {}, defaults or {}

    def decorate(fn):
        signature = inspect.signature(fn)
        own = [p for p in signature.parameters.values() if p.name != into]
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        added, convert = [], {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name in skip or f.name in signature.parameters:
                continue
            kind, convert[f.name] = _option_type(hints[f.name], f.name, choices)
            flag = "--" + f.name.replace("_", "-")
            # --x/--no-x for every bool: either may override a config file or a preset
            decls = names.get(f.name) or ((f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,))
            default = defaults.get(f.name, f.default)
            option = typer.Option(None, *decls, help=_help(docs.get(f.name, ""), default, kind), show_default=False,
                                  metavar=None if isinstance(kind, enum.EnumMeta) else METAVARS.get(f.name))
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                           annotation=typing.Optional[kind]))  # noqa: UP045 (typer reads it)

        @functools.wraps(fn)
        def command(**kwargs):
            given = dict(defaults)
            for p in added:
                value = kwargs.pop(p.name)
                if value is not None:
                    try:
                        given[p.name] = convert[p.name](value)
                    except ValueError as e:  # e.g. --layers 8,x: one line, as click's own checks
                        raise click.BadParameter(f"{value!r}: {e}", param_hint=p.default.param_decls[0]) from None
            return fn(**kwargs, **{into: given})

        resolved = typing.get_type_hints(fn)
        own = [p.replace(annotation=resolved.get(p.name, p.annotation)) for p in own]
        command.__signature__ = signature.replace(parameters=own + added)
        command.__annotations__ = {p.name: p.annotation for p in own + added}
        return command

    return decorate


def read_config_file(path: str | Path, cls: type) -> dict:
    """{field: value} from a JSON or YAML file: the `config` part of `reglue train --dry-run` output, or a
    plain mapping of fields. Unknown keys are refused, naming them and the file."""
    import json

    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found (write one with `reglue train ... --dry-run > FILE`)")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML or JSON"
        raise ValueError(f"{path} is not valid {kind}: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # the dry-run's resolved config.json
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no mapping of {cls.__name__} fields")
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - known):
        raise ValueError(f"{path}: unknown {cls.__name__} fields {unknown}; see `--help` for the fields")
    return data
