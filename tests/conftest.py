"""Shared fixtures: the real assets (../shared/assets or $FVAE_ASSETS), real TAEF2, tiny real-class models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_default = ROOT.parent / "shared" / "assets"
if not os.environ.get("FVAE_ASSETS") and _default.is_dir():
    os.environ["FVAE_ASSETS"] = str(_default)
os.environ.setdefault("MPLBACKEND", "Agg")


def assets_dir() -> Path:
    """The real assets folder; without it a test is skipped, or fails where ``FVAE_REQUIRE_ASSETS=1`` (CI)."""
    for p in os.environ.get("FVAE_ASSETS", "").split(os.pathsep):
        if p and (Path(p) / "ct").is_dir():
            return Path(p)
    why = "real assets not found: set FVAE_ASSETS (CI has ../shared/assets)"
    if os.environ.get("FVAE_REQUIRE_ASSETS", "").strip() not in ("", "0"):
        pytest.fail(why + "; FVAE_REQUIRE_ASSETS is set, so this is an error, not a skip")
    pytest.skip(why)


# ---- `make test-fast`: the inner loop ---------------------------------------------------------------------------
#: a test whose last measured call took longer than this (seconds) is left out of --fast
FAST_LIMIT_S = 2.0
_DURATIONS_KEY = "fvae/durations"
_DURATIONS: dict[str, float] = {}  # this session's setup + call seconds per test, merged into the cache at the end


def pytest_addoption(parser):
    parser.addoption(
        "--fast",
        action="store_true",
        help="inner loop: leave out tests marked slow / distributed / download, and those whose last measured run "
        f"took over {FAST_LIMIT_S:g} s (durations kept in pytest's cache by every run); a test that launches a "
        "subprocess fails with a request to mark it slow",
    )


def _launching_names(path: str) -> set[str]:
    """Names of the functions / fixtures of one test module that start a subprocess, directly (``subprocess.*``,
    conftest's ``run``) or through another function of the module: read from its source, so the marks cannot drift."""
    import ast

    tree = ast.parse(Path(path).read_text())
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def calls(node):
        for c in ast.walk(node):
            if isinstance(c, ast.Call):
                f = c.func
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "subprocess":
                    yield "subprocess"
                elif isinstance(f, ast.Name):
                    yield f.id

    used = {name: set(calls(node)) for name, node in funcs.items()}
    args = {name: {a.arg for a in node.args.args} for name, node in funcs.items()}
    launching = {n for n, c in used.items() if c & {"subprocess", "run", "Popen", "check_output"}}
    while True:  # through helpers and fixtures of the same module
        more = {n for n in funcs if n not in launching and (used[n] | args[n]) & launching}
        if not more:
            return launching
        launching |= more


def pytest_collection_modifyitems(config, items):
    launching: dict[str, set[str]] = {}
    for item in items:  # tests that launch a subprocess are `slow`, whatever their duration
        path = str(item.fspath)
        if path not in launching:
            launching[path] = _launching_names(path)
        name = getattr(item, "originalname", item.name)
        if name in launching[path] or set(getattr(item, "fixturenames", ())) & launching[path]:
            item.add_marker(pytest.mark.slow)
    if not config.getoption("--fast"):
        return
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    measured = cache.get(_DURATIONS_KEY, {}) if cache is not None else {}
    keep, drop = [], []
    for item in items:
        marked = any(item.get_closest_marker(m) for m in ("slow", "distributed", "download"))
        (drop if marked or measured.get(item.nodeid, 0.0) > FAST_LIMIT_S else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call"):  # a session fixture's setup counts for the first test that needs it
        _DURATIONS[report.nodeid] = _DURATIONS.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    if _DURATIONS and getattr(session.config, "cache", None) is not None:
        merged = {**session.config.cache.get(_DURATIONS_KEY, {}), **_DURATIONS}
        session.config.cache.set(_DURATIONS_KEY, {k: round(v, 3) for k, v in merged.items()})


@pytest.fixture(autouse=True)
def _no_subprocess_in_fast_mode(request, monkeypatch):
    """Under --fast, a test that starts a subprocess fails, naming itself: mark it ``@pytest.mark.slow``."""
    if not request.config.getoption("--fast"):
        return
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} launches a subprocess ({args[0] if args else kwargs}): "
                             "mark it @pytest.mark.slow (make test-fast runs none)")

    monkeypatch.setattr(subprocess, "Popen", refuse)  # subprocess.run / check_output / call all go through it


@pytest.fixture(scope="session")
def assets() -> Path:
    return assets_dir()


@pytest.fixture(scope="session")
def dicom_dir(assets) -> Path:
    return assets / "ct" / "dicom_series_512"


@pytest.fixture(scope="session")
def taef2():
    from fvae_ct.vae import load

    assets_dir()
    return load("taef2")


@pytest.fixture(scope="session")
def dicom_unit(dicom_dir):
    """The DICOM series as [1, 1, D, H, W] in [0, 1] (HU window [-1000, 1000]), upright axial slices."""
    from fvae_ct.transforms import recon_preprocessing

    return recon_preprocessing()({"image": str(dicom_dir)})["image"].as_tensor()[None]


def run(cmd: list[str], **kw):
    """Run a command with this interpreter's environment; returns CompletedProcess (text)."""
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=kw.pop("cwd", ROOT), **kw)


PY = sys.executable


def barrier_env(folder: Path, after: int, env: dict | None = None) -> dict:
    """The environment of a child process whose batch runs its first ``after`` cases and then blocks (each process
    of a torchrun run on its own), writing ``folder/blocked.<pid>``: see ``tests/barrier/sitecustomize.py``."""
    env = dict(os.environ if env is None else env)
    folder.mkdir(parents=True, exist_ok=True)
    path = [str(ROOT / "tests" / "barrier"), *filter(None, [env.get("PYTHONPATH")])]
    env.update(PYTHONPATH=os.pathsep.join(path), FVAE_TEST_BLOCK_AFTER=str(after), FVAE_TEST_BARRIER_DIR=str(folder))
    return env


def wait_blocked(folder: Path, n: int, proc, timeout: float = 300) -> list[str]:
    """Wait until ``n`` processes wait at the barrier of :func:`barrier_env`; the names of the cases they hold."""
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        marks = sorted(folder.glob("blocked.*"))
        if len(marks) >= n:
            return [m.read_text() for m in marks]
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before reaching the barrier"
        time.sleep(0.05)
    raise TimeoutError(f"{n} process(es) did not reach the barrier in {folder} within {timeout} s")


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def check_properties(conf_dir: Path, configs: list[str], workflow_type: str | None, **overrides) -> list[str]:
    """MONAI's ``ConfigWorkflow.check_properties()`` for the layered ``configs`` of a bundle, as the model-zoo CI and
    MONAI Label run it: initialise, then parse every required property (so each must instantiate, not only exist).
    Returns the missing or wrong property names ([] when the workflow type's contract holds)."""
    from monai.bundle import ConfigWorkflow

    w = ConfigWorkflow(config_file=[str(conf_dir / c) for c in configs], meta_file=str(conf_dir / "metadata.json"),
                       logging_file=str(conf_dir / "logging.conf"), workflow_type=workflow_type, **overrides)
    w.initialize()
    return w.check_properties()
