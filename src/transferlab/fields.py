"""Config fields seen from Python: keyword arguments checked by name and type, and documented, from the
same field declarations the command-line flags are generated from (``utils.option``)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from .utils import ConfigError


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
    """Whether `value` is a value of annotation `tp` (an int is a float; a list is a tuple of its items)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(fits(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return isinstance(value, (tuple, list)) and all(fits(item, v) for v in value)
    if typing.get_origin(tp) is dict:
        return isinstance(value, dict)
    return isinstance(value, tp) if isinstance(tp, type) else True


def close_names(name: str, fields: dict[str, tuple[Any, dataclasses.Field]]) -> list[str]:
    """Field names like `name`: by spelling, or whose help text holds its words (learning_rate -> lr)."""
    spelled = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.6)
    words = name.lower().replace("_", " ").replace("-", " ")
    described = [f for f, (_, fl) in fields.items() if words in str(fl.metadata.get("help", "")).lower()]
    return list(dict.fromkeys(spelled + described))[:3]


def check_keywords(fields: dict[str, tuple[Any, dataclasses.Field]], given: dict[str, Any]) -> None:
    """A ConfigError naming the first unknown or mistyped keyword of `given` (with close names)."""
    for name, value in given.items():
        if name not in fields:
            near = close_names(name, fields)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise ConfigError(name, value, f"not a config field{hint}")
        tp = fields[name][0]
        if not fits(tp, value):
            raise ConfigError(name, repr(value), f"expected {type_text(tp)}, got {type(value).__name__}")


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
