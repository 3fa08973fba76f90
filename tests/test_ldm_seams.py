"""Long-volume sampling against whole-volume sampling, with exact depth-coupled denoisers.

The denoiser is the optimal one for a Gaussian prior along depth, computed on whatever window it gets, with one
timestep per slice (:class:`fvae_ct.ldm.gaussian.GaussianDepthDenoiser`): AR(1) with rho 0.95 (Markov) and a
squared-exponential covariance of length 12 (longer, non-Markov). Whole-volume sampling with the same sampler is the
reference, the prior itself the truth. Measured: per-slice variance, lag-1 / 4 / 8 autocorrelation along depth, and at
the seams (where a window's own slices start, or the overlap bands) the step |z[s] - z[s - 1]| and the variance.
``bench/ldm_long_volume.py`` prints the table of every mode (LDM README).
"""

from __future__ import annotations

import logging

import pytest
import torch

from fvae_ct.ldm import LDMPrepareBatch, MaskedMSELoss, SamplingInferer, build_denoiser, make_scheduler, sample_latents
from fvae_ct.ldm.gaussian import GaussianDepthDenoiser, ar1, depth_statistics, sq_exp
from fvae_ct.ldm.long_volume import chain_windows
from fvae_ct.tiling import depth_window_starts

D, WINDOW, OVERLAP, SEEDS = 51, 17, 8, 8
PRIORS = {"ar1": ar1(0.95), "sqexp": sq_exp(12.0)}


def run(model, **kw):
    """Samples ``[SEEDS, D, 32, 32]`` of one channel, 20 DDIM steps, eta 0."""
    zs = [sample_latents(model, make_scheduler(sampler=True), (1, 1, D, 32, 32), steps=20, seed=s, **kw)[0]
          for s in range(SEEDS)]
    return torch.cat(zs)


def grid_seams(overlap):
    wins = depth_window_starts(D, WINDOW, overlap)
    return sorted({a for a, _ in wins[1:]} | {b for _, b in wins[:-1]})


@pytest.fixture(scope="module", params=sorted(PRIORS))
def prior(request):
    model = GaussianDepthDenoiser(PRIORS[request.param])
    whole = depth_statistics(run(model), seams=grid_seams(OVERLAP))
    c = PRIORS[request.param](torch.arange(D, dtype=torch.float64))
    truth = {"var": 1.0, **{f"ac{k}": float(c.diagonal(k).mean()) for k in (1, 4, 8)}}
    return request.param, model, whole, truth


def ratios(st, ref):
    return {k: st[k] / ref[k] for k in ("var", "ac1", "ac4", "ac8")}


def test_blended_windows_lose_variance_and_long_range_correlation(prior):
    """The old default (blend, shifting grid) and the fixed grid: every window sees only itself, so the samples are
    smoother and lower in contrast than whole-volume sampling, though no seam shows."""
    name, model, whole, _ = prior
    for shift in (True, False):
        st = depth_statistics(run(model, depth_window=WINDOW, depth_overlap=OVERLAP, depth_shift=shift,
                                  long_volume="blend"), seams=grid_seams(OVERLAP))
        r = ratios(st, whole)
        assert r["var"] < 0.95 and r["ac4"] < 0.97 and r["ac8"] < 0.87, (name, shift, r)
        if shift:
            assert abs(st["seam_ratio"] - 1) < 0.03, st["seam_ratio"]  # what the old seam test measured: no seam
    if name == "ar1":  # fixed windows with overlap 1: a hard seam
        hard = depth_statistics(run(model, depth_window=WINDOW, depth_overlap=1, depth_shift=False,
                                    long_volume="blend"), seams=grid_seams(1))
        assert hard["seam_ratio"] > 1.3, hard["seam_ratio"]


