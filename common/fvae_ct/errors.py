"""Exceptions with messages a user can act on: they always name the file (or option) and the problem."""

from __future__ import annotations


class FvaeError(Exception):
    """Base class of all fvae-ct errors."""


class InputError(FvaeError, ValueError):
    """An input volume cannot be used: missing, unreadable, wrong dimensionality, NaN/Inf, ..."""

    def __init__(self, path, problem: str | None = None):
        # one argument: the whole message (how torch's DataLoader workers re-raise an exception in the main process)
        self.path = str(path)
        self.problem = problem
        super().__init__(path, problem)

    def __str__(self) -> str:
        return self.path if self.problem is None else f"{self.path}: {self.problem}"


class OptionError(FvaeError, ValueError):
    """An option value that cannot be used (the message names the option and the value)."""


class BatchFailure(FvaeError, RuntimeError):  # noqa: N818 - the name users know
    """Some cases of a batch failed (the others were processed); the message lists them."""


class WeightsError(FvaeError, RuntimeError):
    """A weights file is missing, has a wrong SHA-256, or does not fit the architecture."""


class UnknownVAEError(FvaeError, KeyError):
    """A VAE name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def user_error(e: BaseException) -> BaseException | None:
    """The fvae-ct error (or missing file) behind ``e``, following the causes MONAI wraps config errors in;
    ``None`` for anything else (a bug, which should surface with its traceback)."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, (FvaeError, FileNotFoundError)):
        cause = cause.__cause__
    return cause
