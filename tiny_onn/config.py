"""Stage configurations: dataclasses with defaults, loadable from YAML, overridable on the command line.

The string literal under each field is its documentation and becomes the field's `--help` text.
A YAML file may hold the fields at top level or under a section named after the stage (`scan:`, `carve:` …),
so one file can configure the whole pipeline.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import os
import textwrap
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tiny_onn.errors import TinyOnnError, check_no_lone_surrogates

C = TypeVar("C")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field to the string literal written under it (searched through base classes too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add `--config FILE.yaml` and one `--field-name` flag per dataclass field (help text from the field's docstring)."""
    own_config = "config" in {f.name for f in dataclasses.fields(cls)}  # e.g. alchemy: --config is the pipeline file
    if not own_config:
        parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with these options (flags given here override it)")
    docs = field_docs(cls)
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        typ = types[f.name]
        origin = typing.get_origin(typ)
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif origin in (list, tuple):
            (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis} or {str}
            # repeat the flag or list several values: --model a --model b == --model a b
            parser.add_argument(flag, dest=f.name, type=item, nargs="+", action="extend", default=argparse.SUPPRESS,
                                help=help_text)
        else:
            scalar = next((a for a in typing.get_args(typ) if a is not type(None)), typ)  # Optional[X] -> X
            parser.add_argument(flag, dest=f.name, type=scalar, default=argparse.SUPPRESS, help=help_text)


# the sections a YAML file may hold: one per stage command (`distil` is alchemy's name for distil-data's section)
SECTIONS = ("alchemy", "scan", "distil", "distil-data", "carve", "train", "eval", "interpret", "export", "generate")
SECTION_ALIASES = {"distil-data": "distil"}  # a stage's section under the name a pipeline file gives it


def check_sections(path: str | Path, options: set[str] = frozenset(), sections: tuple[str, ...] = SECTIONS) -> None:
    """One clear error for a mapping at the top of a YAML config that is neither one of `sections` nor one of the
    stage's `options` (e.g. "Scan:" or "carv:"): its settings would otherwise be ignored without a word."""
    unknown = [k for k, v in load_yaml(path).items() if isinstance(v, dict) and k not in sections and k not in options]
    if unknown:
        raise TinyOnnError(f"config file {path}: section {unknown[0]!r} is not read here, so its settings would be "
                           f"ignored; sections are {', '.join(sections)}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently, so a second
    `scan:` section replaced the first and a stage ran on defaults)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):  # other keys (unhashable ones) are left to PyYAML
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice (lines {seen[key]} and {line}); keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a YAML config; with `section`, return that section if the file has one (an empty section: no options),
    else the top level without other stages' sections (so that carve's `scan` option is never read from a `scan:`
    section)."""
    path = Path(path)
    if path.is_dir():
        raise TinyOnnError(f"config file {path} is a folder; give a YAML file")
    if not path.is_file():
        raise TinyOnnError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise TinyOnnError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        raise TinyOnnError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from e
    if data is None:  # an empty file (or comments only) is more likely a mistake than a wish for every default
        raise TinyOnnError(f"config file {path} is empty (or holds only comments); give its options, or leave --config "
                           "out to run on the defaults")
    if not isinstance(data, dict):
        raise TinyOnnError(f"config file {path} must hold a mapping of option names to values")
    check_option_names(data, path)
    if section is None:
        return data
    alias = SECTION_ALIASES.get(section)
    if section not in data and alias in data:  # `tiny-onn distil-data --config pipeline.yaml` reads its `distil:`
        section = alias
    loose = top_level_options(data)
    if section in data and (data[section] is None or isinstance(data[section], dict)):
        if loose:
            raise TinyOnnError(f"config file {path}: {', '.join(loose)} {'is' if len(loose) == 1 else 'are'} at the top "
                               f"level beside a `{section}:` section, and only the section is read for {section}; "
                               "move them into the section (top-level options are read only from a file without one)")
        return data[section] or {}
    return {k: data[k] for k in loose}


def check_option_names(data: dict, path: Path) -> None:
    """Option and section names must be text: YAML reads `1:` as a number and `on:`, `yes:` as booleans."""
    for mapping in [data, *(v for v in data.values() if isinstance(v, dict))]:
        bad = next((k for k in mapping if not isinstance(k, str)), None)
        if bad is not None:
            raise TinyOnnError(f"config file {path}: {bad!r} ({type(bad).__name__}) is not an option name; names are "
                               "text (YAML reads on/off/yes/no and numbers as other values: quote the name if it is one)")


def top_level_options(data: dict) -> list[str]:
    """The keys of a YAML config that are not stage sections (options given at the top level)."""
    return [k for k, v in data.items() if not (k in SECTIONS and (v is None or isinstance(v, dict)))]


def _number(value: Any) -> float | None:
    """A finite YAML number, or a string holding one (PyYAML reads `3e-4` and `1e6` as strings); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(value) if isinstance(value, float | str) else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


