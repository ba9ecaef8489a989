"""The generic YAML -> frozen-dataclass loader: type coercion, nested sections, merging, dotted overrides.

Nothing here knows the run's sections (:mod:`readme_jax.config.sections`); it reads a dataclass's type hints:

    build(TrainConfig, {"rounds": "3"}, "train")        # TrainConfig(rounds=3, ...)
    build(Config, data)                                  # nested dataclass fields are built recursively
    plain(cfg)                                           # back to plain dicts / lists (YAML-ready)

A field whose values are partly filled in by the program (e.g. the router's vocabulary size, which comes
from the model) declares them with ``dataclasses.field(..., metadata=filled_elsewhere("vocab_size", ...))``:
a config file may not set them and :func:`plain` leaves them out. Every failure is a
:class:`readme_jax.errors.ConfigError` naming the dotted key, what was expected and what was found.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from typing import Any, Callable, Mapping

import yaml

from readme_jax.errors import ConfigError

_FILLED = "readme_jax_filled_elsewhere"


def filled_elsewhere(*names: str) -> dict[str, tuple[str, ...]]:
    """Field metadata: the nested dataclass's fields ``names`` are set by the program, not the config."""
    return {_FILLED: names}


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def build(cls: type, data: Mapping[str, Any] | None, key: str = "", *, omit: tuple[str, ...] = (),
          checks: Mapping[str, Callable[[str, Any], None]] | None = None) -> Any:
    """An instance of dataclass ``cls`` from a (YAML) mapping; missing keys keep their defaults.

    ``key`` is the dotted name of the section (for messages); ``omit`` are fields the config may not set;
    ``checks`` maps a dotted key to ``check(key, value)``, run on the coerced value (defaults included)
    before the dataclass is built (ranges a dataclass does not check itself).
    """
    data = {} if data is None else data
    what = f"section {key}" if key else "the config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in omit}
    filled = [_join(key, k) for k in data if k in omit]
    if filled:
        raise ConfigError(f"{', '.join(filled)}: set by the program (from the model or the data), "
                          "not by the config")
    unknown = [_join(key, k) for k in data if k not in fields]
    if unknown:
        kind = "key(s)" if key else "section(s)"
        raise ConfigError(f"unknown {kind} {unknown}; known in {what}: {sorted(fields)}")
    kwargs = {k: coerce(_join(key, k), v, hints[k], omit=fields[k].metadata.get(_FILLED, ()), checks=checks)
              for k, v in data.items()}
    for name, f in fields.items():
        check = (checks or {}).get(_join(key, name))
        if check is not None:
            value = kwargs[name] if name in kwargs else (
                f.default if f.default is not dataclasses.MISSING else f.default_factory())
            if value is not None:
                check(_join(key, name), value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the dataclass's own checks (ConfigError is a ValueError)
        message = str(e)
        raise ConfigError(message if message.startswith(key) else f"{key}: {message}") from None


def coerce(key: str, value: Any, tp: Any, *, omit: tuple[str, ...] = (),
           checks: Mapping[str, Callable[[str, Any], None]] | None = None) -> Any:
    """``value`` (from YAML or an override) as type ``tp``; ConfigError naming ``key`` when it cannot be."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg, omit=omit, checks=checks)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, omit=omit, checks=checks)
    if tp is Any:
        return value
    if origin is tuple:
        return _coerce_tuple(key, value, typing.get_args(tp))
    if origin in (Mapping, dict, collections.abc.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
            if not f.is_integer():
                raise ValueError
            return int(f)
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)  # YAML reads 1e-3 as a string; float() takes it, and inf / nan
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if math.isnan(f):
            raise ConfigError(f"{key}: NaN is not a valid value")
        return f
    if tp is str:
        if isinstance(value, (Mapping, list, tuple)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _coerce_tuple(key: str, value: Any, args: tuple) -> tuple:
    """``tuple[X, ...]`` (a list; a mapping for pairs ``tuple[tuple[K, V], ...]`` gives its sorted items)
    or a fixed ``tuple[X, Y]``. A string ``"[a, b]"`` (an override) is split at commas."""
    variadic = len(args) == 2 and args[1] is Ellipsis
    if variadic and isinstance(value, Mapping) and typing.get_origin(args[0]) is tuple:
        value = sorted(value.items())
    if isinstance(value, str):
        value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if variadic:
        return tuple(coerce(key, v, args[0]) for v in value)
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
    return tuple(coerce(key, v, t) for v, t in zip(value, args))


def plain(x: Any, omit: tuple[str, ...] = ()) -> Any:
    """Dataclasses (less their fields filled elsewhere) -> dicts, tuples -> lists, recursively."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: plain(getattr(x, f.name), f.metadata.get(_FILLED, ()))
                for f in dataclasses.fields(x) if f.name not in omit}
    if isinstance(x, Mapping):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def merge(base: Mapping, over: Mapping) -> dict:
    """``over`` on top of ``base``: nested mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def apply_override(data: dict, item: str, sections: collections.abc.Collection[str]) -> dict:
    """Apply one ``a.b=value`` override (the value parsed as YAML) to a nested dict whose top-level keys
    are ``sections``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if parts[0] not in sections:
        raise ConfigError(f"override {item!r}: unknown section {parts[0]!r}; known: {sorted(sections)}")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node = nxt
    if len(parts) == 1 and isinstance(data.get(parts[0]), dict):
        raise ConfigError(f"override {item!r}: {parts[0]!r} is a section; name a key, e.g. {parts[0]}.<key>=...")
    node[parts[-1]] = value
    return data
