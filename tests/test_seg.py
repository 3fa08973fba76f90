"""fvae_aug_seg: NSD in mm, datalists, view mixing, synthetic lesions, and the bundle end to end on real CT."""

from __future__ import annotations

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PY, ROOT, check_properties, run
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scipy import ndimage as ndi

from fvae_ct.errors import InputError, OptionError
from fvae_ct.aug_seg.lesions import insert_lesion, make_lesion_set
from fvae_ct.aug_seg import SpacingSurfaceDiceMetric, build_datalists, spacing_from_affine

CONF = ROOT / "bundles" / "fvae_aug_seg" / "configs"
TINY = ["--patch_size", "[48,48,16]", "--init_filters", "8", "--blocks_down", "[1,1,1]", "--blocks_up", "[1,1]",
        "--num_workers", "0"]


# ---- NSD in mm --------------------------------------------------------------------------------------------
def _box(z0, shape=(8, 8, 8)):
    m = np.zeros(shape, bool)
    m[2:6, 2:6, z0 : z0 + 2] = True  # 4 x 4 x 2 voxels: every voxel is a surface voxel
    return m


def _nsd(pred, label, spacing, tol):
    aff = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    onehot = lambda m: MetaTensor(torch.from_numpy(np.stack([~m, m]))[None].float(), affine=aff)  # noqa: E731
    metric = SpacingSurfaceDiceMetric(class_thresholds=[tol])
    metric(onehot(pred), onehot(label))
    return float(metric.aggregate())


def test_nsd_hand_computed_including_anisotropic_spacing():
    label, shifted = _box(2), _box(3)  # the prediction is one slice higher
    assert _nsd(label, label, (1, 1, 3), 0.1) == 1.0
    # isotropic 1 mm: every surface voxel is 0 or 1 mm from the other surface -> all within 2 mm
    assert _nsd(shifted, label, (1, 1, 1), 2.0) == 1.0
    # 3 mm slices: the 16 voxels of the non-overlapping slice of each box are 3 mm away -> (16 + 16) / (32 + 32)
    assert _nsd(shifted, label, (1, 1, 3), 2.0) == pytest.approx(0.5)
    assert _nsd(shifted, label, (1, 1, 3), 3.0) == 1.0
    # in-plane spacing matters the same way: shift along x with 0.7 mm pixels is 0.7 mm
    sx = np.roll(label, 1, axis=0)
    assert _nsd(sx, label, (0.7, 0.7, 3), 0.7) == 1.0
    assert _nsd(sx, label, (0.7, 0.7, 3), 0.5) < 1.0


