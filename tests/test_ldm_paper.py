"""The paper's settings as options: depth convolutions after every convolution, the mask gain, body-masked
training images, a fixed scale factor, and the official DDIM timestep spacing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_ldm_fixes import _case
from test_networks import tiny_unet

from fvae_ct.errors import BatchFailure, InputError, OptionError
from fvae_ct.ldm import GenerateWorkflow, TrainingRecord, check_record, load_stage2d, make_scheduler, prepare_latents
from fvae_ct.ldm.networks import PseudoThreeDUNet, SliceDepthConv
from fvae_ct.vae import load


def _slices(x):
    return x.permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])


def test_conv_every_puts_an_identity_depth_conv_after_every_3x3_conv():
    ref = tiny_unet()
    n3x3 = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in ref.modules())
    net = PseudoThreeDUNet(tiny_unet(), mode="conv_every")
    convs = [n for n, m in net.unet.named_modules() if isinstance(m, SliceDepthConv)]
    # input conv, 2 per ResBlock (3 down + 2 middle + 6 up), 2 downsamplers, 2 upsamplers, output conv
    assert len(convs) == n3x3 == 1 + 2 * 11 + 2 + 2 + 1, convs
    assert "conv_in.depth" in convs and "out.2.depth" in convs and "down_blocks.0.downsampler.op.depth" in convs
    assert not any("skip_connection" in n or "proj_" in n for n in convs)  # 1x1 convs get none
    # at initialisation: exactly the 2D UNet on every slice
    x, t = torch.randn(2, 4, 5, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        y = net(x, t)
        y2d = ref(_slices(x), t.repeat_interleave(5)).reshape(2, 5, 4, 16, 16).permute(0, 2, 1, 3, 4)
    assert torch.allclose(y, y2d, atol=1e-5)
    # the 2D weights keep their keys: a stage-2d UNet loads, only the depth convs are new
    net.load_unet_2d(ref.state_dict())
    with pytest.raises(RuntimeError, match="unexpected"):
        net.load_unet_2d({**ref.state_dict(), "extra.weight": torch.zeros(1)})
    # stage 3d trains the depth convs only, and they couple the slices
    net.freeze_2d()
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(trainable) == len(list(net.parameters_3d())) == 2 * len(convs)
    twin = copy.deepcopy(net)  # the EMA copy: its own depth convs and its own depth counter
    with torch.no_grad():
        for p in net.parameters_3d():
            p.add_(0.02 * torch.randn_like(p))
    xg = x.clone().requires_grad_(True)
    net(xg, t)[:, :, 0].sum().backward()
    assert float(xg.grad[:, :, 3].abs().sum()) > 0.0
    assert torch.allclose(twin(x, t), y2d, atol=1e-5)
    twin(torch.randn(1, 4, 3, 16, 16), torch.tensor([1]))  # another depth in the copy ...
    assert net._frames[0] == 5 and twin._frames[0] == 3  # ... does not reach the original


def test_load_stage2d_into_conv_every():
    ref = tiny_unet(seed=3)
    net = load_stage2d(PseudoThreeDUNet(tiny_unet(), mode="conv_every"), {"model": ref.state_dict()}, "model")
    assert torch.equal(net.unet.conv_in.conv.weight, ref.conv_in.conv.weight)


def test_mask_gain_body_mask_and_fixed_scale_factor(tmp_path):
    vae = load("identity")
    lo, hi = vae.input_range
    items = [_case(tmp_path, "a")]
    (tmp_path / "dl.json").write_text(json.dumps(items))
    plain = prepare_latents(str(tmp_path / "dl.json"), vae, str(tmp_path / "p"), [1, 5], "vae")
    stats = prepare_latents(str(tmp_path / "dl.json"), vae, str(tmp_path / "q"), [1, 5], "vae", mask_gain=0.5,
                            body_mask=True, scale_factor=1.52)
    assert (plain["mask_gain"], plain["body_mask"], plain["scale_factor_fixed"]) == (1.0, False, False)
    assert (stats["mask_gain"], stats["body_mask"], stats["scale_factor_fixed"]) == (0.5, True, True)
    assert stats["scale_factor"] == stats["mask_scale_factor"] == 1.52 and plain["scale_factor"] != 1.52
    p, q = (torch.load(tmp_path / d / "a.pt", weights_only=True) for d in "pq")
    # the liver (id 5): id / 400 in the VAE range, shrunk by 0.5 about the middle
    mid = (lo + hi) / 2
    liver = lo + (hi - lo) * 5 / 400
    assert int(((p["mask"] - liver).abs() < 1e-6).sum()) == 36 * 6
    assert int(((q["mask"] - (mid + 0.5 * (liver - mid))).abs() < 1e-6).sum()) == 36 * 6
    # body mask: the 40 HU block is 16 x 12 voxels per slice, the labelled part of it 6 x 6 + 4 x 4
    soft = lo + (hi - lo) * (40 + 1000) / 2000
    assert int(((p["latent"] - soft).abs() < 1e-4).sum()) == 16 * 12 * 6
    assert int(((q["latent"] - soft).abs() < 1e-4).sum()) == (36 + 16) * 6
    assert float(q["latent"].min()) == pytest.approx(lo, abs=1e-6)
    # what the checkpoint records: another gain or scale factor at inference is refused
    ckpt = {"record": TrainingRecord(stats, 4).state_dict()}
    with pytest.raises(InputError, match="mask_gain: trained 0.5, now 1.0"):
        check_record(ckpt, plain)
    # a case without a label map cannot be body-masked
    (tmp_path / "nolab.json").write_text(json.dumps([{"image": items[0]["image"]}]))
    with pytest.raises(BatchFailure, match="a.nii.gz: body_mask needs a label map"):
        prepare_latents(str(tmp_path / "nolab.json"), vae, str(tmp_path / "r"), [1, 5], body_mask=True)
    with pytest.raises(OptionError, match="scale_factor must be a positive number"):
        prepare_latents(str(tmp_path / "dl.json"), vae, str(tmp_path / "s"), [1, 5], scale_factor=0)


def test_generation_encodes_the_mask_with_the_recorded_gain(tmp_path):
    """GenerateWorkflow maps the label map like prepare did (gain and scale factor from latent_stats.json)."""
    from fvae_ct.ldm import build_denoiser

    vae = load("identity")
    items = [_case(tmp_path, "a")]
    (tmp_path / "dl.json").write_text(json.dumps(items))
    stats = prepare_latents(str(tmp_path / "dl.json"), vae, str(tmp_path / "q"), [1, 5], "vae", mask_gain=0.5,
                            scale_factor=2.0)
    seen = {}

    def inferer(shape, network, mask=None, **kw):
        seen["mask"] = mask
        return torch.zeros(shape)

    net = build_denoiser(1, 1, stats["text_dim"], channels=(8, 16), attention_levels=(False, False),
                         num_res_blocks=1, num_head_channels=8, norm_num_groups=8, mode="none")
    GenerateWorkflow(net, vae, stats, str(tmp_path / "gen"), inferer=inferer).run(str(tmp_path / "a_seg.nii.gz"))
    cached = torch.load(tmp_path / "q" / "a.pt", weights_only=True)["mask"]
    m = seen["mask"][0, :, :, : cached.shape[2], : cached.shape[3]]
    assert torch.allclose(m, 2.0 * cached, atol=1e-6)


def test_ddim_spacing_ldm_is_the_official_sampler():
    """``ldm``: timesteps 951, 901, ..., 1 (latent-diffusion's uniform DDIM discretisation + 1) and the last step
    goes to alpha_cumprod[0]; checked against the DDIM update written out from those definitions."""
    s = make_scheduler(sampler=True)
    s.set_timesteps(20)
    assert [int(t) for t in s.timesteps] == list(range(951, 0, -50))
    m = make_scheduler(sampler=True, ddim_spacing="monai")
    m.set_timesteps(20)  # MONAI's own: linspace(999, 0), while its step moves by 50
    assert [int(t) for t in m.timesteps][:3] == [999, 946, 894] and int(m.timesteps[-1]) == 0
    ac = s.alphas_cumprod.double()
    x, eps = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.randn(1, 2, 3, 3, dtype=torch.float64)
    for t, prev in ((51, float(ac[1])), (1, float(ac[0]))):
        a = float(ac[t])
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        want = prev**0.5 * x0 + (1 - prev) ** 0.5 * eps
        got, _ = s.step(eps.float(), t, x.float())
        assert torch.allclose(got.double(), want, atol=1e-4), t
    with pytest.raises(ValueError, match="ddim_spacing must be"):
        make_scheduler(sampler=True, ddim_spacing="quad")


def test_paper_yaml_switches_the_new_settings_on():
    from conftest import ROOT
    from monai.bundle import ConfigParser

    conf = ROOT / "bundles" / "fvae_ldm" / "configs"
    for base in ("prepare.yaml", "train.yaml", "inference.yaml"):
        p = ConfigParser()
        p.read_config([str(conf / base), str(conf / "paper.yaml")])
        assert (p["mask_gain"], p["body_mask"], p["scale_factor"]) == (1.0, True, 1.52)
        assert (p["consistency"], p["ddim_spacing"]) == ("conv_every", "ldm")
        if base == "train.yaml":
            assert p["init_3d_from"] == "model"
    p = ConfigParser()
    p.read_config(str(conf / "prepare.yaml"))
    assert (p["mask_gain"], p["body_mask"], p["scale_factor"]) == (1.0, False, None)


def _paper(base: str):
    from conftest import ROOT
    from monai.bundle import ConfigParser

    conf = ROOT / "bundles" / "fvae_ldm" / "configs"
    p = ConfigParser()
    p.read_config([str(conf / base), str(conf / "paper.yaml")])
    return p


def test_paper_mask_mapping_is_the_official_one_in_leanvae_range():
    """The official loader writes ``(id / 400 * 2 - 1) / 2`` into LeanVAE's input; the paper overlay must give the
    same values with LeanVAE's real input range (a (-1, 1) range would hide a factor of two)."""
    from fvae_ct.ldm.conditioning import vae_mask_input
    from fvae_ct.vae import LeanVAE

    p = _paper("prepare.yaml")
    assert p["vae"] == "leanvae_dim16"
    lo_hi = LeanVAE.input_range
    assert tuple(lo_hi) == (-0.5, 0.5)
    ids = torch.tensor([0.0, 1.0, 5.0, 117.0, 200.0, 400.0]).view(1, 2, 3)
    ours = vae_mask_input(ids, p["mask_label_scale"], lo_hi, p["mask_gain"])
    official = (ids / 400 * 2 - 1) / 2
    assert torch.allclose(ours, official, atol=1e-7), (ours, official)
    assert float(ours.min()) == -0.5 and float(ours.max()) == 0.5


def test_paper_stage3d_starts_from_the_raw_2d_weights():
    """Official ``init_from_ckpt`` loads the 2D checkpoint's model weights (its ``model_ema.*`` keys are ignored)."""
    p = _paper("train.yaml")
    ref_model, ref_ema = tiny_unet(seed=1), tiny_unet(seed=2)
    ckpt = {"model": ref_model.state_dict(), "ema": {f"unet.{k}": v for k, v in ref_ema.state_dict().items()}}
    net = load_stage2d(PseudoThreeDUNet(tiny_unet(seed=3), mode="conv_every"), ckpt, p["init_3d_from"])
    got = net.unet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref_model.state_dict().items())


