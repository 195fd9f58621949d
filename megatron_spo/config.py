"""Strict configuration: YAML and dotted command-line overrides into typed dataclass trees.

Every subsystem describes its settings as a `@dataclass(kw_only=True)` with a docstring under each
field; the top-level config composes them. This module turns user input into such a tree and
refuses anything it does not understand, so a typo never silently falls back to a default:

- an unknown key is an error naming the dotted key and listing the valid ones;
- a value of the wrong type is an error naming the key, the expected type and the value;
- a field without a default that is absent is an error naming the key;
- a `__post_init__` check that fails (ValueError / UserError) is reported with the dotted path of
  the section it belongs to.

Overrides use the syntax `section.sub.key=value` (e.g. `trainer.spo.rho.d_half=0.08`); the value
is parsed as a YAML scalar or flow collection, so `n=8`, `lr=1e-6`, `files=[a.jsonl, b.jsonl]`,
`tag=null` and `wandb=true` all mean what they look like. The module is generic: it knows nothing
about the trainer and works for any dataclass tree.

Accepted conversions, and only these: int -> float (YAML writes `1` for one), a string that
spells a float -> float (PyYAML reads `1e-6` without a dot as a string, a YAML 1.1 quirk),
str -> pathlib.Path, list -> tuple. Booleans are never numbers and numbers never strings.

Two field kinds beyond the plain one:
- a field declared with `metadata=SET_BY_CALLER` is filled in by the program (an engine's model
  directory comes from `model.hf_dir`): files and overrides cannot set it and saved configs leave
  it out, so each setting has exactly one key;
- the root class may carry `MOVED: ClassVar[dict[str, str | tuple[str, ...]]]`, old dotted key ->
  new one(s). An old key in a file or an override is refused with one line naming its new place
  (`'spo.rho_mode' moved to 'algorithm.spo.rho_mode'`); a key that maps a whole old section moves
  every key under it. An entry whose old key is still a section (`rollout.engine`) applies only
  when a plain value is given where that section now is.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from megatron_spo import atomic
from megatron_spo.errors import UserError

T = TypeVar("T")

SET_BY_CALLER = {"config": False}
"""Field metadata: the program fills this field in; config files and overrides cannot set it."""

_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)


# ----------------------------------------------------------------------------- type helpers


def _type_name(tp: Any) -> str:
    """A readable name for an annotation, for error messages (`float`, `int | None`, ...)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations of a dataclass (works with `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields a config file may set: init fields not marked `SET_BY_CALLER`, in order."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.metadata.get("config", True)}


class _Mismatch(Exception):
    """Internal: a value does not fit an annotation (turned into a UserError by the caller)."""


def _convert(value: Any, tp: Any, path: str, where: str) -> Any:
    """Return `value` converted to annotation `tp`, or raise UserError naming `path`."""
    try:
        return _convert_or_mismatch(value, tp, path, where)
    except _Mismatch:
        raise UserError(
            f"{where}: key '{path}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        ) from None


def _convert_or_mismatch(value: Any, tp: Any, path: str, where: str) -> Any:
    """`value` converted to annotation `tp`; raises _Mismatch when it does not fit (UserError from
    deeper levels passes through)."""
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(value, args, path, where)
    if origin is Literal:
        # bool is an int subclass: `True` must not match a Literal[1]
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, path=path, where=where)
        raise _Mismatch
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        return _convert_sequence(value, tp, path, where)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _Mismatch
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(k, key_tp, _join(path, str(k)), where): _convert(v, val_tp, _join(path, str(k)), where)
            for k, v in value.items()
        }
    if isinstance(tp, type):
        return _convert_scalar(value, tp)
    raise TypeError(f"config annotation {tp!r} at '{path}' is not supported by megatron_spo.config")


def _convert_union(value: Any, args: tuple[Any, ...], path: str, where: str) -> Any:
    """A `Union` / `X | Y` annotation with arms `args`."""
    if value is None:
        if type(None) in args:
            return None
        raise _Mismatch
    arms = [a for a in args if a is not type(None)]
    if len(arms) == 1:
        # `X | None`: convert as X, so a problem deep inside X keeps its precise message
        return _convert_or_mismatch(value, arms[0], path, where)
    # First arm that accepts the value wins; arms are tried in the order written.
    for arm in arms:
        try:
            return _convert_or_mismatch(value, arm, path, where)
        except (_Mismatch, UserError):
            continue
    raise _Mismatch


def _convert_sequence(value: Any, tp: Any, path: str, where: str) -> list[Any] | tuple[Any, ...]:
    """A list / Sequence / tuple annotation: a YAML list (or tuple), never a string or mapping."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise _Mismatch
    args = typing.get_args(tp)
    if not (typing.get_origin(tp) is tuple or tp is tuple):
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, _join(path, i), where) for i, v in enumerate(value)]
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0], _join(path, i), where) for i, v in enumerate(value))
    if len(value) != len(args):
        raise _Mismatch
    return tuple(_convert(v, a, _join(path, i), where) for i, (v, a) in enumerate(zip(value, args)))


def _convert_scalar(value: Any, tp: type) -> Any:
    """A plain class annotation: bool, int, float, str, Path, an Enum, or any other class."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise _Mismatch
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch
    if issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if member.value == value:
                return member
        raise _Mismatch
    if isinstance(value, tp):  # str and any other class: taken as it is, never converted
        return value
    raise _Mismatch


# ----------------------------------------------------------------------------- building


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "", where: str = "config") -> T:
    """Build dataclass `cls` from a nested mapping, strictly.

    `path` is the dotted location of `cls` inside the whole config (for messages); `where` names
    the input (a file name, "command line", ...).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: '{path or '<top level>'}' must be a mapping, got {data!r}")
    if not path:
        check_moved(cls, data, where)
    fields = config_fields(cls)
    hints = _hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = _join(path, str(unknown[0]))
        raise UserError(
            f"{where}: unknown key '{key}'; valid keys under '{path or '<top level>'}': "
            + ", ".join(sorted(fields))
        )
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key = _join(path, name)
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        if name in data and data[name] is None and dataclasses.is_dataclass(hints[name]) and has_default:
            continue  # `section:` with nothing under it (YAML null) means "all defaults"
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key, where)
        elif not has_default:
            raise UserError(f"{where}: missing required key '{key}' ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (UserError, ValueError) as err:
        raise UserError(f"{where}: invalid '{path}': {err}" if path else f"{where}: {err}") from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping from `path` (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); "
                        "is it a YAML file?") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {err}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"command-line override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"command-line override {text!r}: the value is not valid YAML") from None
    return key.split("."), value


def _check_override_path(cls: type, parts: list[str], text: str) -> None:
    """Refuse an override whose dotted key does not exist in the dataclass tree `cls`."""
    current: Any = cls
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(current):
            origin = typing.get_origin(current)
            if current in (dict, Mapping, Any) or origin in (dict, Mapping):
                return  # free-form mapping: any key below it is the owner's business
            parent = ".".join(parts[:depth])
            raise UserError(f"command-line override {text!r}: '{parent}' is a value, not a section")
        fields = set(config_fields(current))
        if part not in fields:
            section = ".".join(parts[:depth]) or "<top level>"
            key = ".".join(parts[: depth + 1])
            raise UserError(
                f"command-line override {text!r}: unknown key '{key}'; "
                f"valid keys under '{section}': {', '.join(sorted(fields))}"
            )
        current = _strip_optional(_hints(current)[part])


def _strip_optional(tp: Any) -> Any:
    """`X | None` -> X, so an override can reach into an optional section."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return arms[0]
    return tp


def _schema_kind(cls: type, parts: Sequence[str]) -> str | None:
    """What dotted key `parts` is in the dataclass tree `cls`: "section" (a dataclass), "value",
    "free" (inside a free-form mapping) or None (no such key)."""
    current: Any = cls
    for part in parts:
        if not dataclasses.is_dataclass(current):
            origin = typing.get_origin(current)
            return "free" if current in (dict, Mapping, Any) or origin in (dict, Mapping) else None
        if part not in config_fields(current):
            return None
        current = _strip_optional(_hints(current)[part])
    return "section" if dataclasses.is_dataclass(current) else "value"


def _moved_message(cls: type, moved: Mapping[str, str | tuple[str, ...]], parts: list[str],
                   value: Any) -> str | None:
    """"'old' moved to 'new'" when dotted key `parts` (holding `value`) is an old key of `moved`."""
    for depth in range(len(parts), 0, -1):
        old = ".".join(parts[:depth])
        if old not in moved:
            continue
        kind = _schema_kind(cls, parts[:depth])
        if kind is not None and not (kind == "section" and depth == len(parts) and not isinstance(value, Mapping)):
            continue  # the old key is still valid here: not a move
        rest = list(parts[depth:])  # keys below the old one
        while isinstance(value, Mapping) and value:
            key = next(iter(value))  # a whole old section: name its first key
            rest.append(str(key))
            value = value[key]
        old_key = ".".join([old, *rest])
        targets = moved[old]
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        new = [".".join([t, *rest]) for t in targets]
        return f"'{old_key}' moved to '{new[0]}'" + "".join(f" (or '{n}')" for n in new[1:])
    return None


def check_moved(cls: type, data: Mapping[str, Any], where: str = "config") -> None:
    """Refuse a key of raw config `data` that `cls.MOVED` lists as moved, naming its new key."""
    moved = getattr(cls, "MOVED", None)
    if not moved or not isinstance(data, Mapping):
        return

    def walk(node: Mapping[str, Any], parts: list[str]) -> None:
        for key, value in node.items():
            path = [*parts, str(key)]
            kind = _schema_kind(cls, path)
            if kind == "section" and isinstance(value, Mapping):
                walk(value, path)
            elif kind is None or (kind == "section" and value is not None):
                message = _moved_message(cls, moved, path, value)
                if message:
                    raise UserError(f"{where}: key {message}")

    walk(data, [])


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of raw config `data` with each `a.b.c=value` override set in it."""
    result = _deep_copy(data)
    moved = getattr(cls, "MOVED", None) or {}
    for text in overrides:
        parts, value = parse_override(text)
        message = _moved_message(cls, moved, parts, value)
        if message:
            raise UserError(f"command-line override {text!r}: {message}")
        _check_override_path(cls, parts, text)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                # absent (or null, e.g. an optional section) in the file: create it
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    values: Mapping[str, Any] | None = None,
) -> T:
    """Build `cls` from an optional YAML file, then `values` ({dotted key: value}, set as given, not
    parsed: a CLI's path flags), then dotted overrides (applied in order, last wins)."""
    data = load_yaml(path) if path is not None else {}
    source = f"config {str(path)!r}" if path is not None else "config"
    check_moved(cls, data, source)  # before an override could replace an old section
    for key, value in (values or {}).items():
        parts = key.split(".")
        _check_override_path(cls, parts, key)
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    data = apply_overrides(cls, data, overrides)
    where = source + (" (with command-line overrides)" if overrides or values else "")
    return from_dict(cls, data, where=where)


# ----------------------------------------------------------------------------- writing


def to_dict(config: Any) -> Any:
    """Plain-data view of a dataclass tree (paths as strings, tuples as lists): YAML/JSON-ready.
    Holds the keys a config file sets: `SET_BY_CALLER` fields are left out."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {name: to_dict(getattr(config, name)) for name in config_fields(type(config))}
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, enum.Enum):
        return config.value
    return config


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Write the effective config as YAML (atomically); loading it back gives an equal config."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)
    atomic.write_text(path, text)
    return Path(path)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body (empty if none).

    Inherited fields take their docstring from the class that declares them.
    """
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = getattr(ast.parse(source).body[0], "body", [])
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf field, `dotted.key (type) = default  # doc`, for `--help` output."""
    lines: list[str] = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for field in config_fields(cls).values():
        key = _join(prefix, field.name)
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, key))
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(to_dict(field.default))
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(to_dict(field.default_factory()))
        else:
            default = "(required)"
        doc = docs.get(field.name, "").split("\n")[0]
        lines.append(f"{key} ({_type_name(tp)}) = {default}" + (f"  # {doc}" if doc else ""))
    return lines
