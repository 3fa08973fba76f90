"""``long_volume: official``: the paper's two-pass window procedure (inference_CT_Gen_3d.py) against that script's
loops written out with its constants, and the re-injection inside DDIM sampling against the update written out
step by step with an exact denoiser (a Gaussian prior, whose optimal noise prediction is closed-form)."""

from __future__ import annotations

import pytest
import torch

from fvae_ct.ldm import make_scheduler, sample_latents
from fvae_ct.ldm.long_volume import fusion_boundaries, official_long_volume, pass_windows


def official_script(depth: int, generate) -> torch.Tensor:
    """The official script's loops with its constants (65-slice windows, 17 latents, offset 32, seams 64 i + 1
    swapped +-16), on slice index volumes."""

    def one_pass(vol_start, n):
        iters = n // 65 + 1 if n % 65 else n // 65
        out, prev = torch.zeros(n), None
        for i in range(iters):
            if i == iters - 1:
                s, last = generate(vol_start + max(0, n - 65), vol_start + n, prev)  # [..., -65:]
                rem = n % 65 if n % 65 else 65
                out[-rem:] = s[-rem:]
            else:
                s, last = generate(vol_start + i * 65, vol_start + (i + 1) * 65, prev)
                out[i * 65 : (i + 1) * 65] = s
                prev = last
        return out, iters

    vol1, iters = one_pass(0, depth)
    vol2, _ = one_pass(32, depth - 32)
    fused = vol1.clone()
    for i in range(1, iters):
        b = i * 16 * 4 + 1
        lo, hi = max(0, b - 16), min(b + 16, depth)
        if lo - 32 >= 0 and hi - 32 <= vol2.shape[0]:
            fused[lo:hi] = vol2[lo - 32 : hi - 32]
    return fused


@pytest.mark.parametrize("depth", [65, 100, 130, 150, 200, 333])
def test_two_pass_windows_match_the_official_script(depth):
    def recorder(log):
        def generate(start, stop, previous):  # a window's slices carry (pass-independent) ids; "latent" = its end
            log.append((start, stop, None if previous is None else float(previous)))
            return torch.arange(start, stop, dtype=torch.float32) + 1000 * len(log), torch.tensor(float(stop))

        return generate

    ours_log, theirs_log = [], []
    ours = official_long_volume(recorder(ours_log), depth)
    theirs = official_script(depth, recorder(theirs_log))
    assert torch.equal(ours, theirs)
    if depth <= 65:  # one window: the official second pass has no seam to mend, we skip it
        assert ours_log == theirs_log[:1]
    else:  # the same windows, in the same order, with the same re-injected latents
        assert ours_log == theirs_log
    assert pass_windows(150, 65) == [(0, 65, 65), (65, 130, 65), (85, 150, 20)]
    assert fusion_boundaries(3) == [65, 129]  # the official seams (the real ones are at 65 and 130)


class GaussianDenoiser(torch.nn.Module):
    """The exact noise prediction for data ~ N(0, s^2): eps = sqrt(1 - a) z / (a s^2 + 1 - a) (input: z + mask)."""

    def __init__(self, ac, s=0.7):
        super().__init__()
        self.ac, self.s = ac, s
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, context=None, context_mask=None):
        z = x[:, :4]
        a = self.ac[t].view(-1, 1, 1, 1, 1)
        return (1 - a).sqrt() * z / (a * self.s**2 + 1 - a)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_reinjection_is_the_official_update_written_out(eta):
    sched = make_scheduler("ddpm", sampler=True, ddim_spacing="ldm")
    ac = sched.alphas_cumprod
    model = GaussianDenoiser(ac)
    shape, seed, steps = (1, 4, 5, 6, 6), 11, 20
    prev = torch.randn(1, 4, 1, 6, 6)
    mask = torch.zeros(1, 4, 5, 6, 6)
    got = sample_latents(model, sched, shape, mask, steps=steps, seed=seed, depth_window=None, depth_overlap=0,
                         eta=eta, previous=prev)
    # written out: initial noise, re-injection at alpha_cumprod[999], DDIM on 951 .. 1, re-injection at ac[index]
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    step_g, inj = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)

    def inject(z, a):
        z = z.clone()
        z[:, :, :1] = a.sqrt() * prev + (1 - a).sqrt() * torch.randn(prev.shape, generator=inj)
        return z

    z = inject(z, ac[999])
    for i, t in enumerate(range(951, 0, -50)):
        eps = model(torch.cat([z, mask], 1), torch.tensor([t]))
        a_t, a_prev = ac[t], ac[t - 50] if t - 50 >= 0 else ac[0]
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        if eta:
            z = z + sigma * torch.randn(shape, generator=step_g)
        z = inject(z, ac[steps - 1 - i])  # the DDIM step index, not the timestep (the official code)
    assert float((got - z).abs().max()) < 1e-5
    # the re-injected slice ends nearly clean: sqrt(ac[0]) prev + sqrt(1 - ac[0]) noise
    assert float((got[:, :, 0] - prev[:, :, 0]).std()) < 0.05
