"""Our Wan single-file conversion against the official Wan VAE code; and the key-layout fixture.

Needs a local clone of the official repository (nothing of it is copied into this repository):

    git clone https://github.com/Wan-Video/Wan2.2 /path/Wan2.2     # holds wan/modules/vae2_1.py and vae2_2.py
    # einops (imported by the official modules): pinned in the make install environment
    .venv/bin/python tools/check_wan_parity.py --wan-repo /path/Wan2.2 [--write-fixtures tests/fixtures]

For Wan 2.1 and 2.2 it builds the official ``WanVAE_`` at a small width with random weights, converts its state dict
with :func:`fvae_ct.vae.wan_checkpoint.original_to_diffusers` into diffusers' ``AutoencoderKLWan`` (strict), encodes
a random 9-frame clip with both (posterior mean) and decodes the same latents, and prints the largest absolute
differences (the official decoder output clamped to [-1, 1], as its wrapper does). ``--write-fixtures DIR`` writes
``wan_keys.json``: the parameter names and shapes of the full-size official configurations, which
tests/test_wan_checkpoint.py checks our inverse map against. Exit status 1 if a difference exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from fvae_ct.vae.wan_checkpoint import original_to_diffusers

# (official module, official WanVAE_ arguments) of the released checkpoints, and the tiny ones for the parity run
OFFICIAL = {
    "wan2.1": ("vae2_1.py", dict(dim=96, z_dim=16), dict(dim=8, z_dim=4)),
    "wan2.2": ("vae2_2.py", dict(dim=160, dec_dim=256, z_dim=48), dict(dim=8, dec_dim=16, z_dim=4)),
}
COMMON = dict(dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True])


def _module(repo: Path, file: str):
    spec = importlib.util.spec_from_file_location(f"official_{file[:-3]}", repo / "wan" / "modules" / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _diffusers_config(name: str, kw: dict) -> dict:
    cfg = dict(base_dim=kw["dim"], z_dim=kw["z_dim"], latents_mean=[0.0] * kw["z_dim"],
               latents_std=[1.0] * kw["z_dim"], **COMMON)
    if name == "wan2.2":
        cfg.update(decoder_base_dim=kw["dec_dim"], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                   scale_factor_spatial=16)
    return cfg


def _one_key_per_line(layouts: dict) -> str:
    """JSON with one parameter (name and shape) per line."""
    blocks = []
    for name in sorted(layouts):
        rows = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(layouts[name].items()))
        blocks.append(f"  {json.dumps(name)}: {{\n{rows}\n  }}")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wan-repo", required=True, type=Path)
    ap.add_argument("--write-fixtures", type=Path)
    ap.add_argument("--tol", type=float, default=1e-5)
    a = ap.parse_args(argv)
    layouts, worst = {}, 0.0
    for name, (file, full, tiny) in OFFICIAL.items():
        mod = _module(a.wan_repo, file)
        with torch.device("meta"):
            layouts[name] = {k: list(v.shape) for k, v in mod.WanVAE_(**full, **COMMON).state_dict().items()}
        torch.manual_seed(0)
        off = mod.WanVAE_(**tiny, **COMMON).eval()
        with torch.no_grad():
            for p in off.parameters():
                p.add_(0.05 * torch.randn_like(p))
        cfg = _diffusers_config(name, tiny)
        ours = AutoencoderKLWan(**cfg).eval()
        ours.load_state_dict(original_to_diffusers(off.state_dict(), cfg), strict=True)
        x = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        scale = [torch.zeros(tiny["z_dim"]), torch.ones(tiny["z_dim"])]
        with torch.no_grad():
            mu_off, mu = off.encode(x, scale), ours.encode(x).latent_dist.mode()
            y_off, y = off.decode(mu, scale).clamp(-1, 1), ours.decode(mu).sample
        d_enc, d_dec = float((mu_off - mu).abs().max()), float((y_off - y).abs().max())
        worst = max(worst, d_enc, d_dec)
        print(f"{name}: {len(layouts[name])} tensors; encode max |diff| {d_enc:.3g}, decode max |diff| {d_dec:.3g}")
    if a.write_fixtures:
        a.write_fixtures.mkdir(parents=True, exist_ok=True)
        (a.write_fixtures / "wan_keys.json").write_text(_one_key_per_line(layouts))
        print(f"wrote {a.write_fixtures / 'wan_keys.json'}")
    return int(worst > a.tol)


if __name__ == "__main__":
    sys.exit(main())
