"""Exceptions with messages a user can act on: they always name the file (or option) and the problem."""

from __future__ import annotations


class FvaeError(Exception):
    """Base class of all fvae-ct errors."""


class InputError(FvaeError, ValueError):
    """An input volume cannot be used: missing, unreadable, wrong dimensionality, NaN/Inf, ..."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WeightsError(FvaeError, RuntimeError):
    """A weights file is missing, has a wrong SHA-256, or does not fit the architecture."""


class UnknownVAEError(FvaeError, KeyError):
    """A VAE name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])
