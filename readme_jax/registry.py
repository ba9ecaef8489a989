"""Named registries: one decorator puts a class under its name with its options dataclass; every CLI, help
text, benchmark and test reads the names and options from here.

    SCHEDULERS = Registry("scheduler")

    @dataclasses.dataclass(frozen=True)
    class ExpertAwareOptions:
        max_wait: int = 8                       # validated in __post_init__ (raise ConfigError)

    @SCHEDULERS.register("expert-aware", ExpertAwareOptions)
    class ExpertAware:
        def __init__(self, options: ExpertAwareOptions = ExpertAwareOptions()): ...

    SCHEDULERS.make("expert-aware", max_wait=4)      # ExpertAware(ExpertAwareOptions(max_wait=4))
    SCHEDULERS.names()                               # registration order

An entry is built from its options: ``cls(options)``; a class registered without an options dataclass takes
none (``cls()``), and a frozen dataclass registered with ``options=SELF`` is its own options (``cls(**opts)``,
e.g. a dispatcher). The entry's ``name`` attribute is set to its registered name. An unknown name, an unknown
option or a bad value raises :class:`~readme_jax.errors.ConfigError` naming the registry, the entry and what
it accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterator, Mapping

from readme_jax.errors import ConfigError

#: ``register(name, SELF)``: the class is a (frozen) dataclass whose fields are its options.
SELF = object()


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of an entry that takes none."""


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    options: type            # a dataclass; ``cls`` itself for a SELF entry
    help: str                # the first sentence of the class docstring


class Registry:
    """Names -> classes of one kind (``kind`` names it in messages and CLI help)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._dest = kind.replace(" ", "_").replace("-", "_") + "_opt_"
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, options: Any = NoOptions):
        """Class decorator: register the class under ``name`` with its ``options`` dataclass (see the module
        docstring). A name registered twice is refused."""

        def add(cls):
            if name in self._entries:
                raise ConfigError(f"{self.kind} {name!r} is registered twice "
                                  f"({self._entries[name].cls.__qualname__} and {cls.__qualname__})")
            opts = cls if options is SELF else options
            if not dataclasses.is_dataclass(opts):
                raise TypeError(f"{self.kind} {name!r}: options must be a dataclass, got {opts!r}")
            cls.name = name
            para = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
            self._entries[name] = Entry(name, cls, opts, para.split(". ")[0].rstrip("."))
            return cls

        return add

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise ConfigError(f"{self.kind} {name!r} is unknown; known: {list(self._entries)}")
        return self._entries[name]

    def option_names(self, name: str) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.entry(name).options))

    def options(self, name: str, **opts) -> Any:
        """``name``'s options dataclass built from ``opts`` (unknown keys or a bad value: ConfigError)."""
        e = self.entry(name)
        unknown = sorted(set(opts) - set(self.option_names(name)))
        if unknown:
            raise ConfigError(f"{self.kind} {name!r}: unknown option(s) {unknown}; "
                              f"it takes {list(self.option_names(name)) or 'none'}")
        try:
            return e.options(**opts)
        except (TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"{self.kind} {name!r}: bad options {opts} ({err})") from None

    def make(self, name: str, **opts) -> Any:
        """A new instance of ``name`` built from its options ``opts``."""
        e = self.entry(name)
        o = self.options(name, **opts)
        if e.options is e.cls:
            return o
        return e.cls() if e.options is NoOptions else e.cls(o)

    def own_options(self, name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The items of ``settings`` that are ``name``'s options (the others belong to other entries: a
        benchmark's or config's settings for every entry at once)."""
        own = set(self.option_names(name))
        return {k: v for k, v in settings.items() if k in own}

    def make_from(self, name: str, settings: Mapping[str, Any]) -> Any:
        """``make(name, **own_options(name, settings))``."""
        return self.make(name, **self.own_options(name, settings))

    def help(self) -> str:
        """One line per entry: ``name (options): first docstring sentence``."""
        return "; ".join(f"{e.name}" + (f" ({', '.join(self.option_names(e.name))})" if self.option_names(e.name)
                                        else "") + (f": {e.help}" if e.help else "") for e in self._entries.values())

    # ------------------------------------------------------------------------------------------------ CLI
    def add_cli(self, parser: argparse.ArgumentParser, flag: str, default: str, *, prefix: str = "") -> None:
        """``--FLAG NAME`` (choices: the registry) and one ``--PREFIX-OPTION`` flag per option of any entry
        (default: the entry's own default; given for an entry that does not take it: ConfigError in
        :meth:`from_cli`)."""
        parser.add_argument(f"--{flag}", default=default, choices=self.names(),
                            help=f"{self.kind}: {self.help()}")
        seen: dict[str, list[str]] = {}
        for e in self._entries.values():
            for f in dataclasses.fields(e.options):
                seen.setdefault(f.name, []).append(e.name)
        for opt, owners in seen.items():
            f = next(f for f in dataclasses.fields(self.entry(owners[0]).options) if f.name == opt)
            parser.add_argument(f"--{prefix}{opt.replace('_', '-')}", dest=self._dest + opt,
                                default=argparse.SUPPRESS, type=_cli_type(f), metavar=opt.upper(),
                                help=f"{self.kind} option of {', '.join(owners)}"
                                     f" (default {_default(f)!r})")

    def from_cli(self, args: argparse.Namespace, flag: str) -> tuple[str, dict[str, Any]]:
        """(the chosen name, the options given on the command line); an option of another entry: ConfigError."""
        name = getattr(args, flag.replace("-", "_"))
        given = {k[len(self._dest):]: v for k, v in vars(args).items() if k.startswith(self._dest)}
        self.options(name, **given)               # validates now: one line before anything is loaded
        return name, given


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _cli_type(f: dataclasses.Field):
    """bool / int / float / str from the default's type, else the annotation (``int | None`` -> int)."""
    d, ann = _default(f), str(getattr(f.type, "__name__", f.type))
    for t in (bool, int, float):                 # bool first: it is an int
        if (d is not None and type(d) is t) or (d is None and ann.split("|")[0].strip() == t.__name__):
            return _parse_bool if t is bool else t
    return str


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
