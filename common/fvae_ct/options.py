"""User-given option values, parsed strictly, and user strings kept away from MONAI's config evaluator."""

from __future__ import annotations

from .errors import OptionError

__all__ = ["parse_bool", "literal", "literal_overrides"]

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(value, name: str = "option") -> bool:
    """``True``/``False`` from a bool, 0/1, or (any case) ``true/false``, ``1/0``, ``yes/no``, ``on/off``.

    Anything else is an error naming the option: a command line passes ``false`` as the non-empty (truthy) string
    ``'false'``, so ``bool(value)`` would turn it into ``True``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise OptionError(f"{name}: expected true or false (1/0, yes/no), got {value!r}")


def literal(s: str) -> str:
    """A MONAI config expression that evaluates to exactly ``s``.

    MONAI runs a string starting with ``$`` as Python, treats ``@`` as a reference and ``%`` as a macro, and
    rewrites ``#`` (even inside expressions), so a user's path, case name or report text must never be passed as
    a plain config string. The expression carries ``s`` hex-encoded: no character of ``s`` reaches the evaluator.
    """
    return f"$bytes.fromhex('{s.encode('utf-8').hex()}').decode('utf-8')"


def literal_overrides(value):
    """``value`` with every string (also inside lists, tuples and dicts) replaced by :func:`literal`."""
    if isinstance(value, str):
        return literal(value)
    if isinstance(value, dict):
        return {k: literal_overrides(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [literal_overrides(v) for v in value]
    return value
