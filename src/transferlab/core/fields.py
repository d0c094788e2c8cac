"""Config fields seen from Python: keyword arguments checked by name and type, and documented, from the
same field declarations the command-line flags are generated from (``utils.option``)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import numbers
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from transferlab.core.errors import ConfigError


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
           invert: bool = False, pairs: bool = False, identity_when_set: bool = False) -> Any:
    """A config dataclass field with the metadata its command-line flag and YAML key are generated from.

    `flag` overrides the flag name (default ``--field-name``); `invert` makes a boolean field a
    ``--no-...`` switch that stores False; `pairs` makes a mapping field a repeatable ``--flag NAME=VALUE``.
    `identity_when_set`: the field enters a config's identity (:func:`identity`) only when it differs from
    its default, so identities recorded before the field existed stay valid.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "invert": invert, "pairs": pairs,
            "identity_when_set": identity_when_set}
    return dataclasses.field(default=default, metadata=meta)


def identity(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict(config)`` without the ``identity_when_set`` fields that hold their default."""
    skip = {f.name for f in dataclasses.fields(config) if f.metadata.get("identity_when_set")
            and getattr(config, f.name) == f.default}
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """An instance of config dataclass `cls` from {field name: value}; nested configs are built from the same dict."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build_config(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def config_fields(*classes: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """{field name: (annotation, field)} of the non-dataclass fields of `classes` and their nested configs."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                out.update({k: v for k, v in config_fields(hints[f.name]).items() if k not in out})
            elif f.name not in out:
                out[f.name] = (hints[f.name], f)
    return out


def type_text(tp: Any) -> str:
    """An annotation as a reader writes it: ``float``, ``int | None``, ``tuple[float, ...]``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"tuple[{type_text(typing.get_args(tp)[0])}, ...]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def fits(tp: Any, value: Any) -> bool:
    """Whether `value` is a value of annotation `tp`: any real number is a float and any integral one an int
    (``np.float32``, ``np.int64``; never a bool); a list is a tuple of its items."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(fits(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return isinstance(value, (tuple, list)) and all(fits(item, v) for v in value)
    if typing.get_origin(tp) is dict:
        return isinstance(value, dict)
    return isinstance(value, tp) if isinstance(tp, type) else True


def plain(tp: Any, value: Any) -> Any:
    """`value` (which :func:`fits` `tp`) as the plain Python value the command line would give: a float for a
    float field (``np.float32(1e-3)`` or ``1``), an int for an int field, a tuple for a tuple field, so that
    configs, run.json and hashes never hold a numpy scalar or depend on how a number was spelled."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return plain(next(a for a in typing.get_args(tp) if fits(a, value)), value)
    if tp is float:
        return float(value)
    if tp is int:
        return int(value)
    if typing.get_origin(tp) is tuple:
        return tuple(plain(typing.get_args(tp)[0], v) for v in value)
    return value


def path_argument(name: str, value: Any) -> str:
    """A folder or file argument (`name`: ``data``, ``out``) as a str; a ConfigError naming it when it is not a
    str or os.PathLike."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str):
            return text
    raise ConfigError(name, repr(value), f"expected str or os.PathLike, got {type(value).__name__}")


def close_names(name: str, fields: Mapping[str, tuple[Any, dataclasses.Field]]) -> list[str]:
    """Field names like `name`: the same name in other letter case, by spelling, or whose help text holds its
    words (learning_rate -> lr)."""
    same = [f for f in fields if f.lower() == name.lower()]
    if same:  # Lr -> lr, not the fields whose help mentions --lr
        return same
    lowered = {f.lower(): f for f in fields}
    spelled = [lowered[f] for f in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)]
    words = name.lower().replace("_", " ").replace("-", " ")
    described = [f for f, (_, fl) in fields.items() if words in str(fl.metadata.get("help", "")).lower()]
    return list(dict.fromkeys(spelled + described))[:3]


def check_keywords(fields: Mapping[str, tuple[Any, dataclasses.Field]], given: Mapping[str, Any],
                   elsewhere: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`given` with each value as its plain Python value (:func:`plain`), or a ConfigError naming the first
    unknown or mistyped keyword (with close names). `elsewhere` maps names that belong to another command
    to what to say instead of "not a config field" (``ft_blocks``: "is a sweep option (...), not a probe field")."""
    checked = {}
    for name, value in given.items():
        if name not in fields:
            near = close_names(name, fields)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise ConfigError(name, value, f"{(elsewhere or {}).get(name, 'not a config field')}{hint}")
        tp = fields[name][0]
        if not fits(tp, value):
            raise ConfigError(name, repr(value), f"expected {type_text(tp)}, got {type(value).__name__}")
        checked[name] = plain(tp, value)
    return checked


def field_doc(fields: dict[str, tuple[Any, dataclasses.Field]]) -> str:
    """One docstring line per field: name, type, default and the help text of its flag."""
    lines = []
    for name, (tp, f) in fields.items():
        default = f.default if f.default is not dataclasses.MISSING else "required"
        text = str(f.metadata.get("help", ""))
        if f.metadata.get("invert"):  # the help describes the --no-... switch, which stores False
            text = f"False: {text} ({f.metadata.get('flag')})"
        lines.append(f"    {name} ({type_text(tp)}, default {default!r}): {text}")
    return "\n".join(lines)


def keyword_signature(func: Callable, fields: dict[str, tuple[Any, dataclasses.Field]], skip: tuple[str, ...] = ()) -> inspect.Signature:
    """`func`'s signature with ``**fields`` replaced by one keyword-only parameter per config field."""
    sig = inspect.signature(func)
    positional = [p for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    taken = {p.name for p in positional} | set(skip)
    keywords = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=type_text(tp))
                for n, (tp, f) in fields.items() if n not in taken and f.default is not dataclasses.MISSING]
    return sig.replace(parameters=positional + keywords)
