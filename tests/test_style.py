"""The code every bundle vendors (common/fvae_ct) passes the MONAI model-zoo's format checks with the zoo's own
command lines (``runtests.sh --codeformat``: ``isort --check``, ``black --skip-magic-trailing-comma --check``,
``flake8 --count --statistics``) and settings (copied into pyproject.toml and .flake8; ``tools/zoo_ci.py`` runs the
same commands with the zoo's own files). Tool versions: constraints.txt."""

from __future__ import annotations

import pytest
from conftest import PY, ROOT, run

PACKAGE = str(ROOT / "common" / "fvae_ct")


#: the checks of the model-zoo's ``runtests.sh --codeformat`` (pytype aside), flags as the zoo passes them
ZOO_FORMAT_CHECKS = [
    ["isort", "--check"],
    ["black", "--skip-magic-trailing-comma", "--check"],
    ["flake8", "--count", "--statistics"],
]


@pytest.mark.parametrize("tool", ZOO_FORMAT_CHECKS, ids=lambda t: t[0])
def test_vendored_code_passes_the_zoo_format_checks(tool):
    r = run([PY, "-m", *tool, PACKAGE])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_the_style_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=1\n")
    assert run([PY, "-m", "flake8", str(bad)]).returncode != 0
    # the plugins are active: flake8-bugbear's B914 (implicit concatenation inside brackets, the zoo selects B9)
    concat = tmp_path / "concat.py"
    concat.write_text('x = ["a" "b"]\n')
    r = run([PY, "-m", "flake8", "--select", "B9", str(concat)])
    assert "B914" in r.stdout, r.stdout + r.stderr
    assert run([PY, "-m", "black", "--check", "--quiet", str(bad)]).returncode != 0
    # a magic trailing comma that plain black keeps and the zoo's flag joins
    trailing = tmp_path / "trailing.py"
    trailing.write_text("x = [\n    1,\n    2,\n]\n")
    assert run([PY, "-m", "black", "--check", "--quiet", str(trailing)], cwd=tmp_path).returncode == 0
    zoo_black = [PY, "-m", *ZOO_FORMAT_CHECKS[1], "--quiet", str(trailing)]
    assert run(zoo_black, cwd=tmp_path).returncode != 0
