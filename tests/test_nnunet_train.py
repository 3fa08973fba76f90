"""nnU-Net v2 through the bundle's configs and MONAI's integration, on CPU: nnunet_train.yaml (the arm's raw dataset,
nnUNetV2Runner plan + preprocess, get_nnunet_trainer driven by MONAI's SupervisedTrainer, MONAI's nnU-Net bundle
layout, models/model.pt + model.json naming it) and inference.yaml serving it (ModelnnUNetWrapper, label map on the
input's grid). A tiny plan: small crops,
1 epoch of 2 iterations. ``nnunetv2`` is pinned in the test environment (constraints.txt)."""

import json

import nibabel as nib
import numpy as np
from conftest import PY, ROOT, run

CONF = ROOT / "bundles" / "fvae_aug_seg" / "configs"


def _crop(src, dst, box):
    img = nib.load(str(src))
    (x0, x1), (y0, y1), (z0, z1) = box
    data = np.asarray(img.dataobj)[x0:x1, y0:y1, z0:z1]
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ np.array([x0, y0, z0]) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data, aff, img.header), str(dst))


def _crop_set(assets, tmp_path, n_cases) -> str:
    """A datalist of small crops (40 x 40 x 30) around the lesions of a synthetic lesion set: a tiny nnU-Net plan."""
    from fvae_ct.aug_seg.lesions import make_lesion_set

    dl = make_lesion_set(tmp_path / "les", assets / "ct" / "totalseg_ct_sm_3mm.nii.gz",
                         assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz", n_cases=n_cases, seed=2)
    crops = []
    for i, it in enumerate(json.loads(open(dl).read())["training"]):
        lab = np.asarray(nib.load(str(tmp_path / "les" / it["label"])).dataobj)
        c = np.argwhere(lab == 2).mean(0).astype(int)
        box = [(max(0, c[0] - 20), max(0, c[0] - 20) + 40), (max(0, c[1] - 20), max(0, c[1] - 20) + 40), (0, 30)]
        pair = {}
        for k in ("image", "label"):
            out = tmp_path / "crops" / f"{k}_{i}.nii.gz"
            out.parent.mkdir(exist_ok=True)
            _crop(tmp_path / "les" / it[k], out, box)
            pair[k] = f"crops/{k}_{i}.nii.gz"
        crops.append(pair)
    (tmp_path / "crops.json").write_text(json.dumps(crops))
    return str(tmp_path / "crops.json")


def test_tiny_nnunet_arm_trains_and_serves_through_the_bundle_configs(assets, tmp_path):
    _crop_set(assets, tmp_path, 4)
    root = tmp_path / "b"
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", f"['{CONF / 'train.yaml'}','{CONF / 'nnunet_train.yaml'}']",
             "--meta_file", str(CONF / "metadata.json"), "--datalist", str(tmp_path / "crops.json"),
             "--bundle_root", str(root), "--nnunet_arm", "gaussian", "--val_fraction", "0.25", "--test_fraction", "0.25",
             "--nnunet_max_epochs", "1", "--nnunet_epoch_length", "2", "--nnunet_num_processes", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    models = root / "models" / "nnunet"
    assert sorted(p.name for p in models.iterdir()) == ["dataset.json", "fold_0", "nnunet_checkpoint.pth", "plans.json"]
    raw = json.loads((root / "nnunet" / "nnUNet_raw" / "Dataset501_fvae_gaussian" / "dataset.json").read_text())
    assert json.loads((models / "dataset.json").read_text())["fvae_arm"] == "gaussian"
    # the split of train.yaml's rule: 2 training cases (each with its gaussian view), 1 validation, 1 test
    views = sorted(c["view"] for c in raw["fvae_cases"].values())
    assert views == ["gaussian_1vox", "gaussian_1vox", "original", "original", "original"] and len(raw["fvae_test"]) == 1
    test_case = raw["fvae_test"][0]
    assert test_case not in {c["source"] for c in raw["fvae_cases"].values()}
    # models/model.json names the model; model.pt holds the fold's weights under the wrapper's keys (MONAI Label loads it)
    import torch

    assert json.loads((root / "models" / "model.json").read_text()) == {
        "network": "nnunet", "nnunet_fold": 0, "class_names": ["background", "organ", "lesion"]}
    fold = torch.load(models / "fold_0" / "model.pt", weights_only=False)["network_weights"]
    served = torch.load(root / "models" / "model.pt", weights_only=True)
    assert set(served) == {f"network_weights.{k}" for k in fold}
    assert all(torch.equal(served[f"network_weights.{k}"], v) for k, v in fold.items())
    # SegResNet training into this bundle_root would overwrite the nnU-Net model: refused in one line
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", str(CONF / "train.yaml"), "--bundle_root", str(root),
             "--datalist", str(tmp_path / "crops.json"), "--max_epochs", "1"])
    assert r.returncode != 0 and "holds a trained nnunet model" in r.stderr
    # serve it: the bundle's inference.yaml on the held-out case, label map on its grid, uint8 ids of the classes
    src = tmp_path / "crops" / f"{test_case}.nii.gz"
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", str(CONF / "inference.yaml"),
             "--meta_file", str(CONF / "metadata.json"), "--bundle_root", str(root), "--input", str(src),
             "--output_dir", str(tmp_path / "pred"), "--mirroring", "false"])
    assert r.returncode == 0, r.stderr[-3000:]
    pred, img = nib.load(str(tmp_path / "pred" / f"{test_case}_seg.nii.gz")), nib.load(str(src))
    assert pred.shape == img.shape and np.allclose(pred.affine, img.affine)
    arr = np.asarray(pred.dataobj)
    assert arr.dtype == np.uint8 and set(np.unique(arr).tolist()) <= {0, 1, 2}


