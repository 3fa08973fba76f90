"""Geometry and HU round trips through the transforms and the workflow (identity VAE: the pipeline alone)."""

from __future__ import annotations

import glob

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from fvae_ct.recon import ReconWorkflow
from fvae_ct.transforms import AxialSlicesd, HUWindowd, recon_preprocessing
from fvae_ct.vae import IdentityVAE


def _run_identity(inp, out, **kw):
    return ReconWorkflow(IdentityVAE(), str(out), figures=False, progress=False, **kw).run(str(inp))


@pytest.mark.parametrize("name,codes", [("totalseg_ct_sm_3mm", ("R", "A", "S")), ("chest_ct_1p5mm", ("L", "P", "S"))])
def test_identity_roundtrip_exact_hu_and_geometry_on_real_nifti(assets, tmp_path, name, codes):
    src = assets / "ct" / f"{name}.nii.gz"
    ref = nib.load(str(src))
    assert nib.aff2axcodes(ref.affine) == codes
    assert any(s % 8 for s in ref.shape)  # sizes that are not multiples of 8
    summary = _run_identity(src, tmp_path)
    out = nib.load(str(tmp_path / f"{name}_recon.nii.gz"))
    assert out.shape == ref.shape
    assert np.array_equal(out.affine, ref.affine)
    assert out.get_data_dtype() == np.int16
    assert np.allclose(out.header.get_zooms(), ref.header.get_zooms())
    assert nib.aff2axcodes(out.affine) == codes
    expected = np.clip(np.asarray(ref.dataobj), -1000, 1000)
    assert np.array_equal(np.asarray(out.dataobj), expected)  # exact within the window
    assert summary["metrics"]["mse_hu"]["mean"] == 0.0


def test_narrow_window_roundtrip_is_exact_in_integer_hu(assets, tmp_path):
    src = assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"
    _run_identity(src, tmp_path, hu_window=(-160, 240))
    out = np.asarray(nib.load(str(tmp_path / "totalseg_ct_sm_3mm_recon.nii.gz")).dataobj)
    assert np.array_equal(out, np.clip(np.asarray(nib.load(str(src)).dataobj), -160, 240))


def test_hu_window_inverse_rounds_not_truncates():
    t = HUWindowd("image", window=(-1000, 1000), out_range=(-1, 1))
    hu = MetaTensor(torch.tensor([[[[-1000.0, -0.6, 0.6, 12.0, 999.0]]]]), affine=torch.eye(4))
    d = t({"image": hu})
    assert float(d["image"].min()) == -1.0
    d["image"] = d["image"] + 0.0004  # + 0.4 HU: rounding keeps, truncation would not
    back = t.inverse(d)["image"]
    assert back.flatten().tolist() == [-1000.0, 0.0, 1.0, 12.0, 999.0]


def _marker_volume(affine):
    """A volume whose voxel (0, 0, 0) is 1 and the rest 0, with the given affine."""
    v = torch.zeros(1, 4, 5, 6)
    v[0, 0, 0, 0] = 1.0
    return MetaTensor(v, affine=torch.as_tensor(affine, dtype=torch.float64))


@pytest.mark.parametrize("affine,expected_hw", [
    # RAS+ voxel axes (x grows toward the patient's right): voxel 0 is the most left-posterior point ->
    # bottom-right of an upright radiological slice (patient left on the image right, anterior up)
    (np.diag([1.0, 1.0, 1.0, 1.0]), ("last_row", "last_col")),
    # LPS voxel axes (DICOM order): voxel 0 is the most right-anterior point -> top-left
    (np.diag([-1.0, -1.0, 1.0, 1.0]), ("first_row", "first_col")),
])
def test_slices_are_presented_upright_radiological(affine, expected_hw):
    t = AxialSlicesd("image")
    out = t({"image": _marker_volume(affine)})["image"]
    assert out.shape == (1, 6, 5, 4)  # [C, D (axial = z), H (A->P = y), W (R->L = x)]
    d, h, w = [int(i) for i in torch.nonzero(out[0])[0]]
    assert d == 0
    assert h == (4 if expected_hw[0] == "last_row" else 0)
    assert w == (0 if expected_hw[1] == "first_col" else 3)
    assert torch.equal(t.inverse({"image": out})["image"], _marker_volume(affine))


def test_permuted_axes_roundtrip_exactly():
    """A file whose first voxel axis is the axial one, with an oblique-ish rotation, comes back unchanged."""
    a = np.zeros((4, 4))
    a[:3, :3] = [[0, 0.7, 0.1], [0.05, 0, -0.8], [2.5, 0, 0]]
    a[3, 3] = 1
    x = MetaTensor(torch.randn(1, 7, 9, 11), affine=torch.as_tensor(a))
    pre = recon_preprocessing(working_spacing=None, check_hu=False)
    fwd = pre({"image": x})["image"]
    assert fwd.shape[1] == 7  # the axial axis (voxel axis 0: z) comes first
    back = pre.inverse({"image": MetaTensor(fwd.as_tensor(), meta=fwd.meta,
                                            applied_operations=fwd.applied_operations)})["image"]
    assert torch.equal(back, torch.round(x.clamp(-1000, 1000)))


