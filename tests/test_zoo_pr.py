"""The archives as a model-zoo pull request would contain them: the full-mode checks of the zoo's
``ci/verify_bundle.py`` that read files (preferred files, TorchScript export of ``models/model.pt``) either find the
file in the archive or are excluded by the list ``tools/zoo_ci.py`` adds, as CONTRIBUTING allows; and the zoo check
runs on the archive with nothing added (no model trained into it)."""

from __future__ import annotations

import sys
import zipfile

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import zoo_ci  # noqa: E402
from build_bundles import build  # noqa: E402


@pytest.mark.parametrize("bundle", zoo_ci.BUNDLES)
def test_archive_passes_the_zoo_file_checks_as_submitted(bundle, tmp_path):
    names = set(zipfile.ZipFile(build(bundle, tmp_path)).namelist())
    has_weights = f"{bundle}/models/model.pt" in names
    excluded = zoo_ci.EXCLUSIONS[bundle]
    if not has_weights:  # verify_bundle: preferred files, then ckpt_export of models/model.pt
        assert "exclude_verify_preferred_files_list" in excluded, f"{bundle}: no models/model.pt, not excluded"
        assert "exclude_verify_torchscript_list" in excluded, f"{bundle}: TorchScript export needs models/model.pt"
    readme = (ROOT / "bundles" / bundle / "docs" / "README.md").read_text()
    for lst in excluded:  # every exclusion is stated in the bundle's README
        assert f"`{lst}`" in readme, f"{bundle}: README does not state {lst}"


def test_zoo_check_adds_nothing_to_the_archives():
    src = (ROOT / "tools" / "zoo_ci.py").read_text()
    for added in ("train.yaml", "model.pt\"", "make_lesion_set"):
        assert added not in src, f"tools/zoo_ci.py adds {added} to an archive"


@pytest.mark.parametrize("bundle", zoo_ci.BUNDLES)
def test_every_sample_file_the_readme_uses_is_fetched_by_large_files(bundle):
    """A site has only what ``download_large_files`` fetches: each ``sample_data/...`` path in the README's commands
    is a file (or a folder of files) of ``large_files.yml``, whose entries are the registered upstream assets."""
    import re

    import yaml

    from fvae_ct.assets import ASSETS

    readme = (ROOT / "bundles" / bundle / "docs" / "README.md").read_text()
    items = yaml.safe_load((ROOT / "bundles" / bundle / "large_files.yml").read_text())["large_files"]
    fetched = [x["path"] for x in items]
    for used in set(re.findall(r"sample_data/[\w.-]+", readme)):
        assert any(f == used or f.startswith(used + "/") for f in fetched), f"{bundle}: {used} is not fetched"
    known = {a.url: a.sha256 for a in ASSETS.values()}
    for x in items:
        if x["url"] in known:
            assert x["hash_val"] == known[x["url"]], x["path"]
