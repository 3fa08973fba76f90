"""Our IV-VAE and LeanVAE against the official code, with the same random weights; and the key-layout fixtures.

Needs local clones of the official repositories (nothing of them is copied into this repository):

    git clone https://github.com/ali-vilab/iv-vae            /path/iv-vae
    git clone https://github.com/westlake-repl/LeanVAE       /path/LeanVAE
    # einops, beartype, PyWavelets (imported by the official modules): pinned in the make install environment
    .venv/bin/python tools/check_official_parity.py --ivvae-repo /path/iv-vae --leanvae-repo /path/LeanVAE \
        [--write-fixtures tests/fixtures]

For each model it builds the official network at a small width with reproducible weights
(:func:`fvae_ct.testing.keyed_weights`), copies its state dict into ours with ``strict=True``, encodes and
decodes the same random clip with both and prints the largest absolute differences (the official IV-VAE
``encode`` samples the posterior; it is compared through its posterior mean). ``--write-fixtures DIR``
writes what tests/test_ivvae_leanvae.py checks ours against: the parameter names and shapes of the
full-size official configurations (``ivvae_keys.json``, ``leanvae_keys.json``) and the official outputs on
the probe clips (``official_outputs.json``: shape, mean, std and 64 sampled values).
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

from fvae_ct.testing import keyed_weights, probe, probe_input
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


IVVAE_PROBE = {"z_dim": 4, "dim": 8, "clip": (1, 3, 13, 32, 48)}
LEANVAE_PROBE = {"config": dict(embedding_dim=48, latent_dim=4, ista_iter_num=2, ista_layer_num=1, l_dim=16,
                                h_dim=32, sep_num_layer=1, fusion_num_layer=2), "clip": (1, 3, 13, 32, 48)}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_ivvae(repo: Path, fixtures: Path | None, outputs: dict) -> float:
    Official = _official_ivvae(repo)
    off = Official(dim=IVVAE_PROBE["dim"], z_dim=IVVAE_PROBE["z_dim"]).eval()
    off.load_state_dict(keyed_weights(off), strict=True)
    ours = IVVAENet(z_dim=IVVAE_PROBE["z_dim"], dim=IVVAE_PROBE["dim"]).eval()
    ours.load_state_dict(off.state_dict(), strict=True)
    x = probe_input(IVVAE_PROBE["clip"], -1.0, 1.0)
    with torch.no_grad():
        off.sample = lambda mu, log_var, deterministic=False: mu  # compare posterior means
        z_off = off.encode(x)  # scale_factor 1, shift 0 at construction
        y_off = off.decode(z_off)
        z_ours, y_ours = ours.posterior_mean(x), ours.decode(z_off)
    d_enc, d_dec = _diff(z_off, z_ours), _diff(y_off, y_ours)
    print(f"ivvae (z4 dim8, clip {tuple(x.shape[2:])}): latent {tuple(z_ours.shape)} max|diff| {d_enc:.2e} "
          f"(latent std {z_off.std():.3f}); decoded {tuple(y_ours.shape)} max|diff| {d_dec:.2e} "
          f"(output std {y_off.std():.3f})")
    outputs["ivvae"] = {"probe": IVVAE_PROBE, "latent": probe(z_off), "decoded": probe(y_off)}
    if fixtures is not None:
        with torch.device("meta"):
            layouts = {f"z{z}_dim{d}": _layout(Official(dim=d, z_dim=z)) for z, d in IVVAE_VARIANTS}
        (fixtures / "ivvae_keys.json").write_text(json.dumps(layouts, separators=(",", ":")) + "\n")
    return max(d_enc, d_dec)


def check_leanvae(repo: Path, fixtures: Path | None, outputs: dict) -> float:
    Official = _official_leanvae(repo)
    cfg = LEANVAE_PROBE["config"]
    off = Official(argparse.Namespace(**cfg, use_tile_inference=False)).eval()
    off.load_state_dict(keyed_weights(off), strict=True)
    ours = LeanVAENet(**cfg).eval()
    ours.load_state_dict(off.state_dict(), strict=True)
    x = probe_input(LEANVAE_PROBE["clip"], -0.5, 0.5)
    with torch.no_grad():
        z_off, z_ours = off.encode(x), ours.encode(x)
        y_off, y_ours = off.decode(z_off), ours.decode(z_off)
        # streamed one latent frame at a time must equal the official whole-clip pass
        d_stream = max(_diff(ours.encode(x, chunk=1), z_off), _diff(ours.decode(z_off, chunk=1), y_off))
        img_off = off.decode(off.encode(x[:, :, 0]), is_image=True)
        img_ours = ours.decode(ours.encode(x[:, :, :1]))[:, :, 0]
    d_enc, d_dec, d_img = _diff(z_off, z_ours), _diff(y_off, y_ours), _diff(img_off, img_ours)
    print(f"leanvae (tiny, clip {tuple(x.shape[2:])}): latent {tuple(z_ours.shape)} max|diff| {d_enc:.2e} "
          f"(latent std {z_off.std():.3f}); decoded {tuple(y_ours.shape)} max|diff| {d_dec:.2e} (output std "
          f"{y_off.std():.3f}); single image max|diff| {d_img:.2e}; streamed 1 latent frame at a time max|diff| "
          f"{d_stream:.2e}")
    outputs["leanvae"] = {"probe": LEANVAE_PROBE, "latent": probe(z_off), "decoded": probe(y_off)}
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
    worst, outputs = 0.0, {}
    if a.ivvae_repo:
        worst = max(worst, check_ivvae(a.ivvae_repo, a.write_fixtures, outputs))
    if a.leanvae_repo:
        worst = max(worst, check_leanvae(a.leanvae_repo, a.write_fixtures, outputs))
    if a.write_fixtures is not None and worst <= a.tol:
        (a.write_fixtures / "official_outputs.json").write_text(json.dumps(outputs) + "\n")
    print("PASSED" if worst <= a.tol else f"FAILED: max difference {worst:.2e} > {a.tol}")
    return 0 if worst <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
