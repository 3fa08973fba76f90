"""Build self-contained bundle archives: ``dist/<bundle>_v<version>.zip`` (``make bundles``).

Each archive holds one folder ``<bundle>/`` with what is in ``bundles/<bundle>/`` in git (configs, docs,
LICENSE, large_files.yml) plus the code the bundle needs, vendored from the one source ``common/fvae_ct``:
the shared core and the subpackages named in :data:`NEEDS`, as ``<bundle>/fvae_ct/``. A site that downloads
one archive runs it with ``python -m monai.bundle run`` and the packages its metadata lists: MONAI puts the
bundle folder on ``sys.path`` (``ConfigWorkflow.run``; the model-zoo CI and MONAI Label do the same), so the
configs' ``import fvae_ct`` finds the vendored copy; in the repository it finds the installed package. The same
configs serve both, unedited.

The archives are reproducible: sorted entries, fixed timestamps, no caches.

    python tools/build_bundles.py [--out dist] [--bundles fvae_recon,fvae_ldm] [--unpack DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "common" / "fvae_ct"

#: subpackages of fvae_ct each bundle runs, beside the core (fvae_aug_seg's ``prepare`` runs the recon workflow)
NEEDS = {"fvae_recon": ["recon"], "fvae_aug_seg": ["aug_seg", "recon"], "fvae_ldm": ["ldm"]}
#: bundle subpackages (never part of the core)
WORKFLOW_PACKAGES = {"recon", "aug_seg", "ldm"}
#: core modules that no bundle runs: the ``fvae`` command and test helpers
NOT_VENDORED = {"cli.py", "testing.py"}
_EPOCH = (2024, 1, 1, 0, 0, 0)


def _skip(p: Path) -> bool:
    return "__pycache__" in p.parts or p.suffix in (".pyc", ".pyo") or p.name.startswith(".")


def bundle_files(bundle: str) -> list[tuple[Path, str]]:
    """(source file, archive name) pairs of one bundle, sorted by archive name."""
    src = REPO / "bundles" / bundle
    if not (src / "configs" / "metadata.json").is_file():
        raise SystemExit(f"{src}: not a bundle (no configs/metadata.json)")
    if bundle not in NEEDS:
        raise SystemExit(f"{bundle}: add it to NEEDS in {Path(__file__).name} (which fvae_ct subpackages it runs)")
    files = [(p, f"{bundle}/{p.relative_to(src).as_posix()}") for p in src.rglob("*") if p.is_file() and not _skip(p)]
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE)
        if _skip(rel):
            continue
        top = rel.parts[0]
        if len(rel.parts) == 1 and top in NOT_VENDORED:
            continue
        if top in WORKFLOW_PACKAGES and top not in NEEDS[bundle]:
            continue
        files.append((p, f"{bundle}/fvae_ct/{rel.as_posix()}"))
    return sorted(files, key=lambda f: f[1])


def build(bundle: str, out: Path) -> Path:
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{bundle}_v{meta['version']}.zip"
    tmp = dest.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for src, name in bundle_files(bundle):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, src.read_bytes())
    tmp.replace(dest)
    return dest


def unpack(archive: Path, dest: Path, large_files: bool = True) -> Path:
    """Unpack an archive into ``dest`` (-> ``dest/<bundle>``) and, with ``large_files``, put every file its
    ``large_files.yml`` names where MONAI's ``download_large_files`` would, taken from ``$FVAE_ASSETS`` (looked up
    by upstream URL; this machine cannot download). Returns the bundle folder."""
    import shutil

    import yaml

    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)
        bundle = dest / z.namelist()[0].split("/")[0]
    if large_files:
        from fvae_ct.assets import ASSETS, search_path

        by_url = {a.url: a for a in ASSETS.values()}
        for item in yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]:
            asset = by_url[item["url"]]
            src = next((p / asset.relpath for p in search_path() if (p / asset.relpath).is_file()), None)
            if src is None:
                raise SystemExit(f"{asset.relpath}: not in FVAE_ASSETS; set it to the shared assets folder")
            (bundle / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, bundle / item["path"])
    return bundle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "dist"))
    ap.add_argument("--bundles", default=",".join(NEEDS))
    ap.add_argument("--unpack", metavar="DIR", help="also unpack each archive into DIR, with its large files")
    a = ap.parse_args(argv)
    for b in [b for b in a.bundles.split(",") if b]:
        dest = build(b, Path(a.out))
        with zipfile.ZipFile(dest) as z:
            names = z.namelist()
        code = sum(n.endswith(".py") for n in names)
        print(f"{dest}: {len(names)} files ({code} vendored .py), {dest.stat().st_size / 1024:.0f} KiB")
        if a.unpack:
            print(f"  unpacked: {unpack(dest, Path(a.unpack))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
