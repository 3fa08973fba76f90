"""The paper's released generation model: the official UNet's key map at full size (against the layout recorded from
the official code, tests/fixtures/official_ldm_unet_keys.json), an official-layout Lightning checkpoint loaded into
our denoiser, and loading that never runs pickled code. Numerical parity with the official code itself:
tools/check_official_ldm_parity.py (needs a clone of it)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ROOT

from fvae_ct.errors import WeightsError
from fvae_ct.ldm.official import (
    OFFICIAL_UNET,
    convert_official_unet,
    load_official_checkpoint,
    official_denoiser,
    official_key_map,
    safe_load,
)

FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "official_ldm_unet_keys.json").read_text())["unet"]
PREFIX = "model.diffusion_model."


def to_official(net, width: int) -> dict:
    """Our denoiser's weights written in the official layout (the inverse of the map)."""
    sd, out = net.state_dict(), {}
    for off, ours in official_key_map(width).items():
        for p in ("weight", "bias"):
            if f"unet.{ours}.{p}" in sd:
                v = sd[f"unet.{ours}.{p}"]
                out[f"{off}.{p}"] = v[..., 0, 0] if "temporal_conv" in off and p == "weight" else v
    return out


def tiny(seed: int, width: int = 32):
    torch.manual_seed(seed)
    net = official_denoiser(model_channels=width, context_dim=24)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_full_size_key_map_matches_the_official_layout():
    assert len(FIXTURE) == 792 and sum(torch.Size(s).numel() for s in FIXTURE.values()) == 481_863_776
    with torch.device("meta"):
        ours = official_denoiser().state_dict()
    official = {k[len(PREFIX) :]: torch.empty(s, device="meta") for k, s in FIXTURE.items()}
    converted = convert_official_unet(official, ours, official_key_map())  # keys and shapes, or WeightsError
    assert set(converted) == set(ours) and len(ours) == len(official)
    targets = {f"unet.{v}.{p}" for v in official_key_map().values() for p in ("weight", "bias")}
    assert set(ours) <= targets  # every tensor of ours has an official source: nothing keeps its random init
    temporal = [k for k in FIXTURE if "tem" in k]
    assert len(temporal) == 104 and all(FIXTURE[k][-1] == 3 for k in temporal if k.endswith("weight"))
    assert OFFICIAL_UNET["model_channels"] == 224 and OFFICIAL_UNET["context_dim"] == 768


def test_official_layout_checkpoint_round_trip_ema_and_text(tmp_path):
    from transformers import BertConfig, BertModel

    src, ema_src = tiny(1), tiny(2)
    bert = BertModel(BertConfig(vocab_size=40, hidden_size=24, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=32, max_position_embeddings=32))
    sd = {PREFIX + k: v for k, v in to_official(src, 32).items()}
    sd.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in to_official(ema_src, 32).items()})
    sd.update({f"text_transformer.{k}": v for k, v in bert.state_dict().items()})
    path = tmp_path / "epoch=000070.ckpt"
    torch.save({"epoch": 70, "global_step": 9, "state_dict": sd, "callbacks": {}, "optimizer_states": []}, path)
    x, t, ctx = torch.randn(1, 32, 17, 16, 16), torch.tensor([321]), torch.randn(1, 9, 24)
    for use_ema, ref in ((False, src), (True, ema_src)):
        net = official_denoiser(model_channels=32, context_dim=24)
        text = BertModel(bert.config)
        info = load_official_checkpoint(path, net, use_ema=use_ema, text_model=text)
        assert info == {"source": "ema" if use_ema else "model", "text": True, "temporal": True, "epoch": 70,
                        "global_step": 9}
        with torch.no_grad():
            assert torch.equal(net.eval()(x, t, ctx), ref(x, t, ctx))
        assert all(torch.equal(text.state_dict()[k], v) for k, v in bert.state_dict().items())
    # another depth than the official 17 works on our side (the depth is read from the input)
    with torch.no_grad():
        assert net(torch.randn(2, 32, 6, 16, 16), torch.tensor([1, 2]), torch.randn(2, 9, 24)).shape == (2, 16, 6, 16, 16)


def test_a_2d_stage_checkpoint_loads_with_identity_depth_convs(tmp_path):
    src = tiny(3)
    sd = {PREFIX + k: v for k, v in to_official(src, 32).items() if "tem" not in k}
    torch.save({"state_dict": sd}, tmp_path / "2d.ckpt")
    net = official_denoiser(model_channels=32, context_dim=24)
    assert load_official_checkpoint(tmp_path / "2d.ckpt", net)["temporal"] is False
    w = net.unet.conv_in.depth.depth.conv.weight
    assert torch.equal(w[:, :, 1, 0, 0], torch.eye(w.shape[0])) and float(w.detach()[:, :, [0, 2]].abs().sum()) == 0.0


def test_a_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path):
    sd = {PREFIX + k: v for k, v in to_official(tiny(4), 32).items()}
    bad = dict(sd)
    del bad[PREFIX + "middle_block.1.proj_in.weight"]
    bad[PREFIX + "extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": bad}, tmp_path / "bad.ckpt")
    with pytest.raises(WeightsError, match=r"1 missing \['middle_block.1.proj_in.weight'\], 1 unexpected \['extra"):
        load_official_checkpoint(tmp_path / "bad.ckpt", official_denoiser(model_channels=32, context_dim=24))
    # a wider official model: the shapes are named
    torch.save({"state_dict": sd}, tmp_path / "w32.ckpt")
    with pytest.raises(WeightsError, match="shapes do not fit"):
        load_official_checkpoint(tmp_path / "w32.ckpt", official_denoiser(model_channels=64, context_dim=24))
    torch.save({"state_dict": {"first_stage_model.x": torch.zeros(1)}}, tmp_path / "vae.ckpt")
    with pytest.raises(WeightsError, match="no 'model.diffusion_model.\\*' tensors"):
        load_official_checkpoint(tmp_path / "vae.ckpt", official_denoiser(model_channels=32, context_dim=24))


