"""Boundary / noise analysis on synthetic volumes where the truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from fvae_ct.recon.boundary import (analyze, boundary_shift, edge_sharpness, error_near_far, error_spectrum,
                                      noise_ratio)

SHAPE = (40, 64, 64)


def phantom(spacing=(1.0, 1.0, 1.0), centre_shift=(0, 0, 0), radius_mm=14.0, noise=0.0, seed=0):
    """A 'body' (soft tissue 40 HU in air) holding a bright sphere (organ, 200 HU); labels 1 = sphere.

    Voxel grid [D, H, W] with the given spacing; the sphere centre can be shifted by whole voxels.
    """
    d, h, w = SHAPE
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(SHAPE, spacing)), indexing="ij")
    c = [n * s / 2 + k * s for n, s, k in zip(SHAPE, spacing, centre_shift)]
    r = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    sphere = r <= radius_mm
    cb = [n * s / 2 for n, s in zip(SHAPE, spacing)]
    rb = np.sqrt(((yy - cb[1]) / (0.45 * h * spacing[1])) ** 2 + ((xx - cb[2]) / (0.45 * w * spacing[2])) ** 2)
    body = rb <= 1.0
    v = np.where(body, 40.0, -1000.0)
    v[sphere] = 200.0
    if noise:
        v = v + np.random.default_rng(seed).normal(0, noise, v.shape)
    labels = np.where(sphere, 1, np.where(body, 2, 0)).astype(np.int16)
    return v, labels


def test_white_noise_is_high_frequency_and_moves_no_boundary():
    x, lab = phantom(noise=5.0, seed=1)
    y = x + np.random.default_rng(2).normal(0, 20.0, x.shape)
    spec = error_spectrum(x, y)
    expected = 1 - math.pi * 0.25**2  # share of the 2D frequency grid beyond 0.25 cycles/voxel
    assert abs(spec["hf_fraction"] - expected) < 0.02
    assert spec["hf_fraction"] > 0.75
    shift = boundary_shift(x, y, (1, 1, 1), lab)
    assert shift["mean_mm"] < 0.15 and shift["p95_mm"] <= 1.0  # 20 HU noise vs a 160 HU edge
    assert noise_ratio(x, y, (1, 1, 1), lab) > 2.0  # more noise than the original's 5 HU
    near, far = error_near_far(x, y, (1, 1, 1), lab)
    assert abs(near - far) / far < 0.1  # white noise sits everywhere alike


def test_shifted_sphere_gives_the_shift_in_mm():
    x, lab = phantom()
    y, _ = phantom(centre_shift=(0, 0, 2))  # 2 voxels along W
    s = boundary_shift(x, y, (1, 1, 1), lab == 1)
    assert s["per_organ"][1]["p95_mm"] == boundary_shift(x, y, (1, 1, 1), lab)["per_organ"][1]["p95_mm"]
    assert boundary_shift(x, y, (1, 1, 1), lab)["per_organ"][2]["p95_mm"] == 0.0  # the body did not move
    assert abs(s["p95_mm"] - 2.0) <= 0.5, s
    assert 0.6 < s["mean_mm"] < 1.4  # |2 cos(theta)| averaged over the sphere = 1
    spec = error_spectrum(x, y)
    assert spec["hf_fraction"] < 0.5  # a shift of a large structure is not high-frequency noise


@pytest.mark.parametrize("spacing,axis,expected_mm", [((2.5, 0.7, 0.7), 2, 1.4), ((2.5, 0.7, 0.7), 0, 5.0),
                                                      ((1.0, 1.5, 1.5), 1, 3.0)])
def test_anisotropic_spacing_scales_the_mm_figures(spacing, axis, expected_mm):
    shift = [0, 0, 0]
    shift[axis] = 2
    x, lab = phantom(spacing=spacing, radius_mm=10.0)
    y, _ = phantom(spacing=spacing, radius_mm=10.0, centre_shift=tuple(shift))
    s = boundary_shift(x, y, spacing, lab == 1, band_mm=8.0)
    assert abs(s["p95_mm"] - expected_mm) <= 0.5 * spacing[axis] + 1e-6, s


def test_gaussian_blur_is_less_sharp_and_less_noisy():
    x, lab = phantom(noise=15.0, seed=3)
    y = ndi.gaussian_filter(x, 1.0)
    assert edge_sharpness(x, y, (1, 1, 1), lab) < 0.9
    assert noise_ratio(x, y, (1, 1, 1), lab) < 0.5
    near, far = error_near_far(x, y, (1, 1, 1), lab)
    assert near > 2 * far  # a blur's error sits on the boundaries
    # without labels too (edges found from the image itself)
    assert edge_sharpness(x, y, (1, 1, 1)) < 0.9
    assert noise_ratio(x, y, (1, 1, 1)) < 0.5


def test_label_free_edges_find_shift_and_no_shift():
    x, _ = phantom(noise=3.0, seed=4)
    same = analyze(x, x + np.random.default_rng(5).normal(0, 3.0, x.shape), (1, 1, 1))
    y, _ = phantom(noise=3.0, seed=4, centre_shift=(0, 0, 3))
    moved = analyze(x, y, (1, 1, 1))
    assert same["boundary_shift_mean_mm"] < moved["boundary_shift_mean_mm"]
    assert moved["boundary_shift_p95_mm"] >= 2.0


def test_identity_is_perfect():
    x, lab = phantom(noise=10.0)
    a = analyze(x, x.copy(), (1, 1, 1), lab)
    assert a["boundary_shift_mean_mm"] == 0.0 and a["edge_sharpness"] == pytest.approx(1.0)
    assert a["noise_ratio"] == pytest.approx(1.0) and a["error_near_boundary_hu"] == 0.0


def test_matched_gaussian_recovers_a_known_sigma():
    from fvae_ct.recon.denoisers import gaussian, match_gaussian_sigma

    x, lab = phantom(noise=15.0, seed=6)
    target = noise_ratio(x, gaussian(x, 0.7), (1, 1, 1), lab)
    s = match_gaussian_sigma(x, target, lambda g: noise_ratio(x, g, (1, 1, 1), lab))
    assert abs(s - 0.7) < 0.03
    # a method that adds noise cannot be matched by any gaussian
    assert math.isnan(match_gaussian_sigma(x, 1.3, lambda g: noise_ratio(x, g, (1, 1, 1), lab)))
