"""User-given option values, parsed strictly, and user strings kept away from MONAI's config evaluator."""

from __future__ import annotations

import re

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
    """A MONAI config value that MONAI reads back as exactly ``s``, and that its run log shows readably.

    MONAI runs a string starting with ``$`` as Python, treats ``@`` as a reference and ``%`` as a macro, and
    rewrites ``#`` (and a relative id such as ``@::`` or ``%::``) anywhere in a string, so a user's path, case
    name or report text must never be passed as such a config string. A string free of all that is data to MONAI
    and passes unchanged (a path, a case name, plain text). Any other becomes a ``$``-expression that is just a
    Python string literal in which every character MONAI acts on inside an expression (``@ % #``), the quote, the
    backslash and anything not printable is a ``\\xNN`` / ``\\uNNNN`` escape: no user character reaches the evaluator
    as syntax, and the log still shows the text (``$'$__import__(\\x27os\\x27)...'``, ``$'runs/a\\x23b'``).
    """
    if not s.startswith(_MONAI_PREFIXES) and not _MONAI_REWRITES.search(s):
        return s
    return "$'" + "".join(c if c.isprintable() and c not in _ESCAPED else _escape(c) for c in s) + "'"


_MONAI_PREFIXES = ("$", "@", "%")
_MONAI_REWRITES = re.compile(r"#|[@%]::")  # MONAI normalises '#' to '::', then resolves relative ids '@::' / '%::'
_ESCAPED = set("@%#\\'")


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else (f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")


def literal_overrides(value):
    """``value`` with every string (also inside lists, tuples and dicts) replaced by :func:`literal`."""
    if isinstance(value, str):
        return literal(value)
    if isinstance(value, dict):
        return {k: literal_overrides(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [literal_overrides(v) for v in value]
    return value
