"""fvae_ldm correctness: text encoder recorded and checked, one fixed mask
mapping, EMA warm-up, stage 3d from the EMA weights, the trained depth window at inference, the joint null
condition of classifier-free guidance, the mask's header kept."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from fvae_ct.errors import InputError, OptionError
from fvae_ct.handlers import WarmupEMA
from fvae_ct.ldm import (GenerateWorkflow, LDMPrepareBatch, SamplingInferer, TrainingRecord, build_denoiser,
                         check_record, guided_prediction, load_stage2d, make_scheduler, prepare_latents,
                         trained_depth, vae_mask_input)
from fvae_ct.ldm.conditioning import MINILM
from fvae_ct.vae import load

TINY = dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
            norm_num_groups=8, levels=(0, 1))


def _case(folder, name, max_id=7, shape=(24, 20, 6)):
    img = np.full(shape, -1000, np.int16)
    img[4:20, 4:16] = 40
    lab = np.zeros(shape, np.uint8)
    lab[6:12, 6:12] = 5  # "liver"
    lab[14:18, 6:10] = 1
    lab[0, 0, 0] = max_id  # a different largest id per case
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(img, aff), str(folder / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(folder / f"{name}_seg.nii.gz"))
    return {"image": f"{name}.nii.gz", "label": f"{name}_seg.nii.gz", "report": f"Case {name}."}


def test_text_encoder_is_recorded_and_a_mismatch_is_refused(tmp_path):
    items = [_case(tmp_path, "a")]
    (tmp_path / "dl.json").write_text(json.dumps(items))
    stats = prepare_latents(str(tmp_path / "dl.json"), load("identity"), str(tmp_path / "lat"), [1, 5],
                            text_max_length=64)
    assert stats["text_encoder"] == {"name": MINILM, "dim": 384, "max_length": 64}
    assert json.loads((tmp_path / "lat" / "latent_stats.json").read_text())["text_encoder"] == stats["text_encoder"]
    net = build_denoiser(1, 2, 384, **TINY)
    wf = GenerateWorkflow(net, load("identity"), stats, str(tmp_path / "gen"))
    assert wf.text_encoder.max_length == 64 and wf.text_encoder.dim == 384
    with pytest.raises(OptionError, match=r"text_encoder '/models/CXR-BERT': the model was trained with 'all-MiniLM"):
        GenerateWorkflow(net, load("identity"), stats, str(tmp_path / "gen"), text_encoder="/models/CXR-BERT")
    # the checkpoint records it too; a cache with another encoder is refused before any weight is loaded
    ckpt = {"record": TrainingRecord(stats, 6).state_dict()}
    assert check_record(ckpt, stats)["train_depth"] == 6 and trained_depth(ckpt) == 6
    other = {**stats, "text_encoder": {"name": "/models/CXR-BERT", "dim": 768, "max_length": 512}, "text_dim": 768}
    with pytest.raises(InputError, match=r"model_3d.pt: trained with other conditioning .*text_encoder: trained "
                                         r"\{'name': 'all-MiniLM"):
        check_record(ckpt, other, "model_3d.pt")


def test_vae_mask_encoding_is_one_fixed_mapping_and_scaled_like_image_latents(tmp_path):
    a, b = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
    a[0, 0, 0], b[0, 0, 0] = 5, 5  # the liver in both ...
    a[1, 1, 1], b[1, 1, 1] = 7, 117  # ... with different largest ids
    ua, ub = vae_mask_input(a, 400, (-1, 1)), vae_mask_input(b, 400, (-1, 1))
    assert float(ua[0, 0, 0]) == float(ub[0, 0, 0]) == pytest.approx(-1 + 2 * 5 / 400)
    with pytest.raises(ValueError, match="label id 500 exceeds mask_label_scale 400"):
        vae_mask_input(b * 0 + 500, 400, (-1, 1))
    items = [_case(tmp_path, "a", 7), _case(tmp_path, "b", 117)]
    (tmp_path / "dl.json").write_text(json.dumps(items))
    stats = prepare_latents(str(tmp_path / "dl.json"), load("identity"), str(tmp_path / "lat"), [1, 5], "vae")
    assert stats["mask_scale_factor"] == stats["scale_factor"] and stats["mask_label_scale"] == 400
    ca, cb = (torch.load(tmp_path / "lat" / f"{n}.pt", weights_only=True)["mask"] for n in "ab")
    # identity VAE: the cached mask is the mapped label map; the liver (id 5) has one value in both cases
    for c in (ca, cb):  # before: 5/7 in case a, 5/117 in case b
        assert int(((c - 5 / 400).abs() < 1e-6).sum()) == 36 * 6
    # at training, mask latents are scaled like the image latents
    pb = LDMPrepareBatch(make_scheduler(), scale_factor=2.0, p_uncond_mask=0, p_uncond_text=0, p_uncond_both=0,
                         mask_scale=2.0)
    batch = {"latent": torch.randn(2, 1, 3, 8, 8), "mask": torch.rand(2, 1, 3, 8, 8)}
    x, *_ = pb(batch)
    assert torch.allclose(x[:, 1:], 2.0 * batch["mask"])


def test_ema_follows_the_weights_over_a_short_run():
    """With warm-up the EMA is near the trained weights after 200 updates; the old fixed 0.9999 keeps 98 % of the
    random initial values."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    init = torch.cat([p.detach().clone().flatten() for p in model.parameters()])
    ema, fixed = WarmupEMA(model, 0.9999), WarmupEMA(model, 0.9999, warmup=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn(8)
    for _ in range(200):
        x = torch.randn(32, 8)
        loss = ((model(x)[:, 0] - x @ target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        fixed.update()

    def flat(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    final = flat(model)
    moved = float((final - init).norm())
    assert moved > 1.0
    assert float((flat(ema.ema_model) - final).norm()) < 0.15 * moved
    assert float((flat(fixed.ema_model) - init).norm()) < 0.03 * moved  # the defect: it stays at the start
    assert ema.current_decay() == pytest.approx(201 / 210)


def test_stage3d_starts_from_the_ema_weights():
    net2d = build_denoiser(1, 2, None, mode="none", **TINY)
    ema = WarmupEMA(net2d)
    with torch.no_grad():
        for p in ema.ema_model.parameters():
            p.add_(1.0)  # EMA != raw weights
    ckpt = {"model": net2d.unet.state_dict(), "ema": ema.ema_model.state_dict()}
    for init, ref in (("ema", ema.ema_model.unet), ("model", net2d.unet)):
        net3d = load_stage2d(build_denoiser(1, 2, None, mode="attention", **TINY), ckpt, init)
        for (k, v), (_, r) in zip(net3d.unet.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(v, r), (init, k)
    with pytest.raises(OptionError, match="init_3d_from"):
        load_stage2d(net3d, ckpt, "last")


def test_cfg_trains_the_joint_null_and_guidance_one_is_one_pass():
    pb = LDMPrepareBatch(make_scheduler(), p_uncond_mask=0.0, p_uncond_text=0.0, p_uncond_both=0.5, seed=1)
    n = 400
    batch = {"latent": torch.randn(n, 1, 1, 4, 4), "mask": torch.ones(n, 1, 1, 4, 4),
             "text": torch.ones(n, 3, 2), "text_mask": torch.ones(n, 3, dtype=torch.long)}
    x, _, _, kw = pb(batch)
    no_mask = x[:, 1:].flatten(1).eq(0).all(1)
    no_text = kw["context"].flatten(1).eq(0).all(1)
    assert torch.equal(no_mask, no_text)  # always together
    assert 0.4 < float(no_mask.float().mean()) < 0.6
    calls = []

    def model(x, t, c, m):
        calls.append(1)
        return x[:, :1] * 0 + (0 if c is None or not c.any() else 1)

    x0, t = torch.randn(1, 1, 2, 4, 4), torch.tensor([10])
    mask, ctx, cm = torch.ones(1, 1, 2, 4, 4), torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.long)
    guided_prediction(model, x0, t, mask, ctx, cm, 1.0)
    assert len(calls) == 1
    out = guided_prediction(model, x0, t, mask, ctx, cm, 3.0)
    assert len(calls) == 3 and torch.allclose(out, torch.full_like(out, 3.0))


def test_build_denoiser_reads_attention_levels_as_booleans():
    """'[false,true]' on a command line arrives as strings; 'false' must not build attention at level 0."""
    a = build_denoiser(1, 2, None, **{**TINY, "attention_levels": ["false", "true"]})
    b = build_denoiser(1, 2, None, **TINY)
    assert [k for k in a.state_dict()] == [k for k in b.state_dict()]
    assert not any(k.startswith("unet.down_blocks.0.attentions") for k in a.state_dict())


def test_generated_volume_keeps_the_masks_header(tmp_path):
    """Defect 10: the output has the mask's qform / sform matrices and codes (sform_code 2 stays 2)."""
    lab = np.zeros((16, 16, 4), np.uint8)
    lab[4:10, 4:10] = 1
    aff = np.array([[-1.2, 0, 0, 30], [0, -1.2, 0, 20], [0, 0, 2.5, -40], [0, 0, 0, 1]])
    img = nib.Nifti1Image(lab, aff)
    img.set_sform(aff, code=2)
    img.set_qform(aff, code=1)
    nib.save(img, str(tmp_path / "m_seg.nii.gz"))
    stats = {"latent_channels": 1, "mask_channels": 1, "classes": [1], "mask_encoding": "onehot",
             "scale_factor": 1.0, "text_dim": None}
    wf = GenerateWorkflow(build_denoiser(1, 1, None, **TINY), load("identity"), stats, str(tmp_path / "gen"),
                          inferer=SamplingInferer(steps=2, guidance=1.0, depth_window=None, progress=False))
    out = nib.load(str(wf.run(str(tmp_path / "m_seg.nii.gz"))))
    assert int(out.header["sform_code"]) == 2 and int(out.header["qform_code"]) == 1
    assert np.allclose(out.get_sform(), img.get_sform()) and np.allclose(out.get_qform(), img.get_qform())
    assert out.get_data_dtype() == np.int16 and out.shape == lab.shape


def test_ddim_eta_is_a_setting():
    """eta 0 (default) is deterministic DDIM; eta 1 (the paper's) adds seeded noise at every step."""
    from fvae_ct.ldm import sample_latents

    net = build_denoiser(1, 0, None, mode="none", **TINY)
    args = dict(shape=(1, 1, 3, 8, 8), steps=4, seed=3)
    z0 = sample_latents(net, make_scheduler(sampler=True), **args)
    assert torch.equal(z0, sample_latents(net, make_scheduler(sampler=True), **args, eta=0.0))
    z1 = sample_latents(net, make_scheduler(sampler=True), **args, eta=1.0)
    assert torch.equal(z1, sample_latents(net, make_scheduler(sampler=True), **args, eta=1.0))  # seeded
    assert float((z1 - z0).abs().mean()) > 0.05
    with pytest.raises(ValueError, match="eta applies to DDIM"):
        sample_latents(net, make_scheduler("rflow", sampler=True), **args, eta=1.0)
    assert SamplingInferer(eta=1.0, progress=False).eta == 1.0


def test_paper_stage3d_timestep_draw():
    """timesteps paper_3d: P(t) proportional to 2000 - t over 0..999, whose mean is 666166500 / 1500500 = 443.95."""
    pb = LDMPrepareBatch(make_scheduler(), timesteps="paper_3d", seed=0)
    t = pb._timesteps(40000).double()
    assert abs(float(t.mean()) - 666166500 / 1500500) < 5 and int(t.min()) >= 0 and int(t.max()) <= 999
    lo, hi = float((t < 100).double().mean()), float((t >= 900).double().mean())
    assert lo / hi == pytest.approx(sum(2000 - k for k in range(100)) / sum(2000 - k for k in range(900, 1000)),
                                    rel=0.08)
    u = LDMPrepareBatch(make_scheduler(), seed=0)._timesteps(40000).double()
    assert abs(float(u.mean()) - 499.5) < 5
    with pytest.raises(ValueError, match="timesteps must be"):
        LDMPrepareBatch(make_scheduler(), timesteps="cosine")


def test_paper_overlay_sets_the_official_recipe_and_runs_end_to_end(assets, tmp_path, monkeypatch):
    """configs/paper.yaml layered on prepare / train / inference: the recipe reaches the components (checked on the
    parsed configs), and prepare -> 2d -> 3d -> generate runs with tiny sizes (identity VAE instead of LeanVAE)."""
    from conftest import PY, ROOT, run
    from monai.bundle import ConfigParser

    conf = ROOT / "bundles" / "fvae_ldm" / "configs"
    seg = assets / "ct" / "totalseg_ct_sm_3mm_seg.nii.gz"
    (tmp_path / "datalist.json").write_text(json.dumps([{
        "image": str(assets / "ct" / "totalseg_ct_sm_3mm.nii.gz"), "label": str(seg), "report": "Liver normal."}]))
    tiny = ["--vae", "identity", "--unet_channels", "[8,16]", "--attention_levels", "[False,True]",
            "--consistency_levels", "[0,1]", "--num_res_blocks", "1", "--num_head_channels", "8",
            "--norm_num_groups", "8", "--train_depth", "5", "--bundle_root", str(tmp_path)]
    train_cfg = f"['{conf / 'train.yaml'}','{conf / 'paper.yaml'}']"
    # the recipe, as parsed
    p = ConfigParser()
    p.read_config([str(conf / "train.yaml"), str(conf / "paper.yaml")])
    p.update({"stage": "3d", "batch_size": 4})
    assert p.get_parsed_content("learning_rate") == pytest.approx(2e-5)
    # the official rule scales by the number of GPUs too (torchrun's WORLD_SIZE): 5e-6 x 4 x 4 = 8e-5
    with monkeypatch.context() as mp:
        mp.setenv("WORLD_SIZE", "4")
        q = ConfigParser()
        q.read_config([str(conf / "train.yaml"), str(conf / "paper.yaml")])
        q.update({"stage": "3d", "batch_size": 4})
        assert q.get_parsed_content("learning_rate") == pytest.approx(8e-5)
    assert p.get_parsed_content("timesteps") == "paper_3d" and p.get_parsed_content("ema_decay") == 0.0
    p["stage"] = "2d"
    assert p.get_parsed_content("learning_rate") == pytest.approx(2e-6) and p.get_parsed_content("ema_decay") == 0.9999
    assert p["vae"] == "leanvae_dim16" and p["train_depth"] == 17 and p["mask_encoding"] == "vae"
    assert p["consistency"] == "conv_every" and p["attention_levels"] == [False, True, True, True]
    q = ConfigParser()
    q.read_config([str(conf / "inference.yaml"), str(conf / "paper.yaml")])
    assert (q["eta"], q["guidance"], q["depth_overlap"], q["depth_shift"], q["steps"]) == (1.0, 1.0, 0, False, 20)
    # end to end with tiny sizes
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", f"['{conf / 'prepare.yaml'}','{conf / 'paper.yaml'}']",
             *tiny[:2], "--bundle_root", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((tmp_path / "latents" / "latent_stats.json").read_text())
    assert stats["mask_encoding"] == "vae" and stats["mask_label_scale"] == 400
    assert stats["text_encoder"]["max_length"] == 512 and stats["text_encoder"]["padding"] == "attend"
    assert (stats["mask_gain"], stats["body_mask"], stats["scale_factor"]) == (1.0, True, 1.52)
    for stage in ("2d", "3d"):
        r = run([PY, "-m", "monai.bundle", "run", "--config_file", train_cfg, *tiny, "--stage", stage,
                 "--samples_per_epoch", "4", "--batch_size", "2", "--max_epochs", "1"])
        assert r.returncode == 0, r.stderr[-3000:]
    c3 = torch.load(tmp_path / "models" / "model_3d.pt", weights_only=True)
    assert c3["record"]["train_depth"] == 5 and any(k.endswith(".depth.depth.conv.weight") for k in c3["model"])
    for k in c3["model"]:  # stage 3d without EMA: the saved EMA copy is the weights
        assert torch.equal(c3["model"][k], c3["ema"][k]), k
    out, mask = tmp_path / "gen", tmp_path / "mask_12.nii.gz"  # 12 of the 30 slices: 3 depth chunks (5, 5, 2)
    nib.save(nib.load(str(seg)).slicer[:, :, 9:21], str(mask))
    r = run([PY, "-m", "monai.bundle", "run", "--config_file", f"['{conf / 'inference.yaml'}','{conf / 'paper.yaml'}']",
             *tiny, "--mask", str(mask), "--report", "Liver normal.", "--output_dir", str(out), "--steps", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    img, cropped = nib.load(str(out / "mask_12_generated.nii.gz")), nib.load(str(mask))
    assert img.shape == cropped.shape and img.get_data_dtype() == np.int16 and np.allclose(img.affine, cropped.affine)


def test_cases_of_different_sizes_train_together(tmp_path):
    """Found by `make ldm-demo`: two CTs with different in-plane sizes could not form a batch. Every item is padded
    (replicating the edge) to the largest latent size of the cache, rounded up to the UNet's multiple."""
    from fvae_ct.ldm import LatentCacheDataset, collate_latents

    a = {"latent": torch.randn(2, 3, 5, 6), "mask": torch.rand(1, 3, 5, 6)}
    b = {"latent": torch.randn(2, 3, 9, 4), "mask": torch.rand(1, 3, 9, 4)}
    for n, r in (("a", a), ("b", b)):
        torch.save(r, tmp_path / f"{n}.pt")
    ds = LatentCacheDataset(str(tmp_path), depth=3, multiple=4, samples_per_epoch=2)
    assert ds.hw == (12, 8)
    batch = collate_latents([ds[0], ds[1]])
    assert batch["latent"].shape == (2, 2, 3, 12, 8) and batch["mask"].shape == (2, 1, 3, 12, 8)
    assert torch.equal(batch["latent"][0, :, :, :5, :6], a["latent"])
    assert torch.equal(batch["latent"][1, :, :, :9, :4], b["latent"])
    assert torch.equal(batch["latent"][0, :, :, 11, 7], a["latent"][:, :, 4, 5])  # the corner, replicated
    assert torch.equal(batch["mask"][1, :, :, 3, 7], b["mask"][:, :, 3, 3])


def test_stage2d_draws_a_timestep_per_slice():
    """Found by `make ldm-demo` (too few noise levels per step for a short run): in stage 2d every latent slice of a
    window gets its own timestep; the noisy input, the target and the network's per-slice timesteps agree."""
    sched = make_scheduler()
    pb = LDMPrepareBatch(sched, scale_factor=2.0, p_uncond_mask=0, p_uncond_text=0, p_uncond_both=0, seed=0,
                         per_slice=True)
    z = torch.randn(2, 3, 5, 4, 4)
    ctx = torch.randn(2, 4, 8)
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    x, eps, _, kw = pb({"latent": z, "text": ctx, "text_mask": cmask})
    t = kw["timesteps"]
    assert t.shape == (10,) and len(set(t.tolist())) >= 8
    for i in range(2):
        for k in range(5):
            a = sched.alphas_cumprod[t[i * 5 + k]]
            assert torch.allclose(x[i, :, k], a.sqrt() * 2.0 * z[i, :, k] + (1 - a).sqrt() * eps[i, :, k], atol=1e-6)
    # the 2D model applies slice (i, k) at its own timestep, also when padded texts split the batch
    net = build_denoiser(3, 0, 8, mode="none", **TINY).eval()
    with torch.no_grad():
        y = net(x, t, ctx, cmask)
        for i in range(2):
            n = int(cmask[i].sum())
            for k in (0, 4):
                one = net(x[i : i + 1, :, k : k + 1], t[i * 5 + k : i * 5 + k + 1], ctx[i : i + 1, :n])
                assert torch.allclose(y[i, :, k], one[0, :, 0], atol=1e-5)
    # stage 3d keeps one timestep per window
    t3 = LDMPrepareBatch(sched, seed=0)({"latent": z})[3]["timesteps"]
    assert t3.shape == (2,)
