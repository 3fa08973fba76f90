"""Displacement, blur and texture told apart, noise floors, inserted noise, the baselines' noise estimate and
the noise-ratio tolerance, each on a synthetic case whose answer is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.special import ndtr

from fvae_ct.recon.boundary import (boundary_shift, ct_like_noise, edge_profiles, edge_sharpness, fit_edges,
                                      noise_floor, noise_ratio, noise_removed, spectrum_like)
from fvae_ct.recon.denoisers import DENOISERS, body_noise_sigma, noise_sigma

SP = (2.0, 1.0, 1.0)
SHAPE = (6, 48, 64)
COL = np.arange(SHAPE[2], dtype=np.float64)[None, None, :] * np.ones(SHAPE)


def edge(centre: float, sigma: float) -> np.ndarray:
    """A planar edge across the columns: -100 HU left, +100 HU right, blurred by ``sigma`` mm (1 mm columns)."""
    return -100.0 + 200.0 * ndtr((COL - centre) / sigma)


def test_fit_edges_recovers_position_and_width():
    s = np.arange(-6, 6.01, 0.25)
    prof = np.stack([20 + 150 * ndtr((s - m) / w) for m, w in ((0.3, 0.8), (-1.2, 2.0))])
    f = fit_edges(prof, s)
    assert np.allclose(f["mu"], [0.3, -1.2], atol=1e-3) and np.allclose(f["sigma"], [0.8, 2.0], rtol=1e-3)
    assert np.allclose(f["width"], 2 * 1.2815515655 * np.array([0.8, 2.0]), rtol=1e-3)


def test_shifted_edge_is_an_offset_not_a_blur():
    x = edge(32.0, 2.0)
    moved = edge(33.5, 2.0)  # moved 1.5 mm towards the bright side
    e = edge_profiles(x, moved, SP)
    assert e["offset_mm"] == pytest.approx(1.5, abs=0.05) and e["width_ratio"] == pytest.approx(1.0, abs=0.02)
    # labelled: the bright side is the organ; its boundary moved into it, the organ shrank by 1.5 mm
    lab = (COL >= 32).astype(int)
    e = edge_profiles(x, moved, SP, lab)
    assert e["offset_mm"] == pytest.approx(-1.5, abs=0.05) and e["width_ratio"] == pytest.approx(1.0, abs=0.02)
    # the old gradient measure reads this pure displacement as a loss of sharpness
    assert edge_sharpness(edge(32.0, 0.5), edge(33.0, 0.5), SP, lab) < 0.8


def test_blurred_edge_is_a_width_ratio_not_an_offset():
    x = edge(32.0, 2.0)
    blurred = edge(32.0, math.hypot(2.0, 1.5))  # a further gaussian of 1.5 mm: width ratio 2.5 / 2
    e = edge_profiles(x, blurred, SP)
    assert e["width_ratio"] == pytest.approx(1.25, abs=0.03) and abs(e["offset_mm"]) < 0.02


def test_noise_moves_no_edge_and_does_not_sharpen():
    x = edge(32.0, 2.0)
    noisy = x + np.random.default_rng(0).normal(0, 20.85, SHAPE)
    e = edge_profiles(x, noisy, SP)
    assert e["width_ratio"] == pytest.approx(1.0, abs=0.05) and abs(e["offset_mm"]) < 0.1
    assert edge_sharpness(x, noisy, SP) > 1.0  # the old measure calls texture "sharper"


def test_a_method_that_is_only_noise_sits_at_its_noise_floor():
    x = edge(32.0, 1.0)
    lab = (COL >= 32).astype(int)
    y = x + np.random.default_rng(5).normal(0, 15.0, SHAPE)
    own = boundary_shift(x, y, SP, lab)["mean_mm"]
    fl = noise_floor(x, y, SP, lab, lo=-1000, hi=1000, seed=1)
    assert fl["floor_white_shift_mean_mm"] == pytest.approx(own, rel=0.25)
    assert fl["floor_white_width_ratio"] == pytest.approx(1.0, abs=0.05)
    # spectrum_like keeps the error's power spectrum in every slice exactly and randomises its phase
    err = ndi.gaussian_filter(np.random.default_rng(2).normal(0, 10, SHAPE), (0, 1.5, 1.5))
    n = spectrum_like(err, seed=3)
    assert np.allclose(np.abs(np.fft.fft2(n, axes=(1, 2))), np.abs(np.fft.fft2(err, axes=(1, 2))), atol=1e-6)
    assert abs(np.corrcoef(n.ravel(), err.ravel())[0, 1]) < 0.1


def test_inserted_noise_removed_fraction():
    rng = np.random.default_rng(0)
    x = np.zeros((24, 40, 40))
    n = rng.normal(0, 20.0, x.shape)
    mask = np.zeros(x.shape, bool)
    mask[6:-6, 8:-8, 8:-8] = True
    assert noise_removed(x, x + n, n, mask) == 0.0
    assert noise_removed(x, x, n, mask) == 1.0
    # a 3D gaussian of sigma s (voxels) keeps (4 pi s^2)^(-3/4) of white noise's standard deviation
    s = 1.5
    removed = noise_removed(x, ndi.gaussian_filter(x + n, s), n, mask)
    assert removed == pytest.approx(1 - (4 * math.pi * s * s) ** -0.75, abs=0.01)
    c = ct_like_noise((4, 64, 64), 20.0, seed=1)
    assert c.std() == pytest.approx(20.0) and abs(c.mean()) < 0.5
    spec = np.abs(np.fft.fft2(c, axes=(1, 2))) ** 2
    assert spec[:, 0, 0].max() < 1e-6 * spec.mean()  # no DC: the ramp filter's noise


def test_nlm_and_bilateral_noise_estimate_ignores_the_clipped_air():
    """65 % of each slice is clipped air (no noise); the body's noise is 12 HU: the old per-slice estimate sees a
    fraction of it, the body estimate sees it."""
    rng = np.random.default_rng(0)
    x = np.full((4, 100, 100), -1000.0)
    body = np.zeros(x.shape, bool)
    body[:, 20:79, 20:79] = True  # 35 % of the slice
    x[body] = 40.0 + rng.normal(0, 12.0, body.sum())
    assert body_noise_sigma(x) == pytest.approx(12.0, rel=0.08)
    assert noise_sigma((x[0] + 1000) / 2000) * 2000 < 6.0  # the old estimate (h of about 3.7 HU in the real case)
    for m in ("nlm", "bilateral"):
        y = DENOISERS[m].fn(x, SP, (-1000.0, 1000.0))
        assert y[body].std() < 0.75 * x[body].std(), m  # now they denoise


def test_noise_ratio_of_a_noise_free_phantom_is_nan_with_a_warning():
    x = np.zeros((6, 40, 40))
    x[:, 10:30, 10:30] = 50.0
    lab = (x > 0).astype(int)
    y = x + np.random.default_rng(0).normal(0, 5, x.shape)
    with pytest.warns(UserWarning, match="no measurable noise"):
        r = noise_ratio(x, y, SP, lab, min_voxels=10)
    assert math.isnan(r)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 0.8)])
def test_added_blur_in_quadrature_is_unbiased_where_the_width_ratio_is_not(spacing):
    """Analytic erf-blurred spheres (radius 12 mm, original sigma 1 mm): blurred to sigma 1.5 and 2 mm, the width
    ratio reads low (1.44 / 1.89 on the isotropic grid, 1.39 / 1.78 on 2.5 x 0.8 x 0.8 mm: the sampling widens both
    edges), the added blur sqrt(s_y^2 - s_x^2) reads the true 1.118 / 1.732 mm within 0.03 mm; no blur reads 0."""
    n = [int(48 / s) for s in spacing]
    z, y, x = [(np.arange(k) - k / 2 + 0.5) * s for k, s in zip(n, spacing)]
    r = np.sqrt(z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2)
    sphere = lambda sigma: -100.0 + 200.0 * ndtr((12.0 - r) / sigma)  # noqa: E731
    for s1 in (1.0, 1.5, 2.0):
        e = edge_profiles(sphere(1.0), sphere(s1), spacing)
        assert e["added_blur_mm"] == pytest.approx(math.sqrt(s1**2 - 1.0), abs=0.03), (s1, e)
        assert abs(e["offset_mm"]) < 0.01
        if s1 > 1.0:
            assert e["width_ratio"] < s1 - 0.05  # the bias the quadrature removes


@pytest.mark.parametrize("spacing,mean_mm", [((1.0, 1.0, 1.0), 0.236), ((2.5, 0.8, 0.8), 0.131)])
def test_boundary_shift_is_voxel_quantised_and_the_signed_offset_is_not(spacing, mean_mm):
    """A sphere (radius 12 mm, edge sigma 1 mm) grown by 0.3 mm: the thresholded surface distance reads 0.24 / 0.13 mm
    with a p95 of one voxel (the README's caveat), the fitted edge offset reads +0.3 mm."""
    n = [int(48 / s) for s in spacing]
    z, y, x = [(np.arange(k) - k / 2 + 0.5) * s for k, s in zip(n, spacing)]
    r = np.sqrt(z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2)
    a, b, lab = -100 + 200 * ndtr((12.0 - r)), -100 + 200 * ndtr((12.3 - r)), (r < 12).astype(int)
    s = boundary_shift(a, b, spacing, lab)
    assert s["mean_mm"] == pytest.approx(mean_mm, abs=0.01) and s["p95_mm"] == pytest.approx(min(spacing))
    assert edge_profiles(a, b, spacing, lab)["offset_mm"] == pytest.approx(0.3, abs=0.03)
