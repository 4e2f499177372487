"""The command-line front `rgrl.train`, `rgrl.steer` and `rgrl.bench` share:

    python -m rgrl.<command> RECIPE.yaml [--section.key value | --section.key=value | section.key=value ...]
                             [--dry_run] [--help]
    python -m rgrl.bench NAME [OPTIONS.yaml] [--key value ...] [--dry_run] [--help]

Overrides reach any recipe key (dotted through sections); a bare `--key` sets a boolean key to true and several values
after one key make a list. `--dry_run` checks everything without running (no weights loaded) and prints the resolved
configuration; `--help` lists every key of the command's recipe with its help text and default. A benchmark's keys
all have defaults, so its options file is optional.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import shlex
import sys
import types
import typing
from dataclasses import dataclass
from functools import cache

import yaml

from rgrl.recipe import RecipeError, dataclass_in, load_recipe, scrub_secret_arguments, to_plain, type_hints

_DRY_RUN = ("--dry_run", "--dry-run")


@dataclass
class CommandLine:
    recipe: str | None  # the YAML file; None: none given to a command whose keys all have defaults
    overrides: list[str]  # as `rgrl.recipe.parse_overrides` reads them
    dry_run: bool


def parse_command_line(prog: str, doc: str, argv: list[str] | None, schemas,
                       recipe_required: bool = True) -> CommandLine:
    """Split argv into the recipe, its overrides and --dry_run; on --help (or, when a recipe is required, nothing),
    print `doc` and every key of the recipe dataclasses `schemas()` returns, and exit 0. Secrets in sys.argv are
    hidden (trackers record it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_usage = "RECIPE.yaml" if recipe_required else "[OPTIONS.yaml]"
    usage = f"usage: {prog} {recipe_usage} [--section.key value | section.key=value ...] [--dry_run]"
    if (recipe_required and not argv) or any(token in ("-h", "--help") for token in argv):
        print(doc.strip())
        print(f"\n{usage}\n")
        print(recipe_keys(*schemas()))
        sys.exit(0)
    sys.argv[:] = scrub_secret_arguments(sys.argv)
    dry_run = any(token in _DRY_RUN for token in argv)
    argv = [token for token in argv if token not in _DRY_RUN]
    recipe = argv[0] if argv and not argv[0].startswith("--") and "=" not in argv[0] else None
    if recipe is None and recipe_required:
        sys.exit(f"error: the recipe file comes first.\n{usage}")
    return CommandLine(recipe=recipe, overrides=argv[1:] if recipe else argv, dry_run=dry_run)


def parse_options(prog: str, doc: str, argv: list[str] | None, schema: type):
    """The benchmarks' front: `[OPTIONS.yaml] [--key value ...] [--dry_run] [--help]` -> an instance of `schema`
    (a dataclass whose keys all have defaults). A bad key or value exits with its error; --dry_run prints the
    resolved options and exits 0."""
    command = parse_command_line(prog, doc, argv, lambda: [schema], recipe_required=False)
    try:
        options = load_recipe(command.recipe, schema, command.overrides)
    except RecipeError as error:
        sys.exit(f"error: {error}")
    if command.dry_run:
        print(yaml.safe_dump(to_plain(options), sort_keys=False), end="")
        print(f"# {prog}: OK (dry run: nothing run)")
        sys.exit(0)
    return options


def command_string(prog: str, argv: list[str] | None) -> str:
    """The command as typed (secrets hidden), for a report to say how it was made."""
    tokens = scrub_secret_arguments(list(sys.argv[1:] if argv is None else argv))
    return " ".join([prog, *map(shlex.quote, tokens)])


def recipe_keys(*schemas: type) -> str:
    """Every key of the recipe dataclasses, `section.key  (type, default: …)  help`; a key already listed for an
    earlier schema with the same default is listed once."""
    lines, seen = [], {}
    for schema in schemas:
        header = f"{schema.__name__} keys:"
        entries = [entry for entry in _keys(schema, "") if seen.get(entry[0]) != entry[1:3]]
        if not entries:
            continue
        lines.append(header)
        for name, kind, default, text in entries:
            seen[name] = (kind, default)
            lines.append(f"  {name}  ({kind}, default: {default})" + (f"\n      {text}" if text else ""))
        lines.append("")
    return "\n".join(lines)


def _keys(schema: type, prefix: str):
    hints = type_hints(schema)
    for f in dataclasses.fields(schema):
        if not f.init or f.name.startswith("_"):
            continue
        hint = hints.get(f.name, f.type)
        inner = dataclass_in(hint)
        name = prefix + f.name
        if inner is not None and inner is not schema and inner.__module__.startswith("rgrl."):  # rgrl's sections
            list_of = typing.get_origin(hint) is list
            yield from _keys(inner, f"{name}[i]." if list_of else f"{name}.")
            continue
        yield name, _type_name(hint), _default(f), field_help(schema, f)


def own_fields(config_class: type) -> list[str]:
    """The fields a config class adds to TRL's GRPOConfig (the rollout, guidance and learner settings of rgrl)."""
    from trl import GRPOConfig

    inherited = {f.name for f in dataclasses.fields(GRPOConfig)}
    return [f.name for f in dataclasses.fields(config_class) if f.name not in inherited]


def field_help(schema: type, f: dataclasses.Field) -> str:
    """A field's help: its `metadata["help"]` (TRL / transformers style), else the comment after it in the source."""
    text = f.metadata.get("help") if f.metadata else None
    if text:
        return " ".join(str(text).split())
    for klass in schema.__mro__:
        comment = _source_comments(klass).get(f.name)
        if comment:
            return comment
    return ""


@cache
def _source_comments(klass: type) -> dict[str, str]:
    """A class body's field comments -> {name: comment}: the comment after `name: type = default`, else the comment
    lines right above it."""
    try:
        lines = inspect.getsource(klass).splitlines()
    except (OSError, TypeError):
        return {}
    comments, above = {}, []
    for line in lines:
        stripped = line.strip()
        if line.startswith("    #") and not line.startswith("     "):
            above.append(stripped.lstrip("# "))
            continue
        field = re.match(r"^\s{4}(\w+)\s*:[^#]*?(?:#\s*(.+))?$", line)
        if field and not line.startswith("     "):
            text = field.group(2) or " ".join(above)
            if text:
                comments.setdefault(field.group(1), text.strip())
        above = []
    return comments


def _type_name(hint) -> str:
    """`list[Literal['a', 'b']] | None` -> "list[a | b] | None"."""
    if isinstance(hint, str):
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if arg is type(None) else _type_name(arg) for arg in args)
    if origin in (list, tuple, dict) and args:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "see its keys"
    else:
        return "required"
    return value.value if isinstance(value, enum.Enum) else repr(value)