def tiny_bert(folder, seed: int = 0):
    """A tiny random ``BertModel`` + ``BertTokenizer`` (lower-casing, a small word-piece vocabulary) saved to ``folder``:
    the classes CXR-BERT-specialized loads with, at toy size."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = "liver lung lesion no focal the of in is normal mild effusion heart size".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).eval().save_pretrained(folder)
    return folder


def test_text_padding_attend_is_the_official_text_path(tmp_path):
    """``attend``: the official tokenisation (max_length padding, truncation, BERT given its attention mask,
    last_hidden_state) and no mask for the denoiser; ``mask``: padding cut and marked."""
    from transformers import BertModel, BertTokenizer

    from fvae_ct.ldm.diffusion import FrozenTextEncoder

    folder = tiny_bert(tmp_path / "bert")
    texts = ["No focal lesion in the liver.", "Mild effusion"]
    official_tok = BertTokenizer.from_pretrained(folder)
    tok = official_tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        official = BertModel.from_pretrained(folder).eval()(
            input_ids=tok.input_ids, attention_mask=tok.attention_mask
        )[0]
    enc = FrozenTextEncoder(str(folder), max_length=16, padding="attend")
    emb, mask = enc.encode(texts)
    assert emb.shape == official.shape == (2, 16, 32)
    assert float((emb - official).abs().max()) <= 1e-6
    assert bool(mask.all()) and not bool(tok.attention_mask.all())  # the denoiser attends to the padding too
    ours, omask = FrozenTextEncoder(str(folder), max_length=16).encode(texts)
    assert ours.shape[1] == int(tok.attention_mask.sum(1).max()) < 16 and not bool(omask.all())
    with pytest.raises(OptionError, match="text_padding must be one of mask, attend"):
        FrozenTextEncoder(str(folder), padding="none")
