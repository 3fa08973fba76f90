"""The code every bundle vendors (common/fvae_ct) passes the MONAI model-zoo's format checks: black, isort and
flake8 with the zoo's settings (copied into pyproject.toml and .flake8; `tools/zoo_ci.sh` also runs them with the
zoo's own files)."""

from __future__ import annotations

import pytest
from conftest import PY, ROOT, run

PACKAGE = str(ROOT / "common" / "fvae_ct")


@pytest.mark.parametrize("tool", [["black", "--check", "--quiet"], ["isort", "--check-only", "--quiet"], ["flake8"]])
def test_vendored_code_passes_the_zoo_format_checks(tool):
    r = run([PY, "-m", *tool, PACKAGE])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_the_style_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=1\n")
    assert run([PY, "-m", "flake8", str(bad)]).returncode != 0
    assert run([PY, "-m", "black", "--check", "--quiet", str(bad)]).returncode != 0
