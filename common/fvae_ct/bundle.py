"""Find and run the fvae-ct bundles with MONAI's bundle runner (used by the ``fvae`` command, the ablation
runner and the VAE comparison)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["bundle_dir", "bundle_version", "run_bundle", "check_command_line"]

_PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def bundle_dir(name: str) -> Path:
    """Folder of bundle ``name``: ``$FVAE_BUNDLES/<name>``, the bundle this package is vendored in (an unpacked
    archive holds ``<name>/fvae_ct``), or ``<repository>/bundles/<name>``."""
    roots = [Path(p) / name for p in os.environ.get("FVAE_BUNDLES", "").split(os.pathsep) if p]
    if _PACKAGE_PARENT.name == name:
        roots.append(_PACKAGE_PARENT)
    roots.append(_PACKAGE_PARENT.parent / "bundles" / name)
    for r in roots:
        if (r / "configs").is_dir():
            return r
    raise FileNotFoundError(
        f"bundle '{name}' not found in {[str(r) for r in roots]}; set FVAE_BUNDLES to the folder holding the "
        "fvae-ct bundles"
    )


def bundle_version(name: str, bundle_root: str | os.PathLike | None = None) -> str:
    """``"<name> <version>"`` of a bundle, the version read from ``<bundle_root>/configs/metadata.json`` (the bundle
    being run), else from :func:`bundle_dir`'s; ``"<name>"`` alone when neither can be read. Names the software in
    the outputs it derives (e.g. the DerivationDescription of a derived DICOM series)."""
    import json

    roots = [Path(bundle_root)] if bundle_root is not None else []
    try:
        roots.append(bundle_dir(name))
    except FileNotFoundError:
        pass
    for r in roots:
        try:
            version = json.loads((r / "configs" / "metadata.json").read_text())["version"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return f"{name} {version}"
    return name


def run_bundle(name: str, config: str | list[str] = "inference.yaml", run_id: str | None = None, **overrides) -> None:
    """Run ``<bundle>/configs/<config>`` (a file or a list layered in order) with MONAI's bundle runner;
    ``None`` overrides are left out; ``bundle_root`` defaults to the bundle's folder.

    Every string among the overrides (paths, case names, options; also inside lists and dicts) reaches MONAI as a
    literal (:func:`fvae_ct.options.literal`): a file named ``$__import__('os')...`` is a file name, not code.
    """
    from monai.bundle import run

    from .options import literal_overrides

    root = bundle_dir(name)
    configs = [str(root / "configs" / c) for c in ([config] if isinstance(config, str) else config)]
    overrides = {"bundle_root": str(root), **{k: v for k, v in overrides.items() if v is not None}}
    overrides = {k: literal_overrides(v) for k, v in overrides.items()}
    run(
        run_id=run_id,
        config_file=configs,
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        **overrides,
    )


# options of `python -m monai.bundle run` itself (not config overrides)
_RUNNER_OPTIONS = {
    "config_file", "meta_file", "logging_file", "run_id", "init_id", "final_id", "args_file", "tracking",
    "workflow_type", "workflow_name", "properties_path", "bundle_root",
}  # fmt: skip
# overrides that are free text, never config syntax
_TEXT_OPTIONS = {"report"}
_SYNTAX = {"$": "run as Python", "@": "resolved as a reference to another config entry", "%": "loaded as a macro"}


def _runner_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``(key, raw value)`` of the ``--key value`` / ``--key=value`` overrides of a ``monai.bundle run`` argv."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and len(a) > 2:
            key, eq, val = a[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            if eq or val:
                out.append((key.replace("-", "_"), val))
        i += 1
    return out


def check_command_line(argv: list[str] | None = None) -> None:
    """Refuse, before MONAI evaluates anything, a ``python -m monai.bundle run`` override that MONAI's config syntax
    would turn into something else than the user's string (every bundle's ``run`` calls this first).

    MONAI runs a value starting with ``$`` as Python, resolves ``@`` as a reference and ``%`` as a macro, and rewrites
    ``#`` to ``::`` in any string. So: a value starting with ``$``, ``@`` or ``%`` that names an existing file or
    folder (a path, not an expression), any ``--report`` starting with them, and any plain value holding ``#`` stop
    with an :class:`~fvae_ct.errors.OptionError` listing them. Expressions that are not paths are the user's own
    config code and are left alone. Also installs :func:`fvae_ct.checked_io.install_one_line_errors` (an fvae-ct
    error ends the run in one line, without MONAI's traceback). A no-op outside ``python -m monai.bundle`` (the
    ``fvae`` command passes every string as a literal, see :func:`fvae_ct.options.literal`).
    """
    from .errors import OptionError

    argv = sys.argv if argv is None else argv
    if not argv or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py"):
        return
    from .checked_io import install_one_line_errors

    install_one_line_errors("python -m monai.bundle run")  # bad input: one line naming the file, no traceback
    problems = []
    for key, val in _runner_overrides(argv[1:]):
        if key in _RUNNER_OPTIONS:
            continue
        if val[:1] in _SYNTAX and (key in _TEXT_OPTIONS or os.path.lexists(val)):
            what = "text" if key in _TEXT_OPTIONS else ("a folder" if os.path.isdir(val) else "a file")
            fix = "put it in a .txt file and pass its path" if key in _TEXT_OPTIONS else f"pass it as ./{val}"
            problems.append(f"--{key} {val!r} is {what}, but MONAI would have it {_SYNTAX[val[0]]}: {fix}")
        elif "#" in val and val[:1] not in _SYNTAX:
            problems.append(
                f"--{key} {val!r}: MONAI rewrites '#' in config strings (it would read {val.replace('#', '::')!r})"
            )
    if problems:
        raise OptionError(
            "python -m monai.bundle run: "
            + "; ".join(problems)
            + ". The fvae command takes any file name and text as given."
        )
