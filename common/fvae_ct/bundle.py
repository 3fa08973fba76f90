"""Find and run the fvae-ct bundles with MONAI's bundle runner (used by the ``fvae`` command, the ablation
runner and the VAE comparison)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["bundle_dir", "run_bundle"]

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
