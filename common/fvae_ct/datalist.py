"""One datalist reader: JSON list or MSD-style dict -> items with absolute paths, or one :class:`InputError` line."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError

__all__ = ["read_datalist", "read_json", "PATH_KEYS", "CASE_SECTIONS"]

#: the keys of a datalist item that hold paths (made absolute)
PATH_KEYS = ("image", "label", "image_recon")
#: the sections of an MSD-style dict whose items are the cases to process (reconstruct, segment), first found used
CASE_SECTIONS = ("testing", "test", "validation", "training", "data")


def _absolute(v, base: str):
    if isinstance(v, (list, tuple)):
        return [_absolute(x, base) for x in v]
    return os.path.abspath(v if os.path.isabs(str(v)) else os.path.join(base, str(v)))


def read_json(path, what: str = "JSON file"):
    """The content of a JSON file; a missing or malformed one is an :class:`InputError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, f"{what} does not exist")
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(p, f"not valid JSON ({' '.join(str(e).split())})") from e


def read_datalist(
    path,
    sections: Sequence[str] = ("training",),
    required_keys: Sequence[str] = ("image",),
    base_dir=None,
    check_files: bool = True,
    optional: bool = False,
) -> list[dict]:
    """The items of the datalist JSON ``path``: a list of items, or a dict holding them under the first of
    ``sections`` it has. A plain string item is ``{"image": it}``. Path keys (:data:`PATH_KEYS`) are made absolute
    against ``base_dir`` (default: the JSON's folder). Raises :class:`InputError` naming the file (one line): missing
    or malformed JSON, none of ``sections`` (``optional``: ``[]`` instead), an item that is not an object or lacks one
    of ``required_keys``, a listed file that does not exist (``check_files``)."""
    p = Path(path)
    data = read_json(p, "datalist JSON")
    if isinstance(data, dict):
        key = next((k for k in sections if k in data), None)
        if key is None:
            if optional:
                return []
            raise InputError(p, f"datalist JSON needs a list of {{'image', ...}} items under '{sections[0]}'")
        data = data[key]
    if not isinstance(data, list):
        raise InputError(p, "datalist JSON must be a list of {'image', ...} items or an MSD-style dict of lists")
    base = str(base_dir) if base_dir else str(p.parent)
    items = []
    for i, it in enumerate(data):
        it = {"image": it} if isinstance(it, str) else it
        if not isinstance(it, dict) or any(not isinstance(it.get(k), (str, list)) for k in required_keys):
            need = " and ".join(f"'{k}'" for k in required_keys)
            raise InputError(p, f"item {i} needs {need} path(s), got {it!r}"[:300])
        it = {k: (_absolute(v, base) if k in PATH_KEYS and v else v) for k, v in it.items()}
        if check_files:
            for k in PATH_KEYS:
                v = it.get(k)
                for f in v if isinstance(v, list) else [v] if v else []:
                    if not os.path.exists(f):
                        raise InputError(f, f"does not exist (item {i} '{k}' of {p})")
        items.append(it)
    return items
