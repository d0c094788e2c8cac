"""Command-line flags and YAML keys generated from the config dataclasses' fields.

Each config field declares its help text, default and (optionally) its flag name once, with
``utils.option``; this module turns those declarations into argparse flags, reads YAML keys with the
same names, and builds the configs by field name. A new field costs one line plus its use.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transferlab.core.errors import ConfigError, UserError
from transferlab.core.fields import build_config

__all__ = ["Flag", "add_flags", "build_config", "config_flags", "field_values", "flag_text", "help_text"]


@dataclass(frozen=True)
class Flag:
    """One config field as a command-line flag (and a YAML key: the flag without dashes, '-' -> '_')."""

    field: str
    flag: str
    kind: str  # "bool" | "list" | "value" | "mapping" | "pairs" (a repeatable NAME=VALUE)
    base: Callable[[Any], Any]  # element type of a list, the type of a value (or a parser)
    invert: bool
    choices: tuple[str, ...] | None
    help: str
    default: Any

    @property
    def key(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def parse(self, raw: Any) -> Any:
        """The field's value from a flag string or a YAML value."""
        if self.kind == "bool":
            items = raw if isinstance(raw, (list, tuple)) and raw else [raw]  # a YAML list of booleans: a grid axis
            if not all(isinstance(v, bool) for v in items):
                raise UserError(f"{self.flag} {raw}: expected true or false")
            values = tuple(not v if self.invert else v for v in items)
            return values if isinstance(raw, (list, tuple)) else values[0]
        if self.kind == "list":
            items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
            try:
                return tuple(self._one(v) for v in items if str(v).strip() != "")
            except ValueError:
                raise UserError(f"{self.flag} {raw}: expected a comma list of {self.base.__name__} values") from None
        if raw is None:
            return None
        if self.kind == "pairs":
            if isinstance(raw, dict):  # YAML
                return {str(k): str(v) for k, v in raw.items()}
            items = [raw] if isinstance(raw, str) else list(raw)
            pairs = [(str(s).partition("=")[0].strip(), str(s).partition("=")[2].strip(), str(s)) for s in items]
            bad = next((s for name, value, s in pairs if "=" not in s or not name or not value), None)
            if bad is not None:
                raise UserError(f"{self.flag} {bad}: expected NAME=VALUE")
            names = [name for name, _v, _s in pairs]
            twice = next((n for n in names if names.count(n) > 1), None)
            if twice is not None:
                raise UserError(f"{self.flag} {twice}=...: given more than once")
            return {name: value for name, value, _s in pairs}
        if self.kind == "mapping":
            if isinstance(raw, str):
                import json

                try:
                    raw = json.loads(raw)
                except ValueError:
                    raise UserError(f"{self.flag} {raw}: expected a JSON object") from None
            if not isinstance(raw, dict):
                raise UserError(f"{self.flag} {raw}: expected a mapping")
            return raw
        try:
            return self._one(raw)
        except ValueError:
            raise UserError(f"{self.flag} {raw}: expected a {self.base.__name__} value") from None

    def _one(self, v: Any) -> Any:
        value = str(v).strip() if self.base is str else self.base(str(v).strip())
        if self.choices and value not in self.choices:
            raise UserError(f"{self.flag} {value}: expected one of {', '.join(self.choices)}")
        return value


def _unwrap(tp: Any) -> tuple[str, type]:
    """('bool'|'list'|'value', element or value type) of a field annotation."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return "bool", bool
    if typing.get_origin(tp) is tuple:
        return "list", typing.get_args(tp)[0]
    if typing.get_origin(tp) is dict:
        return "mapping", dict
    return "value", tp


def config_flags(cls: type, exclude: tuple[str, ...] = ()) -> list[Flag]:
    """The flags of `cls`'s own (non-dataclass) fields."""
    hints = typing.get_type_hints(cls)
    flags = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or dataclasses.is_dataclass(hints[f.name]):
            continue
        kind, base = _unwrap(hints[f.name])
        meta = f.metadata
        kind = "pairs" if meta.get("pairs") else kind
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        flags.append(Flag(f.name, flag, kind, base, bool(meta.get("invert")), meta.get("choices"), meta.get("help", ""), f.default))
    return flags


def add_flags(group: argparse._ActionsContainer, flags: list[Flag], suppress: bool = False,
              required: tuple[str, ...] = ()) -> None:
    """Add `flags` to an argparse group; with `suppress`, a flag not given leaves no value (YAML may give it)."""
    for fl in flags:
        kw: dict[str, Any] = {"dest": fl.key}
        if fl.field in required:
            kw["required"] = True
        if fl.kind == "bool":
            kw["action"] = "store_true"
            kw["help"] = fl.help
        elif fl.kind == "pairs":
            kw.update(action="append", help=fl.help, metavar="NAME=VALUE")
        else:
            kw["help"] = help_text(fl)
            if fl.choices and fl.kind != "list":  # a list's items are checked one by one (Flag.parse)
                kw["choices"] = fl.choices
            kw["metavar"] = "LIST" if fl.kind == "list" else None
        kw["default"] = argparse.SUPPRESS if suppress else (False if fl.kind == "bool" else None)
        group.add_argument(fl.flag, **kw)


def help_text(fl: Flag) -> str | None:
    """`fl`'s help with its default appended, unless there is none to show or the help already says it."""
    if not fl.help:
        return None
    shown = ",".join(map(str, fl.default)) if fl.kind == "list" and fl.default is not None else fl.default
    if shown in (None, "") or "default" in fl.help:
        return fl.help
    return f"{fl.help} (default: {shown})"


def field_values(flags: list[Flag], given: dict[str, Any]) -> dict[str, Any]:
    """{field name: typed value} for the flags present in `given` (keyed by flag key; None means not given)."""
    out = {}
    for fl in flags:
        raw = given.get(fl.key)
        if raw is None or raw is False:  # not given (a false switch is the field's default)
            continue
        out[fl.field] = fl.parse(raw)
    return out


def flag_text(error: ConfigError, flags: list[Flag]) -> str:
    """A ConfigError as the user typed it: ``--lr -1.0: must be a positive number``."""
    by_field = {fl.field: fl.flag for fl in flags}
    flag = by_field.get(error.field, "--" + error.field.replace("_", "-"))
    return f"{flag} {error.value}: {error.reason}"
