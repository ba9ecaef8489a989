"""Lazy package attributes: a facade names what it exports and the module each comes from; the module is
imported on first use, so importing the package stays light (no jax import).

    _LAZY = {"load_pretrained": "readme_jax.convert.load"}
    __all__ = list(_LAZY)
    __getattr__ = lazy_getattr(__name__, _LAZY)
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_getattr(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``name`` -> ``getattr(import_module(table[name]), name)``."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
