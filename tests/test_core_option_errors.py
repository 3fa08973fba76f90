"""A user's bad option value or weights file in the shared core is one line of the project's error types, naming the
option (or file), the value and what is allowed: transforms (hu_window, hu_rounding, slice_orientation,
working_spacing), tiling, the EMA handler, assets, the external / Wan / IV-VAE / LeanVAE backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvae_ct import assets
from fvae_ct.errors import OptionError, WeightsError
from fvae_ct.handlers import WarmupEMA
from fvae_ct.tiling import TilingConfig
from fvae_ct.transforms import (
    AxialSlicesd,
    HUWindowd,
    InPlaneResampled,
    hu_window_of,
    recon_preprocessing,
    unit_to_hu,
    working_spacing_of,
)


def _one_line(excinfo, kind=OptionError) -> str:
    assert type(excinfo.value) is kind
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: HUWindowd("image", window=(1000, -1000)),
            "hu_window [1000, -1000]: give [low, high] in HU with low < high",
        ),
        (lambda: HUWindowd("image", window=[0, "x"]), "hu_window [0, 'x']: give [low, high] in HU with low < high"),
        (lambda: HUWindowd("image", window=[-1000]), "hu_window [-1000]: give [low, high]"),
        (lambda: HUWindowd("image", rounding="floor"), "hu_rounding 'floor': give one of round, truncate"),
        (lambda: unit_to_hu(np.zeros(2), rounding="ceil"), "hu_rounding 'ceil': give one of round, truncate"),
        (
            lambda: AxialSlicesd("image", orientation="sagittal"),
            "slice_orientation 'sagittal': give one of display, file",
        ),
        (
            lambda: InPlaneResampled("image", working_spacing=0),
            "working_spacing 0: give a positive in-plane spacing in mm",
        ),
        (lambda: InPlaneResampled("image", working_spacing="fine"), "working_spacing 'fine': give a positive"),
        (lambda: recon_preprocessing(hu_window=(0, 0)), "hu_window [0, 0]: give [low, high]"),
    ],
)
def test_transform_options(build, message):
    with pytest.raises(OptionError) as e:
        build()
    assert _one_line(e).startswith(message)


def test_transform_options_that_are_fine():
    assert hu_window_of(["-1000", 1000.0]) == (-1000.0, 1000.0)
    assert [working_spacing_of(v) for v in (None, "", "None", "0.8", 1)] == [None, None, None, 0.8, 1.0]
    assert InPlaneResampled("image", working_spacing="1.5").working_spacing == 1.5
    assert HUWindowd("image", window=[-200, 300], rounding="truncate").window == (-200.0, 300.0)
    np.testing.assert_array_equal(unit_to_hu(np.array([0.0, 0.50049, 1.0])), [-1000.0, 1.0, 1000.0])
    np.testing.assert_array_equal(unit_to_hu(np.array([0.50049]), rounding="truncate"), [0.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tile_size="big"), "tile_size 'big': give a whole number of voxels"),
        (dict(slice_batch=2.5), "slice_batch 2.5: give a whole number of voxels"),
        (dict(depth_overlap=None), "depth_overlap None: give a whole number of voxels"),
        (dict(slice_batch=0), "slice_batch must be >= 1, got 0"),
    ],
)
def test_tiling_options(kwargs, message):
    with pytest.raises(OptionError) as e:
        TilingConfig(**kwargs)
    assert _one_line(e) == message


def test_tiling_numbers_given_as_text_or_floats_become_integers():
    t = TilingConfig(tile_size="256", tile_overlap=32.0, depth_window=None, slice_batch="8")
    assert (t.tile_size, t.tile_overlap, t.depth_window, t.slice_batch) == (256, 32, None, 8)
    assert all(type(v) is int for v in (t.tile_size, t.tile_overlap, t.depth_overlap, t.slice_batch))


@pytest.mark.parametrize("decay", [1.0, -0.1, "slow", None])
def test_ema_decay(decay):
    with pytest.raises(OptionError) as e:
        WarmupEMA(torch.nn.Linear(2, 2), decay=decay)
    assert _one_line(e) == f"ema_decay {decay!r}: give a decay in [0, 1) (0: the copy follows the weights)"
    assert WarmupEMA(torch.nn.Linear(2, 2), decay="0.5").decay == 0.5


def test_unknown_asset():
    with pytest.raises(OptionError) as e:
        assets.resolve("no_such_weights")
    msg = _one_line(e)
    assert msg.startswith("asset 'no_such_weights': not a known asset; known: ") and "taef2_encoder" in msg


class _AE(torch.nn.Module):
    def encode(self, x):
        return x

    def decode(self, z):
        return z


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layout="volume"), "layout 'volume': give 'video' (clips, depth = time) or 'image' (single slices)"),
        (dict(latent_channels=0), "latent_channels 0: give a positive whole number"),
        (dict(spatial_factor="eight"), "spatial_factor 'eight': give a positive whole number"),
        (dict(depth_factor=2.5), "depth_factor 2.5: give a positive whole number"),
        (dict(input_range=(1, -1)), "input_range (1, -1): give [low, high] with low < high, e.g. [-1, 1]"),
        (dict(input_range="wide"), "input_range 'wide': give [low, high] with low < high"),
    ],
)
def test_external_vae_options(kwargs, message):
    from fvae_ct.vae.external import ExternalVAE

    with pytest.raises(OptionError) as e:
        ExternalVAE(f"{__name__}._AE", **kwargs)
    assert _one_line(e).startswith(message)
    ok = ExternalVAE(f"{__name__}._AE", latent_channels="3", spatial_factor=1.0, input_range=["0", "1"])
    assert (ok.latent_channels, ok.spatial_factor, ok.depth_factor, ok.input_range) == (3, 1, 4, (0.0, 1.0))


def test_wan_with_another_temporal_factor_is_a_weights_error():
    from diffusers import AutoencoderKLWan

    from fvae_ct.vae.wan import WanVAE

    model = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, False, True]
    )
    with pytest.raises(WeightsError) as e:
        WanVAE(model=model)
    assert _one_line(e, WeightsError) == (
        "wan2.1: the model's temporal downsampling factor is 2; diffusers' Wan encoder runs 1 + 4k frame chunks, "
        "so only 4 is supported"
    )


LEAN_TINY = dict(
    embedding_dim=48,
    latent_dim=4,
    ista_iter_num=2,
    ista_layer_num=1,
    l_dim=16,
    h_dim=32,
    sep_num_layer=1,
    fusion_num_layer=2,
)


@pytest.mark.parametrize(
    "args, problem",
    [
        (dict(LEAN_TINY, embedding_dim=50), "LeanVAE needs embedding_dim = l_dim + h_dim, got 50 != 16 + 32"),
        (dict(LEAN_TINY, l_dim="wide"), "invalid literal for int() with base 10: 'wide'"),
    ],
)
def test_leanvae_checkpoint_whose_args_make_no_leanvae(tmp_path, args, problem):
    from fvae_ct.vae.leanvae import load_leanvae_checkpoint

    path = tmp_path / "odd.ckpt"
    torch.save({"args": args, "state_dict": {}}, path)
    with pytest.raises(WeightsError) as e:
        load_leanvae_checkpoint(path)
    assert _one_line(e, WeightsError) == f"{path}: the checkpoint's args do not describe a LeanVAE ({problem})"


def test_ivvae_checkpoint_of_odd_width_is_a_weights_error(tmp_path):
    from fvae_ct.vae import IVVAE

    path = tmp_path / "odd.pth"
    state = {"conv2.conv_2d.weight": torch.zeros(2, 3, 1, 1), "encoder.conv1.conv_2d.weight": torch.zeros(8, 3, 3, 3)}
    torch.save(state, path)
    with pytest.raises(WeightsError) as e:
        IVVAE(weights=str(path))
    assert _one_line(e, WeightsError) == (
        f"{path}: holds z3 dim8, which is no IV-VAE (IV-VAE needs even z_dim and dim, got 3, 8)"
    )
