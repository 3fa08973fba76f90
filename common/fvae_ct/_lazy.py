"""Lazy submodule access for packages used from bundle configs (``fvae_ct.recon.analysis.X`` after ``import fvae_ct``)."""

from __future__ import annotations

import importlib


def lazy_submodules(package: str):
    """A module ``__getattr__`` that imports ``<package>.<name>`` on first attribute access."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise  # the submodule exists but one of its own imports is missing: say which
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from e

    return __getattr__
