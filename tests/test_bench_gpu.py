"""bench/bench_gpu.py (make bench-gpu): its no-CUDA path, and that it builds every full-size model it measures."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from conftest import PY, ROOT, run


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_it_exits_at_once_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: make bench-gpu measures it")
    t0 = time.perf_counter()
    r = run([PY, "bench/bench_gpu.py", "--out", str(tmp_path / "out")])
    assert r.returncode == 2 and time.perf_counter() - t0 < 60
    assert r.stdout.strip() == "bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False): nothing measured"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["taef2", "wan2.1", "wan2.2", "ivvae_z16_dim64", "leanvae_dim16"])
def test_the_full_size_models_it_measures_build(name):
    """On the meta device (no memory): the real architectures at full size, with the published sizes."""
    with torch.device("meta"):
        vae = _bench().full_size_vae(name, torch.float32)
    n = sum(p.numel() for p in vae.parameters())
    expected = {"taef2": (32, 8), "wan2.1": (16, 8), "wan2.2": (48, 16), "ivvae_z16_dim64": (16, 8),
                "leanvae_dim16": (16, 8)}[name]
    assert (vae.latent_channels, vae.spatial_factor) == expected
    assert n > {"taef2": 1e6, "wan2.1": 1e8, "wan2.2": 6e8, "ivvae_z16_dim64": 1e8, "leanvae_dim16": 3e7}[name], n
