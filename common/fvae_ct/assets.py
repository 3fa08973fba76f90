"""Named weights and sample data: search path, user cache, download with a SHA-256 check.

Resolution order for a named asset (see ``ASSETS``):

1. every folder in ``$FVAE_ASSETS`` (colon-separated), at the asset's relative path;
2. the user cache ``$FVAE_CACHE`` or ``~/.cache/fvae_ct``;
3. the upstream address, downloaded into the cache with a progress bar and a SHA-256 check
   (only when ``download=True``; tests never download).

Every file found is checked against its SHA-256 before use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .errors import WeightsError

__all__ = ["Asset", "ASSETS", "resolve", "search_path", "cache_dir", "sha256", "sample_ct", "weights_file",
           "load_checkpoint"]

_TAESD_COMMIT = "5cccb12dc72074a4be35680c3b108548a7c69978"
_TOTALSEG_COMMIT = "0e65a448d557382b1e925276212b3bec7f5aff83"
_TAESD_URL = f"https://github.com/madebyollin/taesd/raw/{_TAESD_COMMIT}/"
_TOTALSEG_URL = f"https://github.com/wasserth/TotalSegmentator/raw/{_TOTALSEG_COMMIT}/tests/reference_files/"
#: where the IV-VAE and LeanVAE checkpoints are published (their files carry no published SHA-256; they are
#: checked by loading them strictly into the architecture, see fvae_ct.vae.ivvae / fvae_ct.vae.leanvae).
IVVAE_PAGE = "https://modelscope.cn/models/wpy1999/iv-vae/files"
LEANVAE_PAGE = "https://huggingface.co/Yumic/LeanVAE"


@dataclass(frozen=True)
class Asset:
    """A named file: ``relpath`` inside an assets folder, its upstream ``url``, ``sha256`` and licence."""

    relpath: str
    url: str
    sha256: str
    licence: str


ASSETS: dict[str, Asset] = {
    "taef2_encoder": Asset(
        "weights/taef2_encoder.pth", _TAESD_URL + "taef2_encoder.pth",
        "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6", "MIT (madebyollin/taesd)"),
    "taef2_decoder": Asset(
        "weights/taef2_decoder.pth", _TAESD_URL + "taef2_decoder.pth",
        "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5", "MIT (madebyollin/taesd)"),
    "totalseg_ct_sm_3mm": Asset(
        "ct/totalseg_ct_sm_3mm.nii.gz", _TOTALSEG_URL + "example_ct_sm.nii.gz", "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb", "Apache-2.0 (TotalSegmentator)"),
    "totalseg_ct_sm_3mm_seg": Asset(
        "ct/totalseg_ct_sm_3mm_seg.nii.gz", _TOTALSEG_URL + "example_seg.nii.gz", "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d", "Apache-2.0 (TotalSegmentator)"),
    "totalseg_ct_3mm": Asset(
        "ct/totalseg_ct_3mm.nii.gz", _TOTALSEG_URL + "example_ct.nii.gz", "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1", "Apache-2.0 (TotalSegmentator)"),
    "chest_ct_1p5mm": Asset(
        "ct/chest_ct_1p5mm.nii.gz", _TOTALSEG_URL + "pulmonary_report/models/ct_cropped.nii.gz", "4da078fe43c9aa4d358903ac95105cea4fbe93b029474e4701bdde4db72126eb",
        "Apache-2.0 (TotalSegmentator)"),
    "aorta_ct_1p5mm": Asset(
        "ct/aorta_ct_1p5mm.nii.gz", _TOTALSEG_URL + "aorta_report/test_result/models/ct_cropped.nii.gz", "f776ecfa1326e7e21a8c30e5530f517c16f16a59a68fc06e8119cefc7c3b87a0",
        "Apache-2.0 (TotalSegmentator)"),
    "dicom_series_512_seg": Asset(
        "ct/dicom_series_512_seg.nii.gz", _TOTALSEG_URL + "example_seg_dicom.nii.gz", "98af7f6536c316ff9084054f20956cd3e28af376b81d582d269fbea2744878fc",
        "Apache-2.0 (TotalSegmentator)"),
}
for _z, _d in ((4, 64), (8, 64), (16, 64), (16, 96)):
    _f = f"ivvae_z{_z}_dim{_d}"
    ASSETS[_f] = Asset(f"weights/ivvae/{_f}.pth", f"https://modelscope.cn/models/wpy1999/iv-vae/resolve/master/{_f}.pth",
                       "", "MIT (ali-vilab/iv-vae)")
for _d in (4, 16):
    ASSETS[f"leanvae_dim{_d}"] = Asset(f"weights/leanvae/LeanVAE-dim{_d}.ckpt",
                                       f"{LEANVAE_PAGE}/resolve/main/LeanVAE-dim{_d}.ckpt", "", "MIT (Yumic/LeanVAE)")


def search_path() -> list[Path]:
    """Folders from ``$FVAE_ASSETS`` (colon-separated), existing ones only."""
    return [Path(p) for p in os.environ.get("FVAE_ASSETS", "").split(os.pathsep) if p and Path(p).is_dir()]


def cache_dir() -> Path:
    return Path(os.environ.get("FVAE_CACHE", Path.home() / ".cache" / "fvae_ct"))


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check(path: Path, asset: Asset, name: str) -> Path:
    if not asset.sha256:
        logging.getLogger(__name__).info("asset '%s' (%s) has no pinned SHA-256; validated by its loader", name, path)
    else:
        got = sha256(path)
        if got != asset.sha256:
            raise WeightsError(
                f"{path}: SHA-256 mismatch for asset '{name}': expected {asset.sha256}, got {got}. "
                f"The file is corrupt or not the expected release; delete it or fix FVAE_ASSETS "
                f"(upstream: {asset.url})."
            )
    return path


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, os.fdopen(fd, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for block in iter(lambda: r.read(1 << 16), b""):
                    f.write(block)
                    bar.update(len(block))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve(name: str, download: bool = False) -> Path:
    """Path of the named asset, hash-checked. Raises :class:`WeightsError` naming every place searched."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset '{name}'; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    places = [*search_path(), cache_dir()]
    for folder in places:
        p = folder / asset.relpath
        if p.is_file():
            return _check(p, asset, name)
    dest = cache_dir() / asset.relpath
    if download:
        try:
            _download(asset.url, dest)
        except OSError as e:  # URLError, timeouts, no network
            raise WeightsError(
                f"asset '{name}' ({asset.relpath}) not found in {[str(p) for p in places]} and the download from "
                f"{asset.url} failed ({e}). Set FVAE_ASSETS to a folder holding it, or copy it into {dest.parent}."
            ) from e
        return _check(dest, asset, name)
    raise WeightsError(
        f"asset '{name}' ({asset.relpath}) not found in {[str(p) for p in places]}. Set FVAE_ASSETS to a folder "
        f"holding it, or allow the download from {asset.url}."
    )


