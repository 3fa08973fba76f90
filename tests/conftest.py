"""Shared fixtures: the real assets (../shared/assets or $FVAE_ASSETS), real TAEF2, tiny real-class models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_default = ROOT.parent / "shared" / "assets"
if not os.environ.get("FVAE_ASSETS") and _default.is_dir():
    os.environ["FVAE_ASSETS"] = str(_default)
os.environ.setdefault("MPLBACKEND", "Agg")


def assets_dir() -> Path:
    for p in os.environ.get("FVAE_ASSETS", "").split(os.pathsep):
        if p and (Path(p) / "ct").is_dir():
            return Path(p)
    pytest.skip("real assets not found: set FVAE_ASSETS (CI has ../shared/assets)")


@pytest.fixture(scope="session")
def assets() -> Path:
    return assets_dir()


@pytest.fixture(scope="session")
def dicom_dir(assets) -> Path:
    return assets / "ct" / "dicom_series_512"


@pytest.fixture(scope="session")
def taef2():
    from fvae_ct.vae import load

    assets_dir()
    return load("taef2")


@pytest.fixture(scope="session")
def dicom_unit(dicom_dir):
    """The DICOM series as [1, 1, D, H, W] in [0, 1] (HU window [-1000, 1000]), upright axial slices."""
    from fvae_ct.transforms import recon_preprocessing

    return recon_preprocessing()({"image": str(dicom_dir)})["image"].as_tensor()[None]


def run(cmd: list[str], **kw):
    """Run a command with this interpreter's environment; returns CompletedProcess (text)."""
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=kw.pop("cwd", ROOT), **kw)


PY = sys.executable


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def check_properties(conf_dir: Path, configs: list[str], workflow_type: str | None, **overrides) -> list[str]:
    """MONAI's ``ConfigWorkflow.check_properties()`` for the layered ``configs`` of a bundle, as the model-zoo CI and
    MONAI Label run it: initialise, then parse every required property (so each must instantiate, not only exist).
    Returns the missing or wrong property names ([] when the workflow type's contract holds)."""
    from monai.bundle import ConfigWorkflow

    w = ConfigWorkflow(config_file=[str(conf_dir / c) for c in configs], meta_file=str(conf_dir / "metadata.json"),
                       logging_file=str(conf_dir / "logging.conf"), workflow_type=workflow_type, **overrides)
    w.initialize()
    return w.check_properties()