def test_dicom_series_hu_and_geometry(dicom_dir, tmp_path):
    """RescaleSlope/Intercept applied; the output NIfTI sits where the DICOM slices are."""
    _run_identity(dicom_dir, tmp_path)
    out = nib.load(str(tmp_path / "dicom_series_512_recon.nii.gz"))
    assert out.shape == (512, 512, 20)
    files = sorted(glob.glob(str(dicom_dir / "*.dcm")))
    ds = [pydicom.dcmread(f) for f in files]
    vol = np.asarray(out.dataobj)
    for d in (ds[0], ds[-1]):
        hu = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
        # find this slice in the output through its world position (LPS -> RAS)
        ipp = np.array([float(v) for v in d.ImagePositionPatient])
        ras = np.array([-ipp[0], -ipp[1], ipp[2], 1.0])
        ijk = np.linalg.inv(out.affine) @ ras
        k = int(round(ijk[2]))
        assert abs(ijk[2] - k) < 1e-3 and 0 <= k < 20
        # voxel (i, j) of the output at DICOM (row r, col c): world = IPP + c*dx*X + r*dy*Y
        i, j = np.round(ijk[:2]).astype(int)
        assert (i, j) in ((0, 0), (511, 511), (0, 511), (511, 0))
        sl = vol[:, :, k]
        # the output slice equals the DICOM pixels (transposed to [col, row]) clipped to the window
        assert np.array_equal(sl, np.clip(hu.T, -1000, 1000).astype(np.int16))


def test_working_spacing_keeps_the_original_grid(assets, tmp_path):
    src = assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"
    s = _run_identity(src, tmp_path, working_spacing=1.0)
    out = nib.load(str(tmp_path / "totalseg_ct_sm_3mm_recon.nii.gz"))
    ref = nib.load(str(src))
    assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine)
    # 3 mm -> 1 mm -> 3 mm with area averaging back is nearly lossless, but not exactly identity
    assert 35.0 < s["metrics"]["psnr"]["mean"] < 80.0
    assert s["working_spacing_mm"] == 1.0


@pytest.mark.parametrize("affine", [np.diag([1.0, 1.0, 1.0, 1.0]), np.diag([-1.5, -1.5, 2.0, 1.0]),
                                    np.array([[0, 0, 2.5, 0], [0.8, 0, 0, 0], [0, -0.8, 0, 0], [0, 0, 0, 1.0]])])
def test_to_slices_and_from_slices_are_inverse_and_match_the_transform(affine):
    from fvae_ct.transforms import from_slices, to_slices

    v = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    s, _ = to_slices(v, affine)
    t = AxialSlicesd("image")({"image": MetaTensor(torch.from_numpy(v)[None], affine=torch.as_tensor(affine))})
    assert np.array_equal(s, t["image"][0].numpy())
    assert np.array_equal(from_slices(s, affine), v)


def test_outputs_carry_the_inputs_qform_and_sform_exactly(tmp_path):
    """RAS, LPS, permuted, oblique, sheared (gantry tilt), qform != sform, qform code 0, a singleton 4th dimension:
    the reconstruction's header has the input's qform and sform, matrices and codes (identity VAE, `fvae recon`)."""
    import nibabel as nib
    from conftest import PY, run
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    vol = (rng.normal(0, 200, (10, 12, 6)) - 300).astype(np.int16)
    obl = np.eye(4)
    obl[:3, :3] = Rotation.from_euler("xyz", [12, -7, 20], degrees=True).as_matrix() @ np.diag([0.8, 0.8, 2.5])
    obl[:3, 3] = [-40, 25, 100]
    shear = np.diag([0.9, 0.9, 2.0, 1.0])
    shear[1, 2] = 0.35  # gantry tilt: slices shifted along y with z
    other = np.diag([1.0, 1.0, 2.0, 1.0])
    other[:3, 3] = [5, 5, 5]
    cases = {  # name: (qform, qform code, sform, sform code, shape)
        "ras": (np.diag([1.5, 1.5, 3, 1]), 1, np.diag([1.5, 1.5, 3, 1]), 1, vol.shape),
        "lps": (np.diag([-1.2, -1.2, 2, 1]), 1, np.diag([-1.2, -1.2, 2, 1]), 2, vol.shape),
        "permuted": (None, 0, np.array([[0, 0, 2.0, 0], [1.1, 0, 0, 0], [0, 1.1, 0, 0], [0, 0, 0, 1]]), 2, vol.shape),
        "oblique": (obl, 1, obl, 1, vol.shape),
        "sheared": (None, 0, shear, 2, vol.shape),
        "q_differs": (other, 1, obl, 2, vol.shape),
        "singleton4d": (np.diag([1.5, 1.5, 3, 1]), 1, np.diag([1.5, 1.5, 3, 1]), 1, (*vol.shape, 1)),
    }
    src = tmp_path / "in"
    src.mkdir()
    for name, (q, qc, s, sc, shape) in cases.items():
        img = nib.Nifti1Image(vol.reshape(shape), None)
        if q is not None:
            img.set_qform(q, code=qc)
        else:
            img.header["qform_code"] = 0
        img.set_sform(s, code=sc)
        nib.save(img, str(src / f"{name}.nii.gz"))
    r = run([PY, "-m", "fvae_ct.cli", "recon", str(src), "-o", str(tmp_path / "out"), "--vae", "identity",
             "--figures", "false"])
    assert r.returncode == 0, r.stderr[-3000:]
    for name in cases:
        a, b = nib.load(str(src / f"{name}.nii.gz")), nib.load(str(tmp_path / "out" / f"{name}_recon.nii.gz"))
        ha, hb = a.header, b.header
        assert b.shape == a.shape, name
        assert int(hb["qform_code"]) == int(ha["qform_code"]) and int(hb["sform_code"]) == int(ha["sform_code"]), name
        assert np.allclose(hb.get_sform(), ha.get_sform(), atol=1e-6), name
        assert np.allclose(hb.get_qform(), ha.get_qform(), atol=1e-6), name
        assert np.array_equal(np.asarray(b.dataobj).reshape(vol.shape), np.clip(vol, -1000, 1000)), name