def test_spacing_is_read_from_the_affine():
    aff = torch.tensor([[0, 0, -2.5, 0], [0.8, 0, 0, 0], [0, -0.8, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    assert spacing_from_affine(MetaTensor(torch.zeros(1, 2, 2, 2), affine=aff)) == pytest.approx([0.8, 0.8, 2.5])
    with pytest.raises(ValueError, match="needs MetaTensors"):
        spacing_from_affine(torch.zeros(2))


# ---- synthetic lesions ------------------------------------------------------------------------------------
def test_inserted_lesion_is_inside_with_known_contrast_and_matched_noise(assets):
    ct_img = nib.load(str(assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"))
    ct = np.asarray(ct_img.dataobj).astype(np.float32)
    liver = np.asarray(nib.load(str(assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz")).dataobj) == 5
    new, les = insert_lesion(ct, liver, (3.0, 3.0, 3.0), radius_mm=9.0, contrast_hu=-60.0,
                             rng=np.random.default_rng(1))
    assert les.mask.any() and not (les.mask & ~liver).any()  # inside the organ
    vol_mm3 = les.mask.sum() * 27.0
    expected = 4 / 3 * np.pi * np.prod(les.semi_axes_mm)
    assert 0.6 * expected < vol_mm3 < 1.4 * expected
    core = ndi.binary_erosion(les.mask)
    med = float(np.median(ct[liver]))
    assert abs(float(new[core].mean()) - (med - 60.0)) < 10.0
    far = ndi.distance_transform_edt(~les.mask) > 3
    assert np.abs(new[far] - ct[far]).max() < 0.01  # untouched elsewhere
    with pytest.raises(OptionError, match="radius_mm 60: no place in the organ"):
        insert_lesion(ct, liver, (3.0, 3.0, 3.0), radius_mm=60.0)


# ---- datalists and view mixing -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lesion_set(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("lesions")
    return make_lesion_set(d, assets / "ct" / "totalseg_ct_sm_3mm.nii.gz", assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz",
                           n_cases=6, seed=0)


def test_datalists_split_and_precomputed_views(lesion_set, tmp_path):
    from fvae_ct.aug_seg import ReconPathd
    from fvae_ct.recon import ReconWorkflow
    from fvae_ct.vae import load

    dl = build_datalists(lesion_set, val_fraction=0.34, seed=3)
    assert len(dl["train"]) == 4 and len(dl["val"]) == 2
    assert dl == build_datalists(lesion_set, val_fraction=0.34, seed=3)  # same split every time
    # the recon path is derived per item by a transform, so a plain {image, label} list (MONAI Label's) works
    pre = build_datalists(lesion_set, recon_mode="precomputed", recon_dir=str(tmp_path), val_fraction=0.34, seed=3)
    assert pre == dl
    item = dict(pre["train"][0])
    nm = os.path.basename(item["image"])[:-7]
    with pytest.raises(InputError, match=f"{nm}_recon.nii.gz: no reconstruction for case {nm}.*'prepare'"):
        ReconPathd("image", str(tmp_path))(item)
    # missing: made once with the frozen VAE (identity here: the clipped original) and cached; then reused
    calls = []

    def factory():
        calls.append(1)
        return ReconWorkflow(load("identity"), str(tmp_path), hu_window=(-100, 100), figures=False, progress=False)

    t = ReconPathd("image", str(tmp_path), workflow_factory=factory)
    out = t(item)
    assert out["image_recon"] == str(tmp_path / f"{nm}_recon.nii.gz") and calls == [1]
    rec, src = nib.load(out["image_recon"]), nib.load(item["image"])
    assert np.array_equal(rec.affine, src.affine)
    assert np.array_equal(np.asarray(rec.dataobj), np.clip(np.asarray(src.dataobj), -100, 100))
    mtime = os.stat(out["image_recon"]).st_mtime_ns
    assert t(item)["image_recon"] == out["image_recon"] and calls == [1]
    assert os.stat(out["image_recon"]).st_mtime_ns == mtime
    own = {**item, "image_recon": "/elsewhere/x.nii.gz"}  # an item naming its own reconstruction keeps it
    assert t(own)["image_recon"] == "/elsewhere/x.nii.gz"


def _train_pipeline(datalist, recon_dir, **overrides):
    p = ConfigParser()
    p.read_config(str(CONF / "train.yaml"))
    p.update({"datalist": datalist, "recon_dir": recon_dir, "patch_size": [48, 48, 16], "num_samples": 3,
              "train#aug_transforms": [], "bundle_root": str(recon_dir), **overrides})
    return p.get_parsed_content("train#preprocessing"), p.get_parsed_content("datalists")


@pytest.fixture(scope="module")
def shifted_recons(lesion_set, tmp_path_factory):
    """Stand-in reconstructions = original + 50 HU, so a shared crop is recognisable exactly."""
    d = tmp_path_factory.mktemp("recon")
    dl = build_datalists(lesion_set)
    for item in dl["train"] + dl["val"]:
        img = nib.load(item["image"])
        nm = os.path.basename(item["image"])[:-7]
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16) + 50, img.affine), str(d / f"{nm}_recon.nii.gz"))
    return d


def test_union_doubles_the_samples_and_shares_the_crop(lesion_set, shifted_recons):
    pre, dl = _train_pipeline(lesion_set, str(shifted_recons), recon_mode="precomputed", recon_mix="union")
    out = pre(dl["train"][0])
    assert len(out) == 6  # 3 crops x 2 views
    for a, b in zip(out[0::2], out[1::2]):
        assert (a["view"], b["view"]) == ("original", "recon")
        assert torch.equal(a["label"], b["label"])
        inside = (a["image"] > 0.01) & (a["image"] < 0.9)  # away from the window's clipping
        diff = (b["image"] - a["image"])[inside]
        assert torch.allclose(diff, torch.full_like(diff, 50.0 / 600.0), atol=1e-5)  # same crop, +50 HU
    none, _ = _train_pipeline(lesion_set, str(shifted_recons), recon_mode="none")
    assert len(none(dl["train"][0])) == 3


def test_online_view_runs_the_frozen_vae_as_a_transform(lesion_set, tmp_path):
    """recon_mode online: the VAE reconstructs each loaded case (identity VAE: the views must coincide)."""
    pre, dl = _train_pipeline(lesion_set, str(tmp_path), recon_mode="online", recon_mix="union", vae="identity")
    out = pre(dl["train"][0])
    assert len(out) == 6
    for a, b in zip(out[0::2], out[1::2]):
        assert (a["view"], b["view"]) == ("original", "recon")
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("prob,view", [(1.0, "recon"), (0.0, "original")])
def test_probability_mixing(lesion_set, shifted_recons, prob, view):
    pre, dl = _train_pipeline(lesion_set, str(shifted_recons), recon_mode="precomputed", recon_mix="prob",
                              recon_prob=prob)
    out = pre(dl["train"][1])
    assert len(out) == 3 and {o["view"] for o in out} == {view}
    assert all("image_recon" not in o for o in out)


# ---- the bundle end to end ----------------------------------------------------------------------------------
def test_prepare_train_evaluate_infer_on_real_ct(lesion_set, assets, tmp_path):
    root = tmp_path / "bundle"
    common = ["--datalist", lesion_set, "--bundle_root", str(root)]
    # prepare: the fvae_recon workflow fills recon_dir (real TAEF2); a second run skips what is done
    r = run([PY, "-m", "monai.bundle", "run", "prepare", "--config_file", str(CONF / "train.yaml"), *common])
    assert r.returncode == 0, r.stderr[-3000:]
    recons = sorted((root / "recon").glob("*_recon.nii.gz"))
    assert len(recons) == 6 and (root / "recon" / "summary.json").is_file()
    summary = json.loads((root / "recon" / "summary.json").read_text())
    assert summary["vae"] == "taef2" and summary["metrics"]["psnr"]["mean"] > 25
    mtimes = [p.stat().st_mtime_ns for p in recons]
    r = run([PY, "-m", "monai.bundle", "run", "prepare", "--config_file", str(CONF / "train.yaml"), *common])
    assert r.returncode == 0 and [p.stat().st_mtime_ns for p in recons] == mtimes
    # train on original + reconstruction (union), tiny network, CPU
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", str(CONF / "train.yaml"), *common, *TINY,
             "--recon_mode", "precomputed", "--max_epochs", "16", "--val_interval", "8", "--learning_rate", "0.003"])
    assert r.returncode == 0, r.stderr[-3000:]
    loss = json.loads((root / "eval" / "train_loss.json").read_text())["loss"]
    assert len(loss) == 16 * 3  # 5 training cases, batch 2 -> 3 iterations per epoch
    assert np.mean(loss[-6:]) < 0.85 * np.mean(loss[:6]), (loss[:6], loss[-6:])
    ckpt = torch.load(root / "models" / "model.pt", weights_only=True)  # the zoo's flat state_dict
    assert "convInit.conv.weight" in ckpt and ckpt["convInit.conv.weight"].shape[0] == 8 and "model" not in ckpt
    sizes = json.loads((root / "models" / "model.json").read_text())
    assert sizes["init_filters"] == 8 and sizes["blocks_down"] == [1, 1, 1] and sizes["class_names"][2] == "lesion"
    for cfgs, kind in ((["train.yaml"], "train"), (["train.yaml", "evaluate.yaml"], "eval"),
                       (["inference.yaml"], "infer")):
        assert check_properties(CONF, cfgs, kind, bundle_root=str(root), datalist=lesion_set) == [], cfgs
    # evaluate: Dice and NSD per case and class
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", f"['{CONF / 'train.yaml'}','{CONF / 'evaluate.yaml'}']",
             *common, *TINY, "--compute_hd95", "true"])
    assert r.returncode == 0, r.stderr[-3000:]
    for m in ("val_mean_dice", "val_nsd", "val_hd95"):
        rows = (root / "eval" / f"{m}_raw.csv").read_text().strip().splitlines()
        assert rows[0] == "filename,class0,class1,mean" and len(rows) == 2  # 1 validation case, 2 scored classes
        assert (root / "eval" / f"{m}_summary.csv").is_file()
    # inference: a label map with the input's geometry (an LPS volume the network never saw)
    src = assets / "ct" / "chest_ct_1p5mm.nii.gz"
    # no size overrides: the network is rebuilt from models/model.json, as MONAI Label (which passes none) needs
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", str(CONF / "inference.yaml"), "--input", str(src),
             "--bundle_root", str(root), "--output_dir", str(tmp_path / "seg")])
    assert r.returncode == 0, r.stderr[-3000:]
    out, ref = nib.load(str(tmp_path / "seg" / "chest_ct_1p5mm_seg.nii.gz")), nib.load(str(src))
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}


