"""The layering of fvae_ct, and what each bundle archive carries.

Core = what at least two bundles use; one subpackage per bundle (recon, aug_seg, ldm). The core imports no subpackage;
aug_seg may import recon (its ``prepare`` step runs the recon workflow); nothing else imports another bundle's
subpackage. ``cli`` (the ``fvae`` command over every bundle) and ``testing`` are not part of any bundle and may import
anything. Imports are read with ``ast`` wherever they stand (inside functions too), relative ones resolved, as
``tools/build_bundles.py`` does to find what an archive vendors.
"""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import build_bundles as bb  # noqa: E402

PACKAGE = ROOT / "common" / "fvae_ct"
SUBPACKAGES = ("recon", "aug_seg", "ldm")
#: what each subpackage may import besides the core and itself
ALLOWED = {"recon": set(), "aug_seg": {"recon"}, "ldm": set()}
#: modules above the bundles (never vendored)
TOOLS = {"fvae_ct.cli", "fvae_ct.testing"}


def all_modules(package=PACKAGE):
    out = []
    for f in sorted(package.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        parts = list(f.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(["fvae_ct", *parts]))
    return out


def layer(module):
    """``core``, a subpackage name, or ``tools``."""
    if module in TOOLS:
        return "tools"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "core"


def test_every_module_parses_and_the_subpackages_exist():
    modules = all_modules()
    assert {f"fvae_ct.{s}" for s in SUBPACKAGES} <= set(modules)
    assert "fvae_ct.recon.boundary" in modules and "fvae_ct.ldm.networks.consistency" in modules
    assert not any(m.startswith(("fvae_ct.networks", "fvae_ct.metrics.fvd", "fvae_ct.metrics.generation",
                                 "fvae_ct.metrics.boundary")) for m in modules)


@pytest.mark.parametrize("module", [m for m in all_modules() if layer(m) != "tools"])
def test_layering(module):
    own = layer(module)
    imported = {layer(m) for m in bb.module_imports(module)} - {"core", own}
    allowed = ALLOWED.get(own, set())
    assert "tools" not in imported, f"{module} imports the fvae command or the test helpers"
    assert imported <= allowed, (
        f"{module} ({own}) imports {sorted(imported - allowed)}: "
        + ("the core imports no bundle subpackage" if own == "core" else f"{own} may import only {sorted(allowed)}")
    )


def test_no_core_module_serves_a_single_bundle():
    """Core = what at least two bundles use: a core module that only one bundle's archive carries belongs in that
    bundle's subpackage (fvae_aug_seg counts as a user of what it runs of fvae_recon's workflow)."""
    carried = {b: bb.vendored_modules(b) for b in bb.BUNDLES}
    for m in all_modules():
        if layer(m) == "core":
            users = [b for b in bb.BUNDLES if m in carried[b]]
            assert len(users) != 1, f"{m} is in the core but only {users[0]} carries it"


def test_import_closure_finds_every_kind_of_import(tmp_path):
    """Relative imports (any level), imports inside functions, ``from . import sub``, attribute chains after
    ``import fvae_ct``, code strings run by a subprocess and the packages above a module; docstrings and names that
    are not modules are ignored."""
    pkg = tmp_path / "fvae_ct"
    files = {
        "__init__.py": "from ._lazy import f\n",
        "_lazy.py": "",
        "a/__init__.py": '"""See fvae_ct.never."""\n',
        "a/x.py": "def f():\n    from ..b import y\n    from . import z\n    return y, z\n",
        "a/z.py": "import fvae_ct\n\ndef g():\n    return fvae_ct.c.deep.thing\n",
        "b/__init__.py": "",
        "b/y.py": "from .w import *\nCODE = 'from fvae_ct.d import run'\n",
        "b/w.py": "",
        "c/__init__.py": "",
        "c/deep.py": "",
        "d.py": "",
        "never.py": "",
        "unused.py": "import fvae_ct.never\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    closure = bb.import_closure({"fvae_ct.a.x"}, pkg)
    assert closure == {"fvae_ct", "fvae_ct._lazy", "fvae_ct.a", "fvae_ct.a.x", "fvae_ct.a.z", "fvae_ct.b",
                       "fvae_ct.b.y", "fvae_ct.b.w", "fvae_ct.c", "fvae_ct.c.deep", "fvae_ct.d"}


def test_each_bundle_carries_its_own_subpackage_only():
    recon, aug, ldm = (bb.vendored_modules(b) for b in ("fvae_recon", "fvae_aug_seg", "fvae_ldm"))
    assert {"fvae_ct.recon.boundary", "fvae_ct.recon.analysis", "fvae_ct.vae.base"} <= recon
    assert not any(layer(m) in ("aug_seg", "ldm") for m in recon)
    assert "fvae_ct.recon.denoisers" in aug  # imported inside a function (nnunet_data)
    assert "fvae_ct.aug_seg.lesions" in aug  # run by the README's `python -m fvae_ct.aug_seg.lesions`
    assert not any(layer(m) == "ldm" for m in aug)
    assert {"fvae_ct.ldm.fvd", "fvae_ct.ldm.generation_metrics", "fvae_ct.ldm.networks.consistency"} <= ldm
    assert not any(layer(m) in ("recon", "aug_seg") for m in ldm)
    assert not any(m in TOOLS for m in recon | aug | ldm)


def test_one_logger_name():
    """Every module logs to the one logger ``fvae_ct`` (what the bundles' logging.conf and a user's filter see), never
    ``__name__`` or another name."""
    import ast

    bad = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "getLogger":
                arg = node.args[0] if node.args else None
                if not (isinstance(arg, ast.Constant) and arg.value == "fvae_ct"):
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert bad == [], bad
