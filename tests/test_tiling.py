"""The shared windowing helper: placement, blending normalisation, scale-changing functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fvae_ct.tiling import TilingConfig, ramp_weights, windowed_apply


@pytest.mark.parametrize("blend", ["cosine", "gaussian", "constant"])
@pytest.mark.parametrize("dw,do,ts,to", [(4, 0, None, 0), (5, 2, 16, 6), (3, 1, 24, 8), (None, 0, 10, 3)])
def test_pointwise_function_is_exact_under_any_windowing(blend, dw, do, ts, to):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 11, 37, 29)
    fn = lambda v: torch.sin(3 * v) + v**2  # noqa: E731  (receptive field of one voxel)
    calls = []
    y = windowed_apply(lambda v: calls.append(v.shape) or fn(v), x, dw, do, ts, to, blend)
    assert torch.allclose(y, fn(x), atol=1e-5)
    expect_windows = (ts is not None) or (dw is not None and dw < 11)
    assert (len(calls) > 1) == expect_windows
    for s in calls:  # never larger than a window
        assert s[2] <= (dw or 11) and s[3] <= (ts or 37) and s[4] <= (ts or 29)


def test_scale_changing_function_lands_on_the_right_grid():
    """An 8x average pooling run on tiles equals the pooling of the whole image (tiles aligned to 8)."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 2, 64, 48)
    pool = lambda v: F.avg_pool3d(v, (1, 8, 8))  # noqa: E731
    y = windowed_apply(pool, x, None, 0, 32, 16, "cosine")
    assert y.shape == (1, 1, 2, 8, 6)
    assert torch.allclose(y, pool(x), atol=1e-6)


def test_ramp_weights_cross_fade_sums_to_one():
    w = ramp_weights((1, 32, 32), (0, 8, 8))
    assert float(w[0, 16, 16]) == 1.0 and float(w[0, 0, 16]) < 0.01
    # two windows overlapping by 8 along an axis: the weights of the overlap sum to 1
    r = w[0, 16]
    assert torch.allclose(r[-8:] + r[:8], torch.ones(8), atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="tile_overlap"):
        TilingConfig(tile_size=64, tile_overlap=64)
    with pytest.raises(ValueError, match="depth_overlap"):
        TilingConfig(depth_window=5, depth_overlap=5)
    with pytest.raises(ValueError, match="blend"):
        TilingConfig(blend="max")
    with pytest.raises(ValueError, match="slice_batch"):
        TilingConfig(slice_batch=0)


def test_auto_tile_size_from_free_gpu_memory():
    """Wan 2.1 at 512x512: about 6.4 GiB estimated (CPU-measured working memory), so whole slices with 16 GiB free,
    tiles of 384 with 8 GiB; the smallest tile is 128; a VAE without an estimate stays untiled. Each backend declares
    its own estimate (``working_memory``); the tiling knows no VAE names."""
    from fvae_ct.recon import VAEReconInferer
    from fvae_ct.tiling import auto_tile_size
    from fvae_ct.vae import IVVAE, LeanVAE, load
    from fvae_ct.vae.wan import WORKING_MEMORY as WAN

    assert auto_tile_size(WAN["wan2.1"], 512, 512, 16.0) is None
    assert auto_tile_size(WAN["wan2.1"], 512, 512, 8.0) == 384
    assert auto_tile_size(WAN["wan2.2"], 512, 512, 1.0) == 128
    assert auto_tile_size(None, 512, 512, 1.0) is None
    assert auto_tile_size(load("identity"), 512, 512, 1.0) is None  # no estimate
    assert IVVAE.working_memory and LeanVAE.working_memory
    taef2 = load("taef2")
    assert taef2.working_memory == (0.0, 3.0e-6) and auto_tile_size(taef2, 512, 512, 1.0) == 384
    inf = VAEReconInferer(tile_size="auto")
    x = torch.rand(1, 1, 2, 16, 16)
    assert torch.equal(inf(x, load("identity")), x) and inf.tiling.tile_size is None  # CPU: whole slices