def test_bundle_configs_parse_with_property_ids():
    meta = json.loads((CONF / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "organ",
                                                                             "2": "lesion"}
    p = ConfigParser()
    p.read_config(str(CONF / "inference.yaml"))
    for pid in ("bundle_root", "device", "network_def", "preprocessing", "inferer", "postprocessing"):
        assert pid in p.config
    for key in ("segresnet_preprocessing", "nnunet_preprocessing"):  # either model: MONAI Label swaps the loader
        assert p.config[key]["transforms"][0]["_target_"] == "LoadImaged"
    p["bundle_root"] = str(CONF.parent)  # no models/model.json there: the SegResNet
    assert p.get_parsed_content("network_type") == "segresnet"
    assert type(p.get_parsed_content("preprocessing").transforms[0]).__name__ == "LoadImaged"
    p = ConfigParser()
    p.read_config([str(CONF / "train.yaml"), str(CONF / "multi_gpu_train.yaml")])
    assert p.config["train"]["dataloader"]["sampler"] == "@train#sampler"
    assert "fvae_ct.distributed.ddp(" in p.config["network"]  # DDP under torchrun (tests/test_distributed.py)


# ---- ablation runner ----------------------------------------------------------------------------------------
def test_split_is_disjoint_fixed_and_arms_are_compute_matched(tmp_path):
    from fvae_ct.aug_seg import split_cases
    from fvae_ct.aug_seg.ablation import arm_overrides

    ds = tmp_path / "list.json"
    ds.write_text(json.dumps([{"image": f"im{i}.nii.gz", "label": f"lb{i}.nii.gz"} for i in range(10)]))
    a, b = split_cases(str(ds), None, 0.2, 0.3, seed=1), split_cases(str(ds), None, 0.2, 0.3, seed=1)
    names = {k: [d["image"] for d in v] for k, v in a.items()}
    assert names == {k: [d["image"] for d in v] for k, v in b.items()}  # seeded: the same split for every arm
    assert [len(v) for v in names.values()] == [5, 2, 3] and len(set(sum(names.values(), []))) == 10
    assert all(os.path.isabs(p) for p in sum(names.values(), []))
    assert split_cases(str(ds), None, 0.2, 0.3, seed=2)["test"] != a["test"]
    with pytest.raises(OptionError, match="test_fraction 0.5: the 10 labelled case.* cannot give 5 test, 5 valid"):
        split_cases(str(ds), None, 0.5, 0.5)
    # the same crops per optimisation step: a two-view arm takes half as many crops per case
    views = {"gaussian": str(tmp_path / "g")}
    assert arm_overrides("none", 2, views)["num_samples"] == 2 and arm_overrides("union", 2, views)["num_samples"] == 1
    assert arm_overrides("prob", 2, views)["num_samples"] == 2
    assert arm_overrides("gaussian", 4, views) == {"recon_mode": "precomputed", "recon_mix": "union",
                                                   "num_samples": 2, "recon_dir": views["gaussian"]}
    with pytest.raises(OptionError, match="num_samples 3: arm union trains two views per crop, so give an even"):
        arm_overrides("union", 3, views)
    # evaluate.yaml's eval_datalist (val_fraction 0): every case is scored, none held back
    assert len(build_datalists(str(ds), val_fraction=0.0)["train"]) == 10
    # without a test split, the training config's split is the same rule (SegResNet and nnU-Net see the same cases)
    bd, sc = build_datalists(str(ds), seed=3), split_cases(str(ds), None, 0.2, 0.0, seed=3)
    assert bd["val"] == sc["val"] and bd["train"] == sc["train"] and sc["test"] == []
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"image": "a.nii.gz", "label": "b.nii.gz"}]))
    assert [len(v) for v in split_cases(str(one), None, 0.2).values()] == [1, 0, 0]  # a single labelled case trains


