"""YAML recipes mapped onto dataclasses, with every key validated before anything expensive happens.

A recipe is a YAML mapping whose sections are dataclasses (nested as deep as needed). `load_recipe` reads
the file, applies `--key value` command-line overrides (dotted keys reach into sections:
`--guidance.lr 0.25`), and builds the dataclass tree. An unknown key is an error naming the key, the file
and the closest valid key; a value of the wrong type is an error naming the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from pathlib import Path

import yaml


class RecipeError(ValueError):
    """A recipe (or a command-line override) is malformed; the message says where and how."""


_SECRET_NAME = re.compile(r"(^|_)(token|key|secret|password)$")


def is_secret(name: str) -> bool:
    """Whether a recipe key holds a credential (`hub_token`, `api_key`, …): never printed, saved or logged."""
    return bool(_SECRET_NAME.search(name))


def without_secrets(data):
    """A plain recipe mapping with every secret value replaced by "<hidden>" (at any depth)."""
    if isinstance(data, dict):
        return {key: ("<hidden>" if is_secret(str(key)) and value is not None else without_secrets(value))
                for key, value in data.items()}
    if isinstance(data, list):
        return [without_secrets(value) for value in data]
    return data


def scrub_secret_arguments(argv: list[str]) -> list[str]:
    """`--section.some_token VALUE` / `--section.some_token=VALUE` with the value replaced by "<hidden>"."""
    scrubbed, hide_next = [], False
    for token in argv:
        key = token[2:].split("=", 1)[0].split(".")[-1].replace("-", "_") if token.startswith("--") else ""
        if hide_next:
            scrubbed.append("<hidden>")
            hide_next = False
        elif key and is_secret(key):
            if "=" in token:
                scrubbed.append(token.split("=", 1)[0] + "=<hidden>")
            else:
                scrubbed.append(token)
                hide_next = True
        else:
            scrubbed.append(token)
    return scrubbed


def load_recipe(path: str | os.PathLike | None, schema: type, overrides: list[str] | None = None):
    """Read the YAML recipe at `path` (None: every key at its default), apply `--key value` overrides, and build an
    instance of `schema`."""
    source = str(path) if path is not None else "command line"
    return build_dataclass(schema, read_recipe(path, schema, overrides), source=source)


def read_recipe(path: str | os.PathLike | None, schema: type, overrides: list[str] | None = None) -> dict:
    """The recipe at `path` (None: an empty one) as a plain mapping with the `--key value` overrides applied (their
    keys validated)."""
    data, source = {}, "command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"Recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise RecipeError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}.")
        source = f"{path} (command line)"
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value, schema, source=source)
    return data


_KEY_EQUALS = re.compile(r"^[A-Za-z_][\w.\[\]-]*=")


class _Bare:
    """The value of an override given without one (`--quick`): true for a boolean key, an error for any other."""

    def __repr__(self) -> str:
        return "<no value>"


BARE = _Bare()


def parse_overrides(argv: list[str]) -> list[tuple[str, object]]:
    """['--a.b', '3', '--flag=true', 'c=x', '--names', 'x', 'y', '--quick'] ->
    [('a.b', 3), ('flag', True), ('c', 'x'), ('names', ['x', 'y']), ('quick', BARE)]; values are parsed as YAML
    scalars, several values after one key make a list. A token `key=…` is always an override of its own (a value
    holding "=" is written `--key=value`)."""
    pairs, i = [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") and "=" in token:
            token = f"--{token}"
        if not token.startswith("--") or len(token) == 2:
            raise RecipeError(f"Expected an override '--key value' or 'key=value', got {token!r}.")
        key, i = token[2:], i + 1
        if "=" in key:
            key, raw = key.split("=", 1)
            value = yaml.safe_load(raw)
        else:
            raws = []
            while i < len(argv) and not argv[i].startswith("--") and not _KEY_EQUALS.match(argv[i]):
                raws.append(argv[i])
                i += 1
            values = [yaml.safe_load(raw) for raw in raws]
            value = BARE if not values else values[0] if len(values) == 1 else values
        pairs.append((key.replace("-", "_"), value))
    return pairs


def _set_dotted(data: dict, dotted: str, value, schema: type, source: str) -> None:
    parts = dotted.split(".")
    node, node_schema = data, schema
    for depth, part in enumerate(parts):
        field = _field_or_error(node_schema, part, ".".join(parts[: depth + 1]), source)
        if depth == len(parts) - 1:
            node[part] = _command_line_value(value, type_hints(node_schema)[field.name], dotted, source)
            return
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{source}: '{'.'.join(parts[: depth + 1])}' is not a section.")
        node_schema = dataclass_in(type_hints(node_schema)[field.name])
        if node_schema is None:
            raise RecipeError(f"{source}: '{'.'.join(parts[: depth + 1])}' is not a section.")


def _command_line_value(value, hint, dotted: str, source: str):
    """A bare `--key` sets a boolean key to true; one value given for a list key is a list of one."""
    kinds = [hint, *typing.get_args(hint)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    if value is BARE:
        if bool not in kinds:
            raise RecipeError(f"{source}: override --{dotted} has no value.")
        return True
    if any(typing.get_origin(kind) is list for kind in kinds) and not isinstance(value, list) and value is not None:
        return [value]
    return value


def _field_or_error(schema: type, key: str, where: str, source: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    if key in fields:
        return fields[key]
    section = where[: -len(key)]  # "guidance." for "guidance.stpes", "" at the top level
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    hint = f" Did you mean '{section}{close[0]}'?" if close else ""
    listing = f" Valid keys here: {', '.join(sorted(fields))}." if len(fields) <= 30 else ""
    raise RecipeError(f"{source}: unknown key '{where}'.{hint}{listing}")


def build_dataclass(schema: type, data: dict, source: str, prefix: str = ""):
    """Instantiate `schema` from a mapping, recursing into dataclass-typed fields."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: '{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {data!r}.")
    hints = type_hints(schema)
    kwargs = {}
    for key, value in data.items():
        field = _field_or_error(schema, key, prefix + key, source)
        kwargs[key] = _coerce(value, hints[field.name], source, prefix + key)
    try:
        return schema(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError) as error:
        where = f" in '{prefix.rstrip('.')}'" if prefix else ""
        raise RecipeError(f"{source}: invalid recipe{where}: {error}") from None


def type_hints(schema: type) -> dict:
    try:
        return typing.get_type_hints(schema)
    except Exception:  # unresolvable forward references in third-party dataclasses: keep raw annotations
        return {f.name: f.type for f in dataclasses.fields(schema)}


def dataclass_in(hint) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value, hint, source: str, where: str):
    """Check/convert a YAML value to the annotated type; unknown annotations pass the value through."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, source, where + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, source, where)
            except RecipeError as error:
                errors.append(error)
        if errors and len(errors) == len([a for a in args if a is not type(None)]):
            raise errors[0]
        return value
    if origin is typing.Literal:
        if value not in args:
            raise RecipeError(f"{source}: '{where}' must be one of {list(args)}, got {value!r}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{source}: '{where}' must be a list (e.g. [1, 2]), got {value!r}.")
        inner = args[0] if args else typing.Any
        items = [_coerce(v, inner, source, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value  # the dataclass's own __post_init__ converts and validates enum strings
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{source}: '{where}' must be true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{source}: '{where}' must be an integer, got {value!r}.")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{source}: '{where}' must be a number, got {value!r}.")
    if hint is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{source}: '{where}' must be a string, got {value!r}.")
    return value


def to_plain(obj):
    """A dataclass tree as plain dicts/lists (for printing the resolved recipe and saving it)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj
