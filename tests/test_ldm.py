"""Latent diffusion pieces: CFG, mask conditions on the latent grid, seamless latent windows, text encoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fvae_ct.ldm import (FrozenTextEncoder, LDMPrepareBatch, guided_prediction, make_scheduler, onehot_mask_latent,
                         sample_latents)
from fvae_ct.ldm.networks import PseudoThreeDUNet
from test_networks import tiny_unet


def test_onehot_mask_lands_on_the_right_latent_voxels():
    lab = torch.zeros(9, 32, 24, dtype=torch.long)
    lab[5:9, 16:24, 8:16] = 3  # slices 5-8, rows 16-23, cols 8-15
    lab[0, 0:8, 0:8] = 1
    # image AE: depth kept, 8x8 pixel blocks averaged
    m = onehot_mask_latent(lab, [1, 3], spatial_factor=8, depth_factor=1)
    assert m.shape == (2, 9, 4, 3)
    assert m[1, 5:9, 2, 1].eq(1).all() and m[1].sum() == 4
    assert m[0, 0, 0, 0] == 1 and m[0].sum() == 1
    # causal video VAE: latent 0 = slice 0, latent k = slices 4k-3 .. 4k
    v = onehot_mask_latent(lab, [1, 3], spatial_factor=8, depth_factor=4, latent_shape=(3, 4, 3))
    assert v[1, 2, 2, 1] == 1.0 and v[1, 1, 2, 1] == 0.0 and v[1].sum() == 1.0
    assert v[0, 0, 0, 0] == 1.0 and v[0, 1:].sum() == 0
    # partial coverage is the covered fraction (area downsampling)
    lab2 = torch.zeros(1, 8, 8, dtype=torch.long)
    lab2[0, :4, :] = 2
    assert onehot_mask_latent(lab2, [2], 8, 1)[0, 0, 0, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="does not match the latent grid"):
        onehot_mask_latent(lab, [1], 8, 4, latent_shape=(9, 4, 3))


def _model(k_mask=2, ctx_dim=6, seed=0):
    return PseudoThreeDUNet(tiny_unet(in_ch=4 + k_mask, out_ch=4, context_dim=ctx_dim, seed=seed), levels=(1,),
                            mode="attention")


def test_cfg_with_guidance_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    model = _model()
    x, mask = torch.randn(2, 4, 3, 16, 16), torch.rand(2, 2, 3, 16, 16)
    ctx, cmask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t = torch.tensor([100, 900])
    with torch.no_grad():
        cond = model(torch.cat([x, mask], 1), t, ctx, cmask)
        g1 = guided_prediction(model, x, t, mask, ctx, cmask, 1.0)
        g3 = guided_prediction(model, x, t, mask, ctx, cmask, 3.0)
    assert torch.allclose(g1, cond, atol=1e-5)
    assert not torch.allclose(g3, cond, atol=1e-3)


def test_padding_tokens_are_never_attended():
    torch.manual_seed(0)
    model = _model()
    x, t = torch.randn(2, 6, 2, 16, 16), torch.tensor([50, 50])
    ctx = torch.randn(2, 4, 6)
    with torch.no_grad():
        a = model(x, t, ctx, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
        junk = ctx.clone()
        junk[0, 2:] = 100.0  # change only the padded tokens of sample 0
        b = model(x, t, junk, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
        alone = model(x[:1], t[:1], ctx[:1, :2])
    assert torch.equal(a, b) and torch.allclose(a[:1], alone, atol=1e-5)


class ToyDenoiser(nn.Module):
    """Deterministic, depth-local (each slice on its own): windows must reproduce the full volume exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv3d(6, 4, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x, t, context=None, context_mask=None):  # t: [B] or one per slice [B * d]
        tt = t.float().reshape(x.shape[0], 1, -1, 1, 1)
        return torch.tanh(self.conv(x)) * (tt / 1000.0)


@pytest.mark.parametrize("kind", ["ddpm", "rflow"])
def test_latent_windows_have_no_seam(kind):
    model = ToyDenoiser()
    mask = torch.rand(1, 2, 23, 8, 8)
    args = dict(shape=(1, 4, 23, 8, 8), mask=mask, guidance=2.0, steps=6, seed=7)
    full = sample_latents(model, make_scheduler(kind, sampler=True), depth_window=None, **args)
    for mode in ("blend", "chain"):
        win = sample_latents(model, make_scheduler(kind, sampler=True), depth_window=8, depth_overlap=3,
                             long_volume=mode, **args)
        assert torch.allclose(full, win, atol=1e-5), mode
    assert not torch.allclose(full, sample_latents(model, make_scheduler(kind, sampler=True), **{**args, "seed": 8}))


def test_prepare_batch_targets_and_cfg_dropout():
    sch = make_scheduler("ddpm")
    prep = LDMPrepareBatch(sch, scale_factor=0.5, p_uncond_mask=1.0, p_uncond_text=1.0)
    batch = {"latent": torch.randn(2, 4, 3, 8, 8), "mask": torch.ones(2, 2, 3, 8, 8),
             "text": torch.randn(2, 5, 6), "text_mask": torch.ones(2, 5, dtype=torch.long)}
    x, target, _, kw = prep(batch)
    assert x.shape == (2, 6, 3, 8, 8) and target.shape == (2, 4, 3, 8, 8)
    assert x[:, 4:].abs().sum() == 0  # mask dropped
    assert kw["context"].abs().sum() == 0 and kw["context_mask"].sum(1).tolist() == [1, 1]  # null text
    z0 = batch["latent"] * 0.5
    expect = sch.add_noise(z0, target, kw["timesteps"])
    assert torch.allclose(x[:, :4], expect, atol=1e-6)  # epsilon target: the noise that was added
    rsch = make_scheduler("rflow")
    rf = LDMPrepareBatch(rsch, p_uncond_mask=0.0, p_uncond_text=0.0)
    x2, v, _, kw2 = rf(batch)
    noise = batch["latent"] - v  # velocity target v = x0 - noise
    assert torch.allclose(x2[:, :4], rsch.add_noise(batch["latent"], noise, kw2["timesteps"]), atol=1e-5)
    assert torch.allclose(x2[:, 4:], batch["mask"]) and kw2["context_mask"].sum() == 10


def test_offline_text_encoder_embeds_and_masks():
    enc = FrozenTextEncoder()
    emb, mask = enc.encode(["Liver normal.", "Hypodense 2 cm lesion in the right kidney, no other findings."])
    assert emb.shape[0] == 2 and emb.shape[2] == 384 and mask.shape == emb.shape[:2]
    assert mask[0].sum() < mask[1].sum() and mask[0, : int(mask[0].sum())].all()
    again, _ = enc.encode(["Liver normal."])
    assert torch.allclose(again[0, : int(mask[0].sum())], emb[0, : int(mask[0].sum())], atol=1e-5)
    assert all(not p.requires_grad for p in enc.parameters())


# ---- the bundle end to end on real CT ----------------------------------------------------------------------
LTINY = ["--unet_channels", "[16,32]", "--attention_levels", "[False,True]", "--num_res_blocks", "1",
         "--num_head_channels", "8", "--norm_num_groups", "8", "--consistency_levels", "[0,1]"]


def test_ldm_bundle_prepare_train_2d_3d_and_generate(assets, tmp_path):
    import json

    import nibabel as nib
    import numpy as np
    from conftest import PY, ROOT, run

    conf = ROOT / "bundles" / "fvae_ldm" / "configs"
    seg = assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz"
    (tmp_path / "datalist.json").write_text(json.dumps([{
        "image": str(assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"), "label": str(seg),
        "report": "Abdominal CT. Liver, spleen and kidneys of normal size. No focal lesion."}]))
    root = ["--bundle_root", str(tmp_path)]
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", str(conf / "prepare.yaml"), *root])
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((tmp_path / "latents" / "latent_stats.json").read_text())
    assert stats["latent_channels"] == 32 and stats["mask_channels"] == 6 and stats["text_dim"] == 384
    cached = __import__("torch").load(tmp_path / "latents" / "totalseg_ct_sm_3mm.pt", weights_only=True)
    assert cached["latent"].shape == (32, 30, 13, 16)  # 30 axial slices; 101 x 122 pixels / 8, upright
    assert abs(stats["scale_factor"] * float(cached["latent"].std()) - 1.0) < 0.01
    # stage 2d: 300 steps of the 2D UNet on latent slices
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", str(conf / "train.yaml"), *root, "--stage", "2d",
             "--samples_per_epoch", "50", "--batch_size", "2", "--max_epochs", "12", "--learning_rate", "0.001",
             "--train_depth", "6", *LTINY])
    assert r.returncode == 0, r.stderr[-3000:]
    loss = json.loads((tmp_path / "eval" / "train_loss.json").read_text())["loss"]
    assert len(loss) == 300
    # prior_skip: the untrained model is the unit-Gaussian prior's denoiser (loss ~0.33 here, not 1), and training
    # goes below it ...
    assert np.mean(loss[-50:]) < 0.9 * np.mean(loss[:50]), (np.mean(loss[:50]), np.mean(loss[-50:]))
    # ... and below the closed-form per-channel Gaussian prior on these latents at mid noise levels
    import torch

    from fvae_ct.ldm import build_denoiser, load_denoiser, make_scheduler
    from fvae_ct.ldm.gaussian import GaussianPriorDenoiser

    c2 = torch.load(tmp_path / "models" / "model_2d.pt", weights_only=True)
    assert c2["record"]["prior_skip"] is True and c2["record"]["p_context"] == 0.0
    net = load_denoiser(build_denoiser(32, 6, 384, (16, 32), (False, True), 1, 8, 8, "none", (0, 1), True), c2, "2d")
    z0 = cached["latent"][None, :, :6] * stats["scale_factor"]
    z0 = torch.nn.functional.pad(z0, (0, 0, 0, 1, 0, 0), mode="replicate")  # 13 -> 14 rows (a multiple of 2)
    m = torch.nn.functional.pad(cached["mask"][None, :, :6], (0, 0, 0, 1, 0, 0), mode="replicate")
    flat = cached["latent"].flatten(1).double() * stats["scale_factor"]
    prior = GaussianPriorDenoiser(flat.mean(1), flat.var(1))
    sched, ctx, cm = make_scheduler(), cached["text"][None], cached["text_mask"][None]
    mse = {"trained": [], "prior": []}
    with torch.no_grad():
        for t in (200, 400, 600):
            eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(t))
            x = torch.cat([sched.add_noise(z0, eps, torch.tensor([t])), m], 1)
            for name, f in (("trained", net), ("prior", prior)):
                mse[name].append(float(((f(x, torch.tensor([t]), ctx, cm) - eps) ** 2).mean()))
    assert np.mean(mse["trained"]) < np.mean(mse["prior"]), mse
    # stage 3d: the 2D weights frozen, only the consistency blocks train
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", str(conf / "train.yaml"), *root, "--stage", "3d",
             "--samples_per_epoch", "10", "--batch_size", "2", "--max_epochs", "2", "--train_depth", "6", *LTINY])
    assert r.returncode == 0, r.stderr[-3000:]
    c2, c3 = (torch.load(tmp_path / "models" / f"model_{s}.pt", weights_only=True) for s in ("2d", "3d"))
    for k in c2["model"]:  # stage 3d started from the 2D EMA weights and did not move them
        assert torch.equal(c3["model"]["unet." + k], c2["ema"]["unet." + k]), k
    assert any(not torch.equal(c2["model"][k], c2["ema"]["unet." + k]) for k in c2["model"])  # EMA != raw weights
    assert any(k.startswith("blocks3d.") for k in c3["model"])
    # the checkpoints record what they were trained with; the EMA followed the weights (warm-up)
    assert c3["record"]["train_depth"] == 6 and c3["record"]["text_encoder"]["dim"] == 384
    assert not any(k.startswith("down_blocks.0.attentions") for k in c2["model"])  # attention_levels [False,True]
    moved = sum(float((c2["model"][k] - c2["ema"]["unet." + k]).abs().mean()) for k in c2["model"])
    assert moved / len(c2["model"]) < 0.05
    # MONAI's workflow contract (as the zoo CI and MONAI Label check it) on the trained bundle folder
    from conftest import check_properties

    lt = dict(unet_channels=[16, 32], attention_levels=[False, True], num_res_blocks=1, num_head_channels=8,
              norm_num_groups=8, consistency_levels=[0, 1], bundle_root=str(tmp_path))
    assert check_properties(conf, ["train.yaml"], "train", stage="3d", **lt) == []
    assert check_properties(conf, ["inference.yaml"], "inference", bundle_root=str(tmp_path)) == []
    # generation: a CT volume with the mask's geometry, in HU; the network is built from the architecture the
    # the checkpoint records the architecture: none of train's options is repeated
    assert c3["record"]["architecture"]["channels"] == [16, 32] and c3["record"]["architecture"]["mode"] == "attention"
    assert c2["record"]["architecture"]["mode"] == "none"
    out = tmp_path / "gen"
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", str(conf / "inference.yaml"), *root, "--mask", str(seg),
             "--report", "Liver normal.", "--output_dir", str(out), "--steps", "4", "--depth_window", "12"])
    assert r.returncode == 0, r.stderr[-3000:]
    img, ref = nib.load(str(out / "totalseg_ct_sm_3mm_generated.nii.gz")), nib.load(str(seg))
    assert img.shape == ref.shape and np.array_equal(img.affine, ref.affine) and img.get_data_dtype() == np.int16
    v = np.asarray(img.dataobj)
    assert v.min() >= -1000 and v.max() <= 1000 and v.std() > 10
    assert (out / "totalseg_ct_sm_3mm_generated.png").is_file()


def test_causal_video_vae_latent_space_end_to_end(assets, tmp_path):
    """Depth factor 4 (a tiny random Wan of the real diffusers class): cache, masks and generation line up."""
    import json

    import nibabel as nib
    import numpy as np

    from fvae_ct.ldm import GenerateWorkflow, SamplingInferer, build_denoiser, prepare_latents
    from fvae_ct.vae import WanVAE
    from test_wan import tiny_wan21

    src, seg = nib.load(str(assets / "ct" / "totalseg_ct_sm_3mm.nii.gz")), nib.load(
        str(assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz"))
    box = (slice(30, 70), slice(30, 62), slice(10, 21))  # 40 x 32 x 11 voxels
    aff = src.affine.copy()
    aff[:3, 3] = (src.affine @ np.array([30, 30, 10, 1.0]))[:3]
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[box], aff), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[box].astype(np.int16), aff), str(tmp_path / "seg.nii.gz"))
    (tmp_path / "list.json").write_text(json.dumps([{"image": "ct.nii.gz", "label": "seg.nii.gz"}]))
    vae = WanVAE(model=tiny_wan21())
    for enc in ("onehot", "vae"):
        stats = prepare_latents(str(tmp_path / "list.json"), vae, str(tmp_path / enc), [1, 5], enc)
        cached = torch.load(tmp_path / enc / "ct.pt", weights_only=True)
        assert cached["latent"].shape == (4, 4, 4, 5)  # 11 slices -> 13 = 1 + 4 * 3 frames -> 4 latent slices
        assert cached["mask"].shape[1:] == cached["latent"].shape[1:]
        assert stats["mask_channels"] == (2 if enc == "onehot" else 4) and stats["text_dim"] is None
    net = build_denoiser(4, 2, None, channels=(8, 16), attention_levels=(False, False), num_res_blocks=1,
                         num_head_channels=8, norm_num_groups=8, mode="attention", levels=(0, 1))
    stats = json.loads((tmp_path / "onehot" / "latent_stats.json").read_text())
    sampler = SamplingInferer(steps=2, depth_window=2, depth_overlap=1, progress=False)
    out = GenerateWorkflow(net, vae, stats, str(tmp_path / "gen"), inferer=sampler, multiple=2).run(
        str(tmp_path / "seg.nii.gz"))
    img = nib.load(str(out))
    assert img.shape == (40, 32, 11) and np.array_equal(img.affine, aff)