def test_ablation_runner_on_synthetic_lesions(assets, tmp_path):
    ds = make_lesion_set(tmp_path / "set", assets / "ct" / "totalseg_ct_sm_3mm.nii.gz",
                         assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz", n_cases=8, seed=5)
    out = tmp_path / "abl"
    args = [PY, "-m", "fvae_ct.cli", "ablate-seg", "--datalist", ds, "--arms", "none,union,gaussian", "-o", str(out),
            "--seeds", "0,1", "--val_fraction", "0.25", "--test_fraction", "0.25", "--max_epochs", "2",
            "--val_interval", "2", "--learning_rate", "0.003", *TINY]
    r = run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "ablation.json").read_text())
    rows = {x["arm"]: x for x in res["rows"]}
    split = res["split"]
    assert set(rows) == {"none", "union", "gaussian"} and [len(split[k]) for k in ("train", "val", "test")] == [4, 2, 2]
    assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
    # scored on the test cases only, with the bundle's inference (label maps on the input grid)
    for arm in rows:
        for s in (0, 1):
            preds = sorted(p.name for p in (out / arm / f"seed{s}" / "test_pred").glob("*_seg.nii.gz"))
            assert preds == sorted(f"{c}_seg.nii.gz" for c in split["test"])
    lab = nib.load(str(tmp_path / "set" / "labelsTr" / f"{split['test'][0]}.nii.gz"))
    pred = nib.load(str(out / "none" / "seed0" / "test_pred" / f"{split['test'][0]}_seg.nii.gz"))
    assert pred.shape == lab.shape and np.allclose(pred.affine, lab.affine)
    # compute-matched: the same steps and crops per step in every arm
    assert {(r["steps"], r["crops_per_step"]) for r in rows.values()} == {(2 * 2, 2 * 2)}
    # per-case rows of every arm x seed x test case; the table is their mean, the difference paired
    with open(out / "per_case.csv") as f:
        per_case = list(csv.DictReader(f))
    assert len(per_case) == 3 * 2 * 2
    nsd = lambda arm: np.mean([(float(r["nsd_1"]) + float(r["nsd_2"])) / 2 for r in per_case if r["arm"] == arm])  # noqa: E731
    assert rows["none"]["nsd"] == pytest.approx(nsd("none"), abs=1e-5)
    assert rows["union"]["nsd_diff"] == pytest.approx(nsd("union") - nsd("none"), abs=1e-5)
    assert rows["union"]["nsd_ci_low"] <= rows["union"]["nsd_diff"] <= rows["union"]["nsd_ci_high"]
    assert 0 <= rows["gaussian"]["sensitivity_2"] <= 1 and rows["none"]["empty_gt_2"] == 0
    assert len(list((out / "recon").glob("*_recon.nii.gz"))) == 6  # training + validation, by the recon workflow
    assert len(list((out / "views" / "gaussian_1vox").glob("*_recon.nii.gz"))) == 4  # the control view, training only
    md = (out / "ablation.md").read_text()
    assert "| none |" in md and "| gaussian |" in md and "95% CI" in md and "held-out test" in md
    # a second call reuses the finished runs (same settings) and gives the same table
    t = (out / "none" / "seed0" / "scores.json").stat().st_mtime
    assert run(args).returncode == 0 and (out / "none" / "seed0" / "scores.json").stat().st_mtime == t
    assert json.loads((out / "ablation.json").read_text())["rows"] == res["rows"]
