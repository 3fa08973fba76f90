"""nnU-Net v2 raw datasets of the augmentation arms: files, ids, labels, geometry, folds without leakage."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from fvae_ct.aug_seg import build_datalists
from fvae_ct.aug_seg.lesions import make_lesion_set
from fvae_ct.aug_seg.nnunet_data import NNUNET_ARMS, export_arm, make_folds
from fvae_ct.errors import InputError, OptionError
from fvae_ct.recon.denoisers import DENOISERS

CLASSES = ["background", "organ", "lesion"]


@pytest.fixture(scope="module")
def splits(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("lesions")
    dl = make_lesion_set(
        d,
        assets / "ct" / "totalseg_ct_sm_3mm.nii.gz",
        assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz",
        n_cases=5,
        seed=1,
    )
    s = build_datalists(dl, val_fraction=0.2, seed=0)
    s["test"] = [s["train"].pop()]
    # stand-in reconstructions: the export only places them (the recon workflow makes the real ones)
    rdir = d / "recon"
    rdir.mkdir()
    for item in (*s["train"], *s["val"], *s["test"]):
        img = nib.load(item["image"])
        name = os.path.basename(item["image"]).replace(".nii.gz", "_recon.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 7, img.affine, img.header), str(rdir / name))
    return s, rdir


def _recon(rdir):
    return lambda image: rdir / os.path.basename(image).replace(".nii.gz", "_recon.nii.gz")


def _ids(folder):
    return sorted(p.name for p in folder.iterdir())


def test_union_arm_layout_ids_labels_and_fold0(splits, tmp_path):
    s, rdir = splits
    root = export_arm(s, "union", tmp_path / "raw", tmp_path / "pre", 7, CLASSES, recon_path=_recon(rdir))
    assert root.name == "Dataset007_fvae_union"
    train = sorted(os.path.basename(d["image"])[:-7] for d in s["train"])
    val = sorted(os.path.basename(d["image"])[:-7] for d in s["val"])
    test = [os.path.basename(d["image"])[:-7] for d in s["test"]]
    expect = sorted([f"{c}_0000.nii.gz" for c in train + val] + [f"{c}__recon_0000.nii.gz" for c in train])
    assert _ids(root / "imagesTr") == expect  # validation cases: original only
    assert _ids(root / "labelsTr") == sorted(e.replace("_0000", "") for e in expect)
    assert _ids(root / "imagesTs") == [f"{test[0]}_0000.nii.gz"]  # the test case never trains
    assert not any(test[0] in n for n in _ids(root / "imagesTr"))
    # a view carries its original's label, voxel for voxel, and its own (reconstructed) image on the same grid
    c = train[0]
    lab_view = nib.load(root / "labelsTr" / f"{c}__recon.nii.gz")
    lab_orig = nib.load(root / "labelsTr" / f"{c}.nii.gz")
    assert np.array_equal(np.asarray(lab_view.dataobj), np.asarray(lab_orig.dataobj))
    img_view = nib.load(root / "imagesTr" / f"{c}__recon_0000.nii.gz")
    img_orig = nib.load(root / "imagesTr" / f"{c}_0000.nii.gz")
    assert np.array_equal(img_view.affine, img_orig.affine)
    assert np.array_equal(np.asarray(img_view.dataobj), np.asarray(img_orig.dataobj) + 7)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["overwrite_image_reader_writer"] == "NibabelIO"
    assert meta["numTraining"] == len(expect)
    folds = json.loads((tmp_path / "pre" / root.name / "splits_final.json").read_text())
    assert folds == [{"train": sorted(train + [f"{c}__recon" for c in train]), "val": val}]


@pytest.mark.parametrize("arm", ["none", "recon"])
def test_none_and_recon_arms_train_on_their_view_only(splits, tmp_path, arm):
    s, rdir = splits
    root = export_arm(s, arm, tmp_path / "raw", tmp_path / "pre", 8, CLASSES, recon_path=_recon(rdir))
    folds = json.loads((tmp_path / "pre" / root.name / "splits_final.json").read_text())
    train = folds[0]["train"]
    assert len(train) == len(s["train"])
    assert all(("__recon" in c) == (arm == "recon") for c in train)
    assert not any("__" in c for c in folds[0]["val"])


def test_k_folds_keep_every_view_with_its_original(splits, tmp_path):
    s, rdir = splits
    root = export_arm(s, "union", tmp_path / "raw", tmp_path / "pre", 9, CLASSES, recon_path=_recon(rdir), num_folds=2)
    folds = json.loads((tmp_path / "pre" / root.name / "splits_final.json").read_text())
    originals = sorted(os.path.basename(d["image"])[:-7] for d in (*s["train"], *s["val"]))
    assert len(folds) == 2
    assert sorted(folds[0]["val"] + folds[1]["val"]) == originals  # every labelled case validates once
    for f in folds:
        sources = {c.split("__")[0] for c in f["train"]}
        assert not sources & set(f["val"])  # no view of a validation case trains
        assert sorted(f["train"]) == sorted([*sources, *(f"{c}__recon" for c in sources)])
    with pytest.raises(OptionError, match=r"nnunet_folds 9: .*at least k labelled cases \(the datalist has 2\)"):
        make_folds(["a"], ["b"], 9, 0)


def test_filter_control_arm_is_the_recon_bundles_denoiser(splits, tmp_path):
    s, _ = splits
    root = export_arm(s, "gaussian", tmp_path / "raw", tmp_path / "pre", 10, CLASSES, view_dir=str(tmp_path / "views"))
    assert NNUNET_ARMS["gaussian"] == ("original", "gaussian_1vox")
    c = os.path.basename(s["train"][0]["image"])[:-7]
    src = nib.load(s["train"][0]["image"])
    view = nib.load(root / "imagesTr" / f"{c}__gaussian_1vox_0000.nii.gz")
    x = np.asarray(src.dataobj, np.float32)
    want = np.round(DENOISERS["gaussian_1vox"].fn(x, (3.0, 3.0, 3.0), (-1000.0, 1000.0)))
    assert np.array_equal(np.asarray(view.dataobj), want)
    assert np.allclose(view.affine, src.affine) and view.shape == src.shape
    assert np.abs(np.asarray(view.dataobj) - x).max() > 10  # it did filter


def test_labels_outside_the_classes_are_refused_naming_the_file(splits, tmp_path):
    s, rdir = splits
    bad = tmp_path / "bad_label.nii.gz"
    lab = nib.load(s["val"][0]["label"])
    arr = np.asarray(lab.dataobj).copy()
    arr[0, 0, 0] = 117
    nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), str(bad))
    s2 = {**s, "val": [{**s["val"][0], "label": str(bad)}]}
    with pytest.raises(InputError, match=r"bad_label.*117.*0\.\.2"):
        export_arm(s2, "none", tmp_path / "raw", tmp_path / "pre", 12, CLASSES)
    with pytest.raises(OptionError, match="nnunet_arm 'mixup': must be one of none, recon, union"):
        export_arm(s, "mixup", tmp_path / "raw", tmp_path / "pre", 12, CLASSES)


def test_wrapper_gets_the_true_spacing_batched_or_not():
    """MONAI's ModelnnUNetWrapper reads pixdim of a collated batch or the affine's diagonal; ours gives nnU-Net the
    voxel sizes in the file's order for an unbatched image (MONAI Label) and a permuted, flipped affine."""
    import torch
    from monai.data import MetaTensor

    from fvae_ct.aug_seg.nnunet import _spacing_meta

    aff = torch.tensor([[0.0, 0.0, -3.0, 10.0], [-0.8, 0.0, 0.0, 5.0], [0.0, 0.7, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    x = MetaTensor(torch.zeros(1, 1, 4, 5, 6), affine=aff)  # unbatched meta: affine [4, 4]
    pix = _spacing_meta(x)["pixdim"]
    assert pix.shape == (1, 8) and torch.allclose(pix[0, 1:4], torch.tensor([0.8, 0.7, 3.0], dtype=torch.float64))
    xb = MetaTensor(torch.zeros(1, 1, 4, 5, 6), affine=aff[None])  # collated batch: affine [1, 4, 4]
    assert torch.equal(_spacing_meta(xb)["pixdim"], pix)