def test_nnunet_arms_in_the_ablation_table(assets, tmp_path):
    """nnU-Net arms land in the same table as SegResNet arms: same split, same scorer, nnU-Net's own budget."""
    ds = _crop_set(assets, tmp_path, 5)
    out = tmp_path / "abl"
    r = run([PY, "-m", "fvae_ct.cli", "ablate-seg", "--datalist", ds, "--arms", "nnunet_none,nnunet_union", "-o", str(out),
             "--seeds", "0", "--val_fraction", "0.2", "--test_fraction", "0.2", "--nnunet_max_epochs", "1",
             "--nnunet_epoch_length", "2", "--nnunet_num_processes", "1", "--nnunet_mirroring", "false", "--n_boot", "200"])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "ablation.json").read_text())
    rows = {x["arm"]: x for x in res["rows"]}
    assert [len(res["split"][k]) for k in ("train", "val", "test")] == [3, 1, 1]
    # nnU-Net's budget: 1 epoch x 2 iterations, the plan's batch size, the same in both arms
    assert rows["nnunet_none"]["steps"] == rows["nnunet_union"]["steps"] == 2
    assert rows["nnunet_none"]["crops_per_step"] == rows["nnunet_union"]["crops_per_step"] >= 2
    raw = out / "nnunet_union" / "seed0" / "nnunet" / "nnUNet_raw" / "Dataset501_fvae_union" / "dataset.json"
    views = sorted(c["view"] for c in json.loads(raw.read_text())["fvae_cases"].values())
    assert views == ["original"] * 4 + ["recon"] * 3  # train cases twice, the validation case once
    test_case = res["split"]["test"][0]
    assert (out / "nnunet_union" / "seed0" / "test_pred" / f"{test_case}_seg.nii.gz").is_file()
    assert 0 <= rows["nnunet_union"]["dice"] <= 1 and 0 <= rows["nnunet_none"]["nsd"] <= 1
    assert len(list((out / "recon").glob("*_recon.nii.gz"))) == 3  # the VAE reconstructions of the training cases
