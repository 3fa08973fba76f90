"""Named weights and sample data: search path, user cache, download with a SHA-256 check.

Resolution order for a named asset (see ``ASSETS``):

0. a bundle folder (``bundle_root``), at the asset's path in that bundle's ``large_files.yml`` (``models/`` for
   weights, ``sample_data/`` for sample CT), where MONAI's ``download_large_files`` put it;
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

from .errors import OptionError, WeightsError

__all__ = [
    "Asset",
    "ASSETS",
    "DICOM_SERIES",
    "resolve",
    "search_path",
    "cache_dir",
    "sha256",
    "sample_ct",
    "sample_dir",
    "bundle_weights",
    "weights_file",
    "load_checkpoint",
]

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

    @property
    def bundle_path(self) -> str:
        """Where a bundle's ``large_files.yml`` puts the file: ``models/<file>`` (weights) or
        ``sample_data/<path below ct/>`` (sample CT)."""
        top, rest = self.relpath.split("/", 1)
        return f"models/{Path(rest).name}" if top == "weights" else f"sample_data/{rest}"


ASSETS: dict[str, Asset] = {
    "taef2_encoder": Asset(
        "weights/taef2_encoder.pth",
        _TAESD_URL + "taef2_encoder.pth",
        "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
        "MIT (madebyollin/taesd)",
    ),
    "taef2_decoder": Asset(
        "weights/taef2_decoder.pth",
        _TAESD_URL + "taef2_decoder.pth",
        "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
        "MIT (madebyollin/taesd)",
    ),
    "totalseg_ct_sm_3mm": Asset(
        "ct/totalseg_ct_sm_3mm.nii.gz",
        _TOTALSEG_URL + "example_ct_sm.nii.gz",
        "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
        "Apache-2.0 (TotalSegmentator)",
    ),
    "totalseg_ct_sm_3mm_seg": Asset(
        "ct/totalseg_ct_sm_3mm_seg.nii.gz",
        _TOTALSEG_URL + "example_seg.nii.gz",
        "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d",
        "Apache-2.0 (TotalSegmentator)",
    ),
    "totalseg_ct_3mm": Asset(
        "ct/totalseg_ct_3mm.nii.gz",
        _TOTALSEG_URL + "example_ct.nii.gz",
        "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
        "Apache-2.0 (TotalSegmentator)",
    ),
    "chest_ct_1p5mm": Asset(
        "ct/chest_ct_1p5mm.nii.gz",
        _TOTALSEG_URL + "pulmonary_report/models/ct_cropped.nii.gz",
        "4da078fe43c9aa4d358903ac95105cea4fbe93b029474e4701bdde4db72126eb",
        "Apache-2.0 (TotalSegmentator)",
    ),
    "aorta_ct_1p5mm": Asset(
        "ct/aorta_ct_1p5mm.nii.gz",
        _TOTALSEG_URL + "aorta_report/test_result/models/ct_cropped.nii.gz",
        "f776ecfa1326e7e21a8c30e5530f517c16f16a59a68fc06e8119cefc7c3b87a0",
        "Apache-2.0 (TotalSegmentator)",
    ),
    "dicom_series_512_seg": Asset(
        "ct/dicom_series_512_seg.nii.gz",
        _TOTALSEG_URL + "example_seg_dicom.nii.gz",
        "98af7f6536c316ff9084054f20956cd3e28af376b81d582d269fbea2744878fc",
        "Apache-2.0 (TotalSegmentator)",
    ),
}
#: the sample DICOM series (20 axial slices, 512x512): upstream file name -> SHA-256
DICOM_SERIES = {
    f"CT.1.3.12.2.1107.5.1.4.60064.300000221208081134280000{16573 + i}.dcm": h
    for i, h in enumerate(
        (
            "4c5633409fa4d3edf6871e5684e9e1b10325b4d0949997582f43b23a684d0dc4",
            "9148f91127145497f4d6c6f0780f9452504cd7fe5088ec8f2bf2b21800c731ff",
            "3edaccec892e0821440cbefe3d5465923bb5146c316cbaf58f578d962f120484",
            "9b68685f0c5f9bfcfc2c397f4fadf431da288d7422ca72e7d9031d4e039418cd",
            "c8d2c0dc05e414d47d3652c658d8fecc20c3cf7ce106c10d84ad033d39700bcc",
            "0ee2c1d58e06cedd91483ca35c04da3c26fea0dbe88aaf1eaa950b57f38357d6",
            "c76cf0818d4215b92883d109b8a0b62ae0a4d81637eed98738f9c62b6f49bb72",
            "106e20514fd3ca66895e14dbfba96c01c1195e4ed890c035d4368dd71f3ee116",
            "5804e6c4a50f4d5b20040ac82a1c6d79cba5f7267d71f10b0a1b49eda1bc13ff",
            "bef219a16b22949224de4581a2d288863b2585d29556ac24021f03307378cb39",
            "9de5a49e880417d5330fe299115fdb95831a98234216a31c5c0e9a0be9a6dcd3",
            "fa00c8d81ec8aa0d0cfc4e05343782c3a75a4c60df8cccf9ff5db42ac454e61d",
            "ebba0900b0f728db0c94c769db3e5ca38a0cd916386a727541eb3e56350770e5",
            "f084ec95cfba25efb7cbe86e8b4966b051904037e8385f58fe398c5475693b89",
            "20a9b88a30ea8a824ac65cb19c1ebf80964b41ff476497706ff2a286e5f27a25",
            "2a515d3b60f3ff733aac1fc5414206c331e3ed2ccef8c2e0c30b844c538e3ed8",
            "5880669f1bc36b09cad4bdf487992ec415da0afa014e927efc282e612f467574",
            "7af4dd5b5766a87368939116b91f90d989820e7b2237fb9bcd10d47db0960875",
            "671306f4462ae881976c18c6a2d8a1567279fb0166ef0e9e8a41271fac9c1cbb",
            "fdb76ad5272f074e07cc81509604fd163f2f8a9903d34b16ba6f078250373c51",
        )
    )
}
for _f, _h in DICOM_SERIES.items():
    ASSETS[f"dicom_series_512/{_f}"] = Asset(
        f"ct/dicom_series_512/{_f}", f"{_TOTALSEG_URL}example_ct_dicom/{_f}", _h, "Apache-2.0 (TotalSegmentator)"
    )
for _z, _d in ((4, 64), (8, 64), (16, 64), (16, 96)):
    _f = f"ivvae_z{_z}_dim{_d}"
    ASSETS[_f] = Asset(
        f"weights/ivvae/{_f}.pth",
        f"https://modelscope.cn/models/wpy1999/iv-vae/resolve/master/{_f}.pth",
        "",
        "MIT (ali-vilab/iv-vae)",
    )
for _d in (4, 16):
    ASSETS[f"leanvae_dim{_d}"] = Asset(
        f"weights/leanvae/LeanVAE-dim{_d}.ckpt",
        f"{LEANVAE_PAGE}/resolve/main/LeanVAE-dim{_d}.ckpt",
        "",
        "MIT (Yumic/LeanVAE)",
    )


_WARNED: set[str] = set()


def missing_search_folders() -> list[Path]:
    """Folders ``$FVAE_ASSETS`` names that do not exist (or are not folders)."""
    return [Path(p) for p in os.environ.get("FVAE_ASSETS", "").split(os.pathsep) if p and not Path(p).is_dir()]


def search_path() -> list[Path]:
    """Folders from ``$FVAE_ASSETS`` (colon-separated), existing ones only; each one that does not exist is
    named in a warning of the ``fvae_ct`` log the first time the search path is built."""
    for p in missing_search_folders():
        if str(p) not in _WARNED:
            _WARNED.add(str(p))
            logging.getLogger("fvae_ct").warning("FVAE_ASSETS: %s does not exist (or is not a folder); ignored", p)
    return [Path(p) for p in os.environ.get("FVAE_ASSETS", "").split(os.pathsep) if p and Path(p).is_dir()]


def _missing_note() -> str:
    gone = missing_search_folders()
    return f"; FVAE_ASSETS also names {', '.join(map(str, gone))}, which does not exist" if gone else ""


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
        logging.getLogger("fvae_ct").info("asset '%s' (%s) has no pinned SHA-256; validated by its loader", name, path)
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


def resolve(name: str, download: bool = False, bundle_root: str | os.PathLike | None = None) -> Path:
    """Path of the named asset, hash-checked: ``<bundle_root>/<bundle_path>``, ``$FVAE_ASSETS``, the cache, then
    (``download=True``) the upstream address. Raises :class:`WeightsError` naming every place searched; an unknown
    ``name`` is an :class:`OptionError` listing the known ones."""
    if name not in ASSETS:
        raise OptionError(f"asset {name!r}: not a known asset; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    if bundle_root is not None and (Path(bundle_root) / asset.bundle_path).is_file():
        return _check(Path(bundle_root) / asset.bundle_path, asset, name)
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
                f"asset '{name}' ({asset.relpath}) not found in {[str(p) for p in places]}{_missing_note()} and "
                f"the download from "
                f"{asset.url} failed ({e}). Set FVAE_ASSETS to a folder holding it, or copy it into {dest.parent}."
            ) from e
        return _check(dest, asset, name)
    raise WeightsError(
        f"asset '{name}' ({asset.relpath}) not found in {[str(p) for p in places]}{_missing_note()}. Set "
        f"FVAE_ASSETS to a folder "
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


def bundle_weights(bundle_root: str | os.PathLike | None, vae: str, weights: str | None = None) -> str | None:
    """The weights a bundle config hands to :func:`fvae_ct.vae.load`: the user's ``weights`` when given; else the
    folder ``<bundle_root>/models`` when it holds (hash-checked) every weights file of the named VAE, as
    ``large_files.yml`` puts them; else ``None`` (the VAE then looks in ``$FVAE_ASSETS``, the cache, upstream)."""
    if weights is not None:
        return weights
    groups = {"taef2": ["taef2_encoder", "taef2_decoder"], "leanvae": ["leanvae_dim16"], "ivvae": ["ivvae_z16_dim64"]}
    names = groups.get(vae, [vae] if vae in ASSETS and ASSETS[vae].relpath.startswith("weights/") else [])
    if bundle_root is None or not names:
        return None
    models = Path(bundle_root) / "models"
    if not all((Path(bundle_root) / ASSETS[n].bundle_path).is_file() for n in names):
        return None
    for n in names:
        _check(Path(bundle_root) / ASSETS[n].bundle_path, ASSETS[n], n)
    return str(models)


def sample_dir(bundle_root: str | os.PathLike | None = None) -> str:
    """The folder holding the sample CT: ``<bundle_root>/sample_data`` when it exists, else ``ct/`` of the first
    ``$FVAE_ASSETS`` folder that has one, else ``<cache>/ct``."""
    if bundle_root is not None and (Path(bundle_root) / "sample_data").is_dir():
        return str(Path(bundle_root) / "sample_data")
    for folder in search_path():
        if (folder / "ct").is_dir():
            return str(folder / "ct")
    return str(cache_dir() / "ct")


def sample_ct(name: str = "dicom_series_512", bundle_root: str | os.PathLike | None = None) -> str:
    """Path of a sample CT: the bundle's ``sample_data/`` (``large_files.yml``), ``$FVAE_ASSETS/ct``, the cache, or
    downloaded with SHA-256 checks. The DICOM series is a folder of 20 files; the others are NIfTI files."""
    if name != "dicom_series_512":
        return str(resolve(name, download=True, bundle_root=bundle_root))
    files = [resolve(f"dicom_series_512/{f}", download=True, bundle_root=bundle_root) for f in DICOM_SERIES]
    folders = {f.parent for f in files}
    if len(folders) != 1:  # a partial copy somewhere: the series must come from one folder
        raise WeightsError(f"sample DICOM series split over {sorted(map(str, folders))}: remove the partial copy")
    return str(folders.pop())
