"""Our IV-VAE and LeanVAE against the official code, with the same random weights; and the key-layout fixtures.

Needs local clones of the official repositories (nothing of them is copied into this repository):

    git clone https://github.com/ali-vilab/iv-vae            /path/iv-vae
    git clone https://github.com/westlake-repl/LeanVAE       /path/LeanVAE
    pip install einops beartype PyWavelets                   # imported by the official modules
    python tools/check_official_parity.py --ivvae-repo /path/iv-vae --leanvae-repo /path/LeanVAE \
        [--write-fixtures tests/fixtures]

For each model it builds the official network at a small width, copies its random state dict into ours
with ``strict=True``, encodes and decodes the same random clip with both and prints the largest absolute
differences (the official IV-VAE ``encode`` samples the posterior; it is compared through its posterior
mean). ``--write-fixtures`` writes the parameter names and shapes of the full-size official configurations
(``ivvae_keys.json``, ``leanvae_keys.json``) that tests/test_ivvae_leanvae.py checks ours against.
Exit status 1 if any difference exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path

import torch

from fvae_ct.vae.ivvae import IVVAE_VARIANTS, IVVAENet
from fvae_ct.vae.leanvae import LEANVAE_CONFIGS, LeanVAENet


def _layout(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _official_ivvae(repo: Path):
    sys.path.insert(0, str(repo))
    return importlib.import_module("models.vae3d").VAutoencoder3d


def _official_leanvae(repo: Path):
    """The official LeanVAE class, imported without the package __init__ (which pulls training deps)."""
    root = repo / "LeanVAE"
    for name in ("LeanVAE", "LeanVAE.models", "LeanVAE.utils", "LeanVAE.modules"):
        m = types.ModuleType(name)
        m.__path__ = [str(root / name.partition(".")[2])] if "." in name else [str(root)]
        sys.modules[name] = m
    mods = sys.modules["LeanVAE.modules"]
    for sub in ("backbones", "vae"):
        vars(mods).update({k: v for k, v in vars(importlib.import_module(f"LeanVAE.modules.{sub}")).items()
                           if not k.startswith("_")})
    return importlib.import_module("LeanVAE.models.autoencoder").LeanVAE


def check_ivvae(repo: Path, fixtures: Path | None) -> float:
    Official = _official_ivvae(repo)
    torch.manual_seed(0)
    off = Official(dim=8, z_dim=4).eval()
    with torch.no_grad():  # random, non-trivial norm gains
        for k, v in off.state_dict().items():
            if k.endswith("gamma"):
                v.uniform_(0.5, 1.5)
    ours = IVVAENet(z_dim=4, dim=8).eval()
    ours.load_state_dict(off.state_dict(), strict=True)
    x = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        off.sample = lambda mu, log_var, deterministic=False: mu  # compare posterior means
        z_off = off.encode(x)  # scale_factor 1, shift 0 at construction
        z_ours = ours.posterior_mean(x)
        y_off, y_ours = off.decode(z_off), ours.decode(z_off)
    d_enc = (z_off - z_ours).abs().max().item()
    d_dec = (y_off - y_ours).abs().max().item()
    print(f"ivvae (z4 dim8, clip 9x32x48): latent {tuple(z_ours.shape)} max|diff| {d_enc:.2e} "
          f"(latent std {z_off.std():.3f}); decoded {tuple(y_ours.shape)} max|diff| {d_dec:.2e} "
          f"(output std {y_off.std():.3f})")
    if fixtures is not None:
        with torch.device("meta"):
            layouts = {f"z{z}_dim{d}": _layout(Official(dim=d, z_dim=z)) for z, d in IVVAE_VARIANTS}
        (fixtures / "ivvae_keys.json").write_text(json.dumps(layouts, separators=(",", ":")) + "\n")
    return max(d_enc, d_dec)


def check_leanvae(repo: Path, fixtures: Path | None) -> float:
    Official = _official_leanvae(repo)
    cfg = dict(embedding_dim=48, latent_dim=4, ista_iter_num=2, ista_layer_num=1, l_dim=16, h_dim=32,
               sep_num_layer=1, fusion_num_layer=2, use_tile_inference=False)
    torch.manual_seed(0)
    off = Official(argparse.Namespace(**cfg)).eval()
    ours = LeanVAENet(**{k: v for k, v in cfg.items() if k != "use_tile_inference"}).eval()
    ours.load_state_dict(off.state_dict(), strict=True)
    x = torch.rand(1, 3, 9, 32, 48) - 0.5
    with torch.no_grad():
        z_off, z_ours = off.encode(x), ours.encode(x)
        y_off, y_ours = off.decode(z_off), ours.decode(z_off)
        # streamed one latent frame at a time must equal the official whole-clip pass
        d_stream = max((ours.encode(x, chunk=1) - z_off).abs().max().item(),
                       (ours.decode(z_off, chunk=1) - y_off).abs().max().item())
        img_off, img_ours = off.decode(off.encode(x[:, :, 0]), is_image=True), ours.decode(ours.encode(x[:, :, :1]))
    d_enc = (z_off - z_ours).abs().max().item()
    d_dec = (y_off - y_ours).abs().max().item()
    d_img = (img_off - img_ours[:, :, 0]).abs().max().item()
    print(f"leanvae (tiny, clip 9x32x48): latent {tuple(z_ours.shape)} max|diff| {d_enc:.2e} (latent std "
          f"{z_off.std():.3f}); decoded {tuple(y_ours.shape)} max|diff| {d_dec:.2e} (output std {y_off.std():.3f}); "
          f"single image max|diff| {d_img:.2e}; streamed 1 latent frame at a time max|diff| {d_stream:.2e}")
    if fixtures is not None:
        layouts = {}
        for name, c in LEANVAE_CONFIGS.items():
            with torch.device("meta"):
                layouts[name] = _layout(Official(argparse.Namespace(**c, use_tile_inference=False)))
        (fixtures / "leanvae_keys.json").write_text(json.dumps(layouts, separators=(",", ":")) + "\n")
    return max(d_enc, d_dec, d_img, d_stream)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ivvae-repo", type=Path)
    ap.add_argument("--leanvae-repo", type=Path)
    ap.add_argument("--write-fixtures", type=Path, default=None)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    worst = 0.0
    if a.ivvae_repo:
        worst = max(worst, check_ivvae(a.ivvae_repo, a.write_fixtures))
    if a.leanvae_repo:
        worst = max(worst, check_leanvae(a.leanvae_repo, a.write_fixtures))
    print("PASSED" if worst <= a.tol else f"FAILED: max difference {worst:.2e} > {a.tol}")
    return 0 if worst <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