def test_default_chain_keeps_the_statistics_of_whole_volume_sampling(prior):
    """The default (chain, the default overlap of half the window): autocorrelation at lags 1 and 4 within 2 % of
    whole-volume sampling, lag 8 within 5 %, variance within -2 % .. +6 %, no variance band at the seams; in variance
    and lag-8 autocorrelation at least as close to the prior as whole-volume sampling is (that 20-step DDIM from pure
    noise is itself ~19 % below the prior's variance)."""
    name, model, whole, truth = prior
    inferer = SamplingInferer(depth_window=WINDOW, progress=False)
    assert inferer.long_volume == "chain" and inferer.depth_overlap == OVERLAP
    seams = [a + k for a, _, k in chain_windows(D, WINDOW, OVERLAP) if k]
    st = depth_statistics(run(model, depth_window=WINDOW, depth_overlap=inferer.depth_overlap), seams=seams)
    r = ratios(st, whole)
    assert abs(r["ac1"] - 1) < 0.02 and abs(r["ac4"] - 1) < 0.02 and abs(r["ac8"] - 1) < 0.05, (name, r)
    assert 0.98 < r["var"] < 1.06, (name, r)
    assert abs(st["band_var_ratio"] - 1) < 0.02, (name, st["band_var_ratio"])
    for k in ("var", "ac8"):
        assert abs(st[k] - truth[k]) <= abs(whole[k] - truth[k]) + 0.005, (name, k, st[k], whole[k], truth[k])
    # the step at the seams: within 8 % of the chain's own steps elsewhere, and no larger than the prior's own
    # mean step sqrt(2 (1 - rho1)) sqrt(2 / pi) (whole-volume sampling is smoother than the prior)
    prior_step = (2 * (1 - truth["ac1"])) ** 0.5 * (2 / torch.pi) ** 0.5
    assert st["seam_ratio"] < 1.08 and st["seam_step"] < 1.02 * prior_step, (name, st["seam_ratio"], st["seam_step"])


def test_chain_windows_cover_the_volume_and_continue_each_other():
    for d, w, ov in [(51, 17, 8), (40, 16, 8), (17, 17, 8), (18, 17, 8), (100, 16, 1)]:
        wins = chain_windows(d, w, ov)
        assert wins[0] == (0, min(w, d), 0) and wins[-1][1] == d and all(b - a == min(w, d) for a, b, _ in wins)
        new = [j for a, b, k in wins for j in range(a + k, b)]
        assert new == list(range(d)), (d, w, ov)  # every slice generated exactly once, in order
        assert all(k >= ov for _, _, k in wins[1:])  # every later window continues at least `overlap` slices
    with pytest.raises(ValueError, match="depth_overlap"):
        chain_windows(40, 16, 0)


def test_window_starts_cover_the_volume():
    for off in range(8):
        w = depth_window_starts(40, 16, 8, off)
        assert w[0][0] == 0 and w[-1][1] == 40 and all(b - a <= 16 for a, b in w)
        assert all(a2 < b for (_, b), (a2, _) in zip(w, w[1:]))  # consecutive windows overlap


def test_context_training_gives_clean_first_slices_left_out_of_the_loss():
    """Stage 3d with ``p_context``: a window's first k slices at timestep 0 (nearly clean, what chain sampling gives
    the model), their target NaN, and MaskedMSELoss over the other slices only."""
    sch = make_scheduler("ddpm")
    prep = LDMPrepareBatch(sch, p_uncond_mask=0.0, p_uncond_text=0.0, p_uncond_both=0.0, p_context=0.5, seed=3)
    z = torch.randn(64, 2, 8, 4, 4)
    x, target, _, kw = prep({"latent": z})
    t = kw["timesteps"].view(64, 8)
    given = torch.isnan(target[:, 0, :, 0, 0])
    assert torch.equal(given, t == 0) or bool(((t == 0) >= given).all())  # given slices have t = 0
    with_context = given.any(1)
    assert 20 <= int(with_context.sum()) <= 44  # about half of 64 windows
    k = given.sum(1)[with_context]
    assert int(k.min()) >= 1 and int(k.max()) <= 4 and bool(given[:, 0][with_context].all())  # a prefix of 1 .. d // 2
    assert bool((t[~with_context] == t[~with_context][:, :1]).all())  # the others: one timestep per window
    a = sch.alphas_cumprod[t].view(64, 1, 8, 1, 1)
    g = given.view(64, 1, 8, 1, 1).expand_as(x)
    assert float((x - z)[g].abs().max()) < 0.2  # given slices: sqrt(a_0) z + sqrt(1 - a_0) noise, nearly clean
    assert torch.allclose(x[~g], (a.sqrt() * z + (1 - a).sqrt() * target)[~g], atol=1e-5)  # the others as before
    pred = torch.randn_like(target)
    keep = ~torch.isnan(target)
    assert torch.isclose(MaskedMSELoss()(pred, target), ((pred - target)[keep] ** 2).mean())
    assert torch.isclose(MaskedMSELoss()(pred, z), torch.nn.functional.mse_loss(pred, z))
    assert not torch.isnan(target).any() or prep.p_context  # without p_context: no NaN (stage 2d, old recipe)
    x0, t0, _, kw0 = LDMPrepareBatch(sch, p_context=0.0)({"latent": z})
    assert not torch.isnan(t0).any() and kw0["timesteps"].shape == (64,)


