"""The bundle docs: READMEs in the model-zoo template order and short enough to read, the sections shared by the
three written once (``bundles/_shared_docs``) and inserted into each archive's README by ``tools/build_bundles.py``,
links that resolve, and one short changelog line per version."""

from __future__ import annotations

import json
import re
import sys
import zipfile

import pytest
import yaml
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import build_bundles as bb  # noqa: E402

BUNDLES = bb.BUNDLES
MAX_LINES = 280
#: the model-zoo README template order (spleen_ct_segmentation); each README has these headings in this order
TEMPLATE = (
    "# Model Overview",
    "## Data",
    "## Training configuration",
    "### Input",
    "### Output",
    "## Performance",
    "## MONAI Bundle Commands",
    "## Limitations",
    "# References",
    "# License",
)
#: the Requirements block tests/test_pins.py and tests/test_bundle_download.py read
REQUIREMENTS = ("#### Requirements", "#### Getting the bundle")


def readme(bundle: str) -> str:
    return (ROOT / "bundles" / bundle / "docs" / "README.md").read_text()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_readme_is_short_and_in_the_zoo_template_order(bundle):
    text = readme(bundle)
    n = len(text.splitlines())
    assert n <= MAX_LINES, f"{bundle}: README has {n} lines (at most {MAX_LINES}: move tables to docs/results.md)"
    lines = text.splitlines()
    at = [lines.index(h) if h in lines else -1 for h in TEMPLATE + REQUIREMENTS]
    missing = [h for h, i in zip(TEMPLATE + REQUIREMENTS, at) if i < 0]
    assert not missing, f"{bundle}: README lacks the headings {missing}"
    assert at[: len(TEMPLATE)] == sorted(at[: len(TEMPLATE)]), f"{bundle}: headings out of the template order"
    assert at[len(TEMPLATE)] < at[len(TEMPLATE) + 1], f"{bundle}: Requirements must come before Getting the bundle"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_archive_readme_holds_every_shared_section_and_no_marker(bundle, tmp_path):
    repo = readme(bundle)
    names = bb.SHARED_MARKER.findall(repo)
    assert {"requirements", "getting_the_bundle", "configs_find_code"} <= set(names), bundle
    meta = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
    with zipfile.ZipFile(bb.build(bundle, tmp_path)) as z:
        archived = z.read(f"{bundle}/docs/README.md").decode()
        others = {n for n in z.namelist() if n.startswith(f"{bundle}/docs/")}
    assert archived == bb.archive_readme(bundle)
    assert "<!-- shared" not in archived and "<!-- repo-only" not in archived and "{{" not in archived
    assert "_shared_docs" not in archived  # the repository's pointers are gone with their lines
    values = bb.placeholders(bundle)
    for name in names:
        body = bb.shared_section(name).read_text().strip("\n")
        for key, value in values.items():
            body = body.replace("{{" + key + "}}", value)
        assert body in archived, f"{bundle}: shared section {name} is not in the archive README"
    assert f"{bundle}_v{meta['version']}.zip" in archived and f"torch=={meta['pytorch_version']}" in archived
    # what the other tests read is intact in the archive: the Requirements block, the CPU recipe
    block = repo[repo.index(REQUIREMENTS[0]) : repo.index(REQUIREMENTS[1])]
    assert block.split("```")[1] in archived
    if "<!-- cpu-recipe -->" in repo:
        recipe = re.search(r"```bash\n(.*?)```", repo[repo.index("<!-- cpu-recipe -->") :], re.S).group(1)
        assert recipe in archived[archived.index("<!-- cpu-recipe -->") :]
    # every other docs file of the bundle travels in the archive
    on_disk = {f"{bundle}/docs/{p.name}" for p in (ROOT / "bundles" / bundle / "docs").iterdir() if p.is_file()}
    assert on_disk <= others


def test_an_unknown_section_or_placeholder_stops_the_build(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no bundles/_shared_docs/nope.md"):
        bb.expand_shared("x <!-- shared: nope -->\n", {})
    (tmp_path / "s.md").write_text("for {{bundle}} and {{nope}}\n")
    monkeypatch.setattr(bb, "SHARED_DOCS", tmp_path)
    monkeypatch.setattr(bb, "REPO", tmp_path.parent)
    with pytest.raises(SystemExit, match=r"unknown placeholder \{\{nope\}\}"):
        bb.expand_shared("a\n*see* <!-- shared: s -->\nb\n", {"bundle": "b"})
    (tmp_path / "s.md").write_text("for {{bundle}}\n")
    out = bb.expand_shared("a\nnote <!-- repo-only -->\n*see* <!-- shared: s -->\nb\n", {"bundle": "b"})
    assert out == "a\nfor b\nb\n"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than ``-`` and ``_`` dropped, spaces -> ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_local_link_of_the_docs_resolves(bundle):
    docs = ROOT / "bundles" / bundle / "docs"
    for page in sorted(docs.glob("*.md")):
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (docs / file).resolve() if file else page
            assert dest.is_file(), f"{page.name}: link to {target}, which does not exist"
            if anchor:
                assert anchor in _anchors(dest), f"{page.name}: link to {target}: no such heading in {dest.name}"


def test_no_config_has_an_initialize_section():
    """What the shared section configs_find_code states: an unpacked archive's fvae_ct is importable from ``run`` on,
    so no config evaluates anything before it."""
    for f in sorted((ROOT / "bundles").glob("*/configs/*.yaml")):
        assert "initialize" not in (yaml.safe_load(f.read_text()) or {}), f"{f}: has an initialize section"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_changelog_has_one_short_line_per_version(bundle):
    meta = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
    log = meta["changelog"]
    assert meta["version"] in log
    for version, line in log.items():
        assert "\n" not in line and 0 < len(line) <= 160, f"{bundle} {version}: {len(line)} characters"