class _Payload:
    """What a malicious checkpoint carries: unpickling it would call os.system."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def test_loading_never_runs_pickled_code(tmp_path):
    flag = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {PREFIX + "time_embed.0.weight": torch.zeros(1)}, "hyper_parameters": _Payload(flag)},
               path)
    with pytest.raises(WeightsError, match=r"evil.ckpt: refused, it needs code to load \(.*system"):
        safe_load(path)
    with pytest.raises(WeightsError, match="refused"):
        load_official_checkpoint(path, official_denoiser(model_channels=32, context_dim=24))
    assert not flag.exists()
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match="cut.ckpt: not a readable PyTorch checkpoint"):
        safe_load(tmp_path / "cut.ckpt")


def test_lightning_classes_in_a_checkpoint_are_read_as_inert_data(tmp_path, monkeypatch):
    """PL 1.4 keys ``callbacks`` by the callback class: the file loads without Lightning installed or imported."""
    import sys
    import types

    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):  # pickle imports the module path to save
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    sd = {PREFIX + k: v for k, v in to_official(tiny(5), 32).items()}
    torch.save({"state_dict": sd, "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}}},
               tmp_path / "pl.ckpt")
    for name in (mod.__name__, "pytorch_lightning.callbacks", "pytorch_lightning"):  # not importable while loading
        monkeypatch.delitem(sys.modules, name)
    ckpt = safe_load(tmp_path / "pl.ckpt")
    (key,) = ckpt["callbacks"]
    assert key.__name__ == "ModelCheckpoint" and key is not ModelCheckpoint
    assert load_official_checkpoint(tmp_path / "pl.ckpt", official_denoiser(model_channels=32, context_dim=24))


def test_bundle_generates_with_an_official_layout_checkpoint(tmp_path):
    """``inference.yaml`` + ``paper_pretrained.yaml`` with a tiny official-layout checkpoint (and a tiny LeanVAE with
    16 latent channels, a tiny CXR-BERT-like encoder), the official long-volume procedure: a CT on the mask's grid,
    int16 HU in the window."""
    import nibabel as nib
    import numpy as np
    from conftest import PY, run
    from test_ldm_paper import tiny_bert
    from transformers import BertModel

    from fvae_ct.vae.leanvae import LeanVAENet

    torch.manual_seed(0)
    args = dict(embedding_dim=32, latent_dim=16, ista_iter_num=1, ista_layer_num=1, l_dim=16, h_dim=16,
                sep_num_layer=1, fusion_num_layer=1)
    torch.save({"args": args, "state_dict": LeanVAENet(**args).state_dict()}, tmp_path / "lean.ckpt")
    bert_dir = tiny_bert(tmp_path / "cxr-bert")  # hidden size 32: the UNet's context width follows it
    text = BertModel.from_pretrained(bert_dir)
    with torch.no_grad():
        for p in text.parameters():
            p.mul_(1.5)  # the checkpoint's text weights differ from the folder's: they are the ones used
    sd = {PREFIX + k: v for k, v in to_official(tiny_32(), 32).items()}
    sd.update({f"text_transformer.{k}": v for k, v in text.state_dict().items()})
    torch.save({"epoch": 70, "state_dict": sd}, tmp_path / "official.ckpt")
    lab = np.zeros((24, 20, 80), np.int16)  # 80 slices: two official windows, a second pass, one swapped seam
    lab[4:18, 3:15, 1:78] = 5
    lab[8:12, 6:10, 30:50] = 21
    affine = np.diag([-1.2, -1.2, 2.5, 1.0])
    affine[:3, 3] = [30.0, 20.0, -40.0]
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "organs.nii.gz")
    conf = ROOT / "bundles" / "fvae_ldm" / "configs"
    r = run([PY, "-m", "monai.bundle", "run", "--config_file",
             f"['{conf / 'inference.yaml'}','{conf / 'paper_pretrained.yaml'}']", "--bundle_root", str(tmp_path),
             "--official_checkpoint", str(tmp_path / "official.ckpt"), "--official_width", "32",
             "--vae_weights", str(tmp_path / "lean.ckpt"), "--text_encoder", str(bert_dir),
             "--mask", str(tmp_path / "organs.nii.gz"), "--report", "No focal lesion in the liver.",
             "--output_dir", str(tmp_path / "gen"), "--steps", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    # official long volume: windows [0, 65) and [15, 80) (re-injected), then the second pass over [32, 80)
    assert r.stderr.count("denoising:   0%") == 3, r.stderr[-2000:]
    out = nib.load(tmp_path / "gen" / "organs_generated.nii.gz")
    assert out.shape == lab.shape and np.allclose(out.affine, affine) and out.get_data_dtype() == np.int16
    vol = np.asarray(out.dataobj)
    assert vol.min() >= -1000 and vol.max() <= 1000 and vol.std() > 0


def tiny_32(seed: int = 6):
    """A tiny official denoiser whose context width is the tiny BERT's (32)."""
    torch.manual_seed(seed)
    net = official_denoiser(model_channels=32, context_dim=32)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()