def test_chain_warns_for_a_checkpoint_trained_without_context(caplog):
    net = build_denoiser(1, 0, None, channels=(8, 16), attention_levels=(False, False), num_res_blocks=1,
                         num_head_channels=8, norm_num_groups=8, mode="attention", levels=(1,))
    for rec, warned in [({"p_context": 0.0}, True), ({"p_context": 0.25}, False), (None, False)]:
        caplog.clear()
        inferer = SamplingInferer(steps=2, guidance=1.0, depth_window=4, progress=False, record=rec)
        with caplog.at_level(logging.WARNING, logger="fvae_ct"):
            z = inferer((1, 1, 6, 8, 8), net)
        assert z.shape == (1, 1, 6, 8, 8) and torch.isfinite(z).all()
        assert ("trained without such windows" in caplog.text) == warned, rec


def test_prior_skip_starts_at_the_gaussian_prior_and_travels_with_the_checkpoint(tmp_path):
    """``prior_skip``: the untrained network (zero output layer) is the unit-Gaussian prior's denoiser
    ``sqrt(1 - a_t) x_t`` instead of 0 noise; the same weights load with or without it (not a weight), the record
    says which, and stage 3d refuses a stage-2d checkpoint trained the other way."""
    from fvae_ct.errors import OptionError
    from fvae_ct.ldm import TrainingRecord, load_stage2d, recorded
    from fvae_ct.ldm.gaussian import GaussianPriorDenoiser

    tiny = dict(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1, num_head_channels=8,
                norm_num_groups=8, levels=(1,))
    skip = build_denoiser(2, 1, None, mode="attention", prior_skip=True, **tiny).eval()
    plain = build_denoiser(2, 1, None, mode="attention", prior_skip=False, **tiny).eval()
    plain.load_state_dict(skip.state_dict())  # the same keys: the skip is not a weight
    x = torch.randn(2, 3, 5, 8, 8)
    unit = GaussianPriorDenoiser(torch.zeros(2), torch.ones(2))
    for t in (torch.tensor([999, 10]), torch.tensor([999, 500, 10, 0, 700] * 2)):  # per window / per slice
        with torch.no_grad():
            assert plain(x, t).abs().max() == 0  # MONAI's zero-initialised output layer
            assert torch.allclose(skip(x, t), unit(x, t), atol=1e-4)  # (float32 cancellation at t = 0)
    # the zero network's error at t = 999 is the whole noise; the prior's is a fraction of a percent
    z0 = torch.randn(1, 2, 5, 8, 8)
    eps = torch.randn_like(z0)
    a = make_scheduler().alphas_cumprod[999]
    xt = torch.cat([a.sqrt() * z0 + (1 - a).sqrt() * eps, torch.zeros(1, 1, 5, 8, 8)], 1)
    with torch.no_grad():
        assert float(((skip(xt, torch.tensor([999])) - eps) ** 2).mean()) < 0.01
    rec = TrainingRecord({}, 8, 0.0, True).state_dict()
    assert recorded({"record": rec}, "prior_skip", False) is True and recorded(None, "prior_skip", False) is False
    ckpt = {"model": skip.unet.state_dict(), "record": rec}
    load_stage2d(build_denoiser(2, 1, None, mode="attention", prior_skip=True, **tiny), ckpt, "model")
    with pytest.raises(OptionError, match="prior_skip"):
        load_stage2d(build_denoiser(2, 1, None, mode="attention", prior_skip=False, **tiny), ckpt, "model")