def weights_file(name: str, weights: str | os.PathLike | None = None, page: str = "") -> Path:
    """A checkpoint file: ``weights`` itself; for a folder, the named asset's file name inside it; for ``None``,
    the named asset (search path, cache, download). Raises :class:`WeightsError` naming the missing file."""
    if weights is None:
        return resolve(name, download=True)
    p = Path(weights)
    fname = Path(ASSETS[name].relpath).name
    if p.is_dir():
        p = p / fname
    if not p.is_file():
        raise WeightsError(f"{p}: checkpoint not found (get {fname} from {page or ASSETS[name].url})")
    return p


def load_checkpoint(path: str | os.PathLike):
    """``torch.load`` of a checkpoint on the CPU, tensors and plain containers only (``weights_only``)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad weights file
        raise WeightsError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from e


def sample_ct(name: str = "dicom_series_512") -> str:
    """Path of a sample CT from the assets folder (the DICOM series is a folder; the rest are NIfTI assets)."""
    if name == "dicom_series_512":
        for folder in search_path():
            p = folder / "ct" / "dicom_series_512"
            if p.is_dir():
                return str(p)
        raise WeightsError(
            "sample DICOM series 'ct/dicom_series_512' not found: set FVAE_ASSETS to the shared assets folder "
            f"(upstream: {_TOTALSEG_URL}example_ct_dicom/)."
        )
    return str(resolve(name, download=True))