# string options that hold comma-separated lists, and so may be written as YAML lists too
COMMA_LIST_OPTIONS = frozenset({"data", "tasks", "categories", "prompts", "replay_data", "ewc_data"})


def coerce_option(name: str, value: Any, typ: Any, source: str) -> Any:
    """`value` as the field's type `typ` (bool, int, float, str, list, or Optional of one), or one clear error naming
    the option, the value and the type it needs."""
    args = typing.get_args(typ)
    if type(None) in args:  # Optional[X] / X | None
        if value is None:
            return None
        typ = next(a for a in args if a is not type(None))
    origin = typing.get_origin(typ)

    def wrong(kind: str) -> TinyOnnError:
        return TinyOnnError(f"option '{name}' in {source} must be {kind}, got {value!r}")

    if origin in (list, tuple):
        (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis} or {str}
        items = value if isinstance(value, list | tuple) else [value]
        return [coerce_option(name, v, item, source) for v in items]
    if typ is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if typ is int:
        number = _number(value)
        if number is None or number != int(number):
            raise wrong("an integer")
        return int(number)
    if typ is float:
        number = _number(value)
        if number is None:
            raise wrong("a number")
        return float(number)
    if typ is str:
        if (name in COMMA_LIST_OPTIONS and isinstance(value, list) and value
                and all(isinstance(v, str | int | float) for v in value)):
            return ",".join(str(v) for v in value)  # a comma-separated option written as a YAML list
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise wrong("a string")
        return str(value)
    return value


def make_config(cls: type[C], values: dict[str, Any], source: str = "options") -> C:
    """Build a config dataclass from a dict, rejecting unknown keys with the list of known ones and values of the
    wrong type with the option's name (numbers written as strings, as PyYAML reads `3e-4`, are converted)."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise TinyOnnError(f"unknown option(s) in {source}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    types = _field_types(cls)
    for k, v in values.items():  # e.g. a prompt given as bytes that are not UTF-8 in a UTF-8 locale
        check_no_lone_surrogates(v, f"option {k} in {source}")
    return cls(**{k: expand_home(k, coerce_option(k, v, types[k], source)) for k, v in values.items()})


# options that name files or folders (comma-separated lists of them for the data specs; `mc:FILE` parts of tasks)
PATH_OPTIONS = frozenset({"model", "out", "data", "scan", "teacher", "facts", "facts_source", "general", "plots_out",
                          "ewc_data", "replay_data", "tasks"})


def _expand_part(part: str) -> str:
    text = part.strip()
    if text.startswith("mc:~"):
        return "mc:" + os.path.expanduser(text[3:])
    return os.path.expanduser(text) if text.startswith("~") else part


def expand_home(name: str, value: Any) -> Any:
    """`~` at the start of a path option (or of any part of a comma-separated one) is the user's home folder, as a
    shell would read it: YAML files and quoted flags reach us unexpanded, and every stage must write where it says."""
    if name not in PATH_OPTIONS:
        return value
    if isinstance(value, str):
        return ",".join(_expand_part(p) for p in value.split(",")) if "~" in value else value
    if isinstance(value, list):
        return [expand_home(name, v) for v in value]
    return value


def config_from_args(cls: type[C], args: argparse.Namespace, section: str) -> C:
    """YAML (if `--config` was given) overlaid with the flags given on the command line."""
    values: dict[str, Any] = {}
    own_config = "config" in {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if getattr(args, "config", None) and not own_config:
        stage_keys = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        check_sections(args.config, stage_keys)
        raw = load_yaml(args.config, section)
        # a whole-pipeline file also holds other stages' sections: keep only keys meant for this stage
        values = {k: v for k, v in raw.items() if k in stage_keys or not isinstance(v, dict)}
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    values.update(flags)
    return make_config(cls, values, source=getattr(args, "config", None) or "command line")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a plain dict (for artifacts' provenance)."""
    return dataclasses.asdict(cfg)
