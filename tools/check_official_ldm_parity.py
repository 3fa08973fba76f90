"""Parity of fvae_ldm with the paper's official generation code (qic999/Foundation-VAE, CT-Generation-Healthy).

    git clone https://github.com/qic999/Foundation-VAE /src/Foundation-VAE       # or any checkout of it
    .venv/bin/python tools/check_official_ldm_parity.py --official /src/Foundation-VAE [--fixture] [--out DIR]

Everything runs on the CPU in fp32 with seeded random weights (no released weights are needed):
1. the official ``openaimodel_pseudo3D.UNetModel`` at a small width (``--width``, default 32) with its temporal convs
   perturbed away from the identity, saved as an official Lightning checkpoint (``state_dict`` with
   ``model.diffusion_model.*``, a LitEma ``model_ema.*`` copy and ``text_transformer.*``), loaded through
   :func:`fvae_ct.ldm.official.load_official_checkpoint` into :func:`~fvae_ct.ldm.official.official_denoiser`;
2. the noise prediction of both for the same latent volume, timestep, mask latents and context, at depth 17 (the
   official code hard-codes 17 slices) for one and two volumes, and at depths 5 and 9 against the official UNet
   whose temporal convs are told that depth (its ``PseudoConv3d`` with ``f`` = depth, otherwise its own code);
3. a whole DDIM run (10 steps, eta 0 and 1, the same initial and step noise) of the official ``DDIMSampler`` (its
   buffers kept on the CPU: its ``register_buffer`` moves them to CUDA) on the official UNet (``apply_model`` as
   its ``DiffusionWrapper`` does it: image and mask latents concatenated on
   channels, text as cross-attention context; schedule from its ``make_beta_schedule``) against
   :func:`fvae_ct.ldm.sampling.sample_latents` with the bundle's sampler settings;
4. the text path: a tiny random ``BertModel`` through the official calls (``BertTokenizer(do_lower_case=True)``,
   ``padding="max_length"``, ``truncation``, ``max_length``, ``BertModel(input_ids, attention_mask)[0]``) against
   ``FrozenTextEncoder(padding="attend")``, and the checkpoint's ``text_transformer.*`` weights loaded into it.
``--fixture`` writes ``tests/fixtures/official_ldm_unet_keys.json``: the full-size official UNet's tensor names and
shapes (built from the clone), which ``make test`` checks the key map against without the official code.
Prints a table and writes ``<out>/official_ldm_parity.json``; exits non-zero past the tolerances (1e-5 per network
call, 1e-4 for a sampling run, 1e-6 for text embeddings).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "official_ldm_unet_keys.json"
SUB = "Generation/CT-Generation-Healthy"


def official_modules(clone: Path):
    """Import the official UNet, DDIM sampler and schedule helpers from a checkout (``ldm`` put on ``sys.path``)."""
    root = clone / SUB
    if not (root / "ldm" / "modules" / "diffusionmodules" / "openaimodel_pseudo3D.py").is_file():
        raise SystemExit(f"{clone}: no {SUB}/ldm/modules/diffusionmodules/openaimodel_pseudo3D.py (a Foundation-VAE clone?)")
    sys.path.insert(0, str(root))
    from ldm.models.diffusion import ddim  # noqa: E402
    from ldm.modules.diffusionmodules import openaimodel_pseudo3D, util  # noqa: E402

    return openaimodel_pseudo3D, ddim, util


def with_depth(official_unet, depth: int):
    """The official UNet with its hard-coded ``f = 17`` replaced by ``depth`` in every ``PseudoConv3d`` (its own
    forward otherwise: ``(b f) c h w -> (b h w) c f``, Conv1d, back)."""
    from einops import rearrange

    def forward(self, x):
        b_f, c, h, w = x.shape
        x = rearrange(x, "(b f) c h w -> (b h w) c f", f=depth)
        x = self.temporal_conv(x)
        return rearrange(x, "(b h w) c f -> (b f) c h w", h=h, w=w)

    for m in official_unet.modules():
        if type(m).__name__ == "PseudoConv3d":
            m.forward = types.MethodType(forward, m)
    return official_unet


class OfficialHost(torch.nn.Module):
    """What the official ``DDIMSampler`` reads from its ``LatentDiffusion``: the schedule buffers (its
    ``register_schedule``: ``make_beta_schedule("linear", ...)``, float64 cumulative products) and ``apply_model``
    (its ``DiffusionWrapper``, conditioning_key ``crossattn``: ``cat([x, c_concat])`` and ``context=c_crossattn``)."""

    parameterization = "eps"

    def __init__(self, unet, util, linear_start=0.00085, linear_end=0.012, timesteps=1000):
        super().__init__()
        self.diffusion_model = unet
        betas = util.make_beta_schedule("linear", timesteps, linear_start=linear_start, linear_end=linear_end)
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.register_buffer("betas", f32(betas))
        self.register_buffer("alphas_cumprod", f32(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", f32(np.append(1.0, alphas_cumprod[:-1])))
        self.num_timesteps = timesteps

    @property
    def device(self):
        return self.betas.device

    def apply_model(self, x, t, cond):
        return self.diffusion_model(torch.cat([x, cond["c_concat"]], 1), t, context=cond["c_crossattn"])


def slices(v: torch.Tensor) -> torch.Tensor:
    """``[B, C, D, h, w]`` -> the official layout ``[B * D, C, h, w]`` (slice index fastest)."""
    b, c, d, h, w = v.shape
    return v.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)


def volume(v: torch.Tensor, b: int) -> torch.Tensor:
    bd, c, h, w = v.shape
    return v.reshape(b, bd // b, c, h, w).permute(0, 2, 1, 3, 4)


def tiny_bert(folder: Path):
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = "no focal lesion in the liver lung mild pleural effusion heart size is normal of".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(3)
    model = BertModel(cfg).eval()
    model.save_pretrained(folder)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, type=Path, help="a checkout of qic999/Foundation-VAE")
    ap.add_argument("--width", type=int, default=32, help="model_channels of the small official UNet")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "official_ldm_parity")
    ap.add_argument("--fixture", action="store_true", help="write the full-size key-layout fixture for make test")
    a = ap.parse_args(argv)
    openaimodel, ddim, util = official_modules(a.official.resolve())
    from transformers import BertModel, BertTokenizer

    from fvae_ct.ldm.diffusion import FrozenTextEncoder, make_scheduler
    from fvae_ct.ldm.sampling import sample_latents
    from fvae_ct.ldm.official import OFFICIAL_UNET, load_official_checkpoint, official_denoiser

    torch.set_grad_enabled(False)
    a.out.mkdir(parents=True, exist_ok=True)
    rows, ok = [], True

    def row(what, diff, tol):
        nonlocal ok
        ok &= diff <= tol
        rows.append({"check": what, "max_abs_diff": diff, "tolerance": tol, "passed": diff <= tol})
        print(f"{what:<72} {diff:.2e}  (<= {tol:g}) {'ok' if diff <= tol else 'FAILED'}", flush=True)

    if a.fixture:  # the full-size layout, straight from the official class
        full = openaimodel.UNetModel(**OFFICIAL_UNET, use_checkpoint=False)
        keys = {f"model.diffusion_model.{k}": list(v.shape) for k, v in full.state_dict().items()}
        FIXTURE.write_text(json.dumps({"source": f"{SUB} openaimodel_pseudo3D.UNetModel", "unet": keys}, indent=0) + "\n")
        print(f"wrote {FIXTURE} ({len(keys)} tensors, {sum(int(np.prod(s)) for s in keys.values()):,} parameters)")
        del full

    # 1. a small official UNet, temporal convs away from the identity, saved the official way
    ctx_dim, w = 24, a.width
    torch.manual_seed(0)
    off = openaimodel.UNetModel(**{**OFFICIAL_UNET, "model_channels": w, "context_dim": ctx_dim}, use_checkpoint=False)
    for p in off.parameters():
        p.add_(0.05 * torch.randn_like(p))  # zero-initialised outputs and identity temporal convs get weight
    off.eval()
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in off.state_dict().items()}
    bert = tiny_bert(a.out / "tiny_bert")
    sd = {f"model.diffusion_model.{k}": v for k, v in off.state_dict().items()}
    sd.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in ema.items()})
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int)})
    sd.update({f"text_transformer.{k}": v for k, v in bert.state_dict().items()})
    ckpt_path = a.out / "official_layout.ckpt"
    torch.save({"epoch": 70, "global_step": 1234, "pytorch-lightning_version": "1.4.2", "state_dict": sd,
                "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}, ckpt_path)
    ours = official_denoiser(model_channels=w, context_dim=ctx_dim)
    text_model = BertModel.from_pretrained(a.out / "tiny_bert")
    info = load_official_checkpoint(ckpt_path, ours, use_ema=False, text_model=text_model)
    ours.eval()
    print(f"loaded {ckpt_path.name}: {info}")

    # 2. one network call at depth 17 (batch 1 and 2), and at depths 5 and 9
    g = torch.Generator().manual_seed(1)
    for b, d in ((1, 17), (2, 17), (1, 5), (2, 9)):
        ref = with_depth(openaimodel.UNetModel(**{**OFFICIAL_UNET, "model_channels": w, "context_dim": ctx_dim},
                                               use_checkpoint=False), d) if d != 17 else off
        if d != 17:
            ref.load_state_dict(off.state_dict())
            ref.eval()
        x, m = torch.randn(b, 16, d, 16, 16, generator=g), torch.randn(b, 16, d, 16, 16, generator=g)
        ctx = torch.randn(b, 11, ctx_dim, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        want = volume(ref(slices(torch.cat([x, m], 1)), t.repeat_interleave(d), context=ctx.repeat_interleave(d, 0)), b)
        got = ours(torch.cat([x, m], 1), t, ctx)
        note = "" if d == 17 else f" (official PseudoConv3d told f={d})"
        row(f"noise prediction, {b} volume(s) of {d} latent slices{note}", float((want - got).abs().max()), 1e-5)
    # the EMA copy, when asked for
    ours_ema = official_denoiser(model_channels=w, context_dim=ctx_dim)
    assert load_official_checkpoint(ckpt_path, ours_ema, use_ema=True)["source"] == "ema"
    ref_ema = openaimodel.UNetModel(**{**OFFICIAL_UNET, "model_channels": w, "context_dim": ctx_dim}, use_checkpoint=False)
    ref_ema.load_state_dict(ema)
    x, t = torch.randn(1, 32, 17, 16, 16, generator=g), torch.tensor([500])
    ctx = torch.randn(1, 11, ctx_dim, generator=g)
    want = volume(ref_ema.eval()(slices(x), t.repeat(17), context=ctx.repeat(17, 1, 1)), 1)
    got = ours_ema.eval()(x, t, ctx)
    row("noise prediction with the checkpoint's EMA copy (model_ema.*)", float((want - got).abs().max()), 1e-5)

    # 3. a whole DDIM run: official DDIMSampler vs the bundle's sampler, the same noise
    host = OfficialHost(off, util)
    d, seed, steps = 17, 5, 10
    mask, ctx = torch.randn(1, 16, d, 16, 16, generator=g), torch.randn(1, 11, ctx_dim, generator=g)
    for eta in (0.0, 1.0):
        shape = (1, 16, d, 16, 16)
        x_t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        step_g = torch.Generator().manual_seed(seed + 1)
        noises = [slices(torch.randn(shape, generator=step_g)) for _ in range(steps)]
        ddim.noise_like = lambda shape, device, repeat=False: noises.pop(0)  # noqa: E731 - the same step noise
        sampler = ddim.DDIMSampler(host)
        # its register_buffer moves every schedule buffer to CUDA; here they stay on the CPU (nothing else changes)
        sampler.register_buffer = types.MethodType(lambda self, name, attr: setattr(self, name, attr), sampler)
        cond = {"c_concat": slices(mask), "c_crossattn": ctx.repeat(d, 1, 1)}
        want, _ = sampler.sample(S=steps, batch_size=d, shape=(16, 16, 16), conditioning=cond, eta=eta,
                                 x_T=slices(x_t), verbose=False)
        got = sample_latents(ours, make_scheduler("ddpm", sampler=True, ddim_spacing="ldm"), shape, mask, ctx, None,
                             guidance=1.0, steps=steps, seed=seed, depth_window=None, depth_overlap=0, eta=eta)
        row(f"DDIM sampling, {steps} steps, eta {eta:g}, 17 latent slices", float((volume(want, 1) - got).abs().max()), 1e-4)

    # 4. text: the official calls against the bundle's encoder
    texts = ["No focal lesion in the liver.", "Mild pleural effusion. Heart size is normal."]
    tok = BertTokenizer.from_pretrained(a.out / "tiny_bert", do_lower_case=True)
    tt = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=32)
    want = text_model(tt.input_ids, attention_mask=tt.attention_mask)[0]
    got, mask = FrozenTextEncoder(str(a.out / "tiny_bert"), max_length=32, padding="attend").encode(texts)
    row("text embeddings [2, 32, 24] (official tokenisation + BertModel)", float((want - got).abs().max()), 1e-6)
    row("text: all 32 tokens attended by the UNet (official: no mask)", float((mask != 1).sum()), 0)
    (a.out / "official_ldm_parity.json").write_text(json.dumps({"width": w, "rows": rows}, indent=1) + "\n")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
