"""3D consistency blocks and the pseudo-3D UNet wrapper around MONAI's 2D DiffusionModelUNet."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from fvae_ct.errors import OptionError, WeightsError
from fvae_ct.ldm.networks import DepthConv, PseudoThreeDUNet, SliceConsistencyAttention


def tiny_unet(in_ch=4, out_ch=4, context_dim=None, seed=0):
    """A small 2D DiffusionModelUNet whose zero-initialised output conv is randomised (a 'trained' stage 1)."""
    torch.manual_seed(seed)
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=in_ch, out_channels=out_ch, channels=(16, 32, 32),
                              attention_levels=(False, False, True), num_res_blocks=1, num_head_channels=8,
                              norm_num_groups=8, with_conditioning=context_dim is not None,
                              cross_attention_dim=context_dim)
    for p in unet.out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return unet


def test_attention_block_is_identity_at_init_and_learns_to_mix():
    torch.manual_seed(0)
    blk = SliceConsistencyAttention(16, num_heads=4)
    x = torch.randn(2, 16, 5, 3, 4)
    assert torch.equal(blk(x), x)
    assert torch.equal(DepthConv(16)(x), x) or torch.allclose(DepthConv(16)(x), x, atol=1e-6)


@pytest.mark.parametrize("mode", ["attention", "conv", "both"])
def test_wrapped_unet_equals_2d_unet_at_init_then_mixes_slices(mode):
    unet = tiny_unet(context_dim=12)
    ref = tiny_unet(context_dim=12)  # same seed: same weights, no hooks
    net = PseudoThreeDUNet(unet, levels=(1, 2), mode=mode)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5, 16, 16)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 3, 12)
    y = net(x, t, ctx)
    with torch.no_grad():
        xs = x.permute(0, 2, 1, 3, 4).reshape(10, 4, 16, 16)
        y2d = ref(xs, t.repeat_interleave(5), context=ctx.repeat_interleave(5, 0)).reshape(2, 5, 4, 16, 16)
    assert torch.allclose(y, y2d.permute(0, 2, 1, 3, 4), atol=1e-5)  # exactly the 2D UNet, slice by slice
    # the 2D UNet alone never mixes slices: d out[slice 0] / d in[slice 3] == 0
    xg = x.clone().requires_grad_(True)
    net(xg, t, ctx)[:, :, 0].sum().backward()
    assert float(xg.grad[:, :, 3].abs().sum()) == 0.0
    # one optimisation step of the 3D parts only, then slices talk to each other
    opt = torch.optim.SGD(net.parameters_3d(), lr=0.1)
    loss = (net(x, t, ctx) - torch.randn_like(y)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    xg = x.clone().requires_grad_(True)
    net(xg, t, ctx)[:, :, 0].sum().backward()
    assert float(xg.grad[:, :, 3].abs().sum()) > 0.0


def test_mode_none_has_no_3d_parameters_and_is_the_2d_unet():
    net = PseudoThreeDUNet(tiny_unet(), mode="none")
    assert sum(p.numel() for p in net.parameters_3d()) == 0
    x = torch.randn(1, 4, 3, 16, 16)
    xs = x.permute(0, 2, 1, 3, 4).reshape(3, 4, 16, 16)
    t = torch.tensor([7])
    ref = tiny_unet()(xs, t.repeat_interleave(3))
    assert torch.allclose(net(x, t), ref.reshape(1, 3, 4, 16, 16).permute(0, 2, 1, 3, 4), atol=1e-5)
    with pytest.raises(OptionError, match="consistency must be one of attention, conv, both, conv_every, none, got .full3d."):
        PseudoThreeDUNet(tiny_unet(), mode="full3d")


def test_copies_are_independent_models():
    """An EMA copy (deepcopy) must run its own 3D blocks, not the original's."""
    import copy

    net = PseudoThreeDUNet(tiny_unet(), levels=(1,), mode="attention")
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for p in twin.parameters_3d():
            p.add_(0.1)
    x, t = torch.randn(1, 4, 3, 16, 16), torch.tensor([3])
    assert not torch.allclose(net(x, t), twin(x, t))


def test_bad_consistency_options_are_one_line_option_errors():
    with pytest.raises(OptionError, match=r"^consistency_levels must be in 0 \.\. 2 \(the UNet's levels\), got \[1, 3\]$"):
        PseudoThreeDUNet(tiny_unet(), levels=(1, 3))
    with pytest.raises(OptionError, match=r"consistency 'attention' attends with 3 heads: .* multiples of 3, got \[16, 32\]"):
        PseudoThreeDUNet(tiny_unet(), levels=(0, 1), num_heads=3)
    assert PseudoThreeDUNet(tiny_unet(), levels=(0, 1), num_heads=3, mode="conv").blocks3d  # no heads: any channels
    net = PseudoThreeDUNet(tiny_unet(), mode="conv_every")
    with pytest.raises(WeightsError, match=r"stage-2d UNet weights do not fit .*unexpected \['extra.weight'\]") as e:
        net.load_unet_2d({**tiny_unet().state_dict(), "extra.weight": torch.zeros(1)})
    assert "\n" not in str(e.value)
