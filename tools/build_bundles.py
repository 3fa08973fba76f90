"""Build self-contained bundle archives: ``dist/<bundle>_v<version>.zip`` (``make bundles``).

Each archive holds one folder ``<bundle>/`` with what is in ``bundles/<bundle>/`` in git (configs, docs,
LICENSE, large_files.yml) plus the code the bundle needs, vendored from the one source ``common/fvae_ct`` as
``<bundle>/fvae_ct/``: the import closure (:func:`import_closure`) of the ``fvae_ct`` modules its configs name (and
the ``python -m fvae_ct...`` commands of its docs), so nothing is kept by hand and an archive carries no module
that none of them can reach. A site that downloads
one archive runs it with ``python -m monai.bundle run`` and the packages its metadata lists: MONAI puts the
bundle folder on ``sys.path`` (``ConfigWorkflow.run``; the model-zoo CI and MONAI Label do the same), so the
configs' ``import fvae_ct`` finds the vendored copy; in the repository it finds the installed package. The same
configs serve both, unedited.

Sections that all three bundle READMEs share (requirements, getting the bundle, how the configs find the code, ...)
are written once in ``bundles/_shared_docs/<name>.md``. A repository README holds a one-line pointer with the marker
``<!-- shared: <name> -->`` in their place; the archive's ``docs/README.md`` holds the section's text there, with the
placeholders ``{{bundle}}``, ``{{version}}``, ``{{torch}}``, ``{{vendored}}`` and ``{{large_files}}`` filled in, and
lines marked ``<!-- repo-only -->`` are left out (:func:`archive_readme`).

The archives are reproducible: sorted entries, fixed timestamps, no caches.

    python tools/build_bundles.py [--out dist] [--bundles fvae_recon,fvae_ldm] [--unpack DIR]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "common" / "fvae_ct"

#: the bundles :func:`main` builds by default
BUNDLES = ("fvae_recon", "fvae_aug_seg", "fvae_ldm")
#: bundle subpackages (never part of the core)
WORKFLOW_PACKAGES = {"recon", "aug_seg", "ldm"}
_EPOCH = (2024, 1, 1, 0, 0, 0)
#: a dotted reference to fvae_ct: ``fvae_ct.recon.analysis.AnalysisWorkflow`` in a config, ``"from fvae_ct.bundle
#: import run_bundle"`` in a code string handed to a subprocess
_REF = re.compile(r"\bfvae_ct(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\bfvae_ct\b")
#: the shared README sections, one file per section (``bundles/_shared_docs/<name>.md``)
SHARED_DOCS = REPO / "bundles" / "_shared_docs"
#: a README line holding ``<!-- shared: <name> -->``: the whole line is replaced by that section in the archive
SHARED_MARKER = re.compile(r"^.*<!-- shared: ([A-Za-z0-9_-]+) -->.*$", re.M)
#: a README line holding ``<!-- repo-only -->`` (a note for readers of the repository) is left out of the archive
REPO_ONLY = re.compile(r"^.*<!-- repo-only -->.*\n?", re.M)
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def _skip(p: Path) -> bool:
    return "__pycache__" in p.parts or p.suffix in (".pyc", ".pyo") or p.name.startswith(".")


def _module_file(module: str, package: Path = PACKAGE) -> Path | None:
    """The source file of ``fvae_ct[.a.b]`` under ``package``: ``a/b/__init__.py`` or ``a/b.py``, else None."""
    base = package.joinpath(*module.split(".")[1:])
    for f in (base / "__init__.py", base.with_suffix(".py")):
        if f.is_file():
            return f
    return None


def _longest_module(dotted: str, package: Path = PACKAGE) -> str | None:
    """The longest prefix of ``dotted`` that is a module: ``fvae_ct.ldm.official.text_width`` -> ``fvae_ct.ldm.official``
    (the packages' lazy ``__getattr__`` imports a submodule on first attribute access, :mod:`fvae_ct._lazy`)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if _module_file(".".join(parts[:n]), package) is not None:
            return ".".join(parts[:n])
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body:
            first = n.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _attribute_chain(node: ast.Attribute) -> str | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(names)]) if isinstance(node, ast.Name) and node.id == "fvae_ct" else None


def module_imports(module: str, package: Path = PACKAGE) -> set[str]:
    """The fvae_ct modules one module imports, wherever the import stands (module level, inside a function, under
    ``if``): ``import`` and ``from`` statements, relative ones resolved against the module's package, attribute
    chains ``fvae_ct.a.b`` and ``fvae_ct.a.b`` in string constants other than docstrings (code run by a subprocess)."""
    f = _module_file(module, package)
    tree = ast.parse(f.read_text(), str(f))
    pkg = module.split(".") if f.name == "__init__.py" else module.split(".")[:-1]
    dotted: set[str] = set()
    docs = _docstrings(tree)
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            dotted.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                if n.level - 1 > len(pkg) - 1:
                    raise SystemExit(f"{f}:{n.lineno}: relative import beyond the fvae_ct package")
                base = ".".join(pkg[: len(pkg) - (n.level - 1)] + ([n.module] if n.module else []))
            else:
                base = n.module or ""
            dotted.add(base)
            dotted.update(f"{base}.{a.name}" for a in n.names if a.name != "*")
        elif isinstance(n, ast.Attribute):
            chain = _attribute_chain(n)
            if chain:
                dotted.add(chain)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            dotted.update(_REF.findall(n.value))
    found = {_longest_module(d, package) for d in dotted if d == "fvae_ct" or d.startswith("fvae_ct.")}
    return found - {None}


def config_references(bundle: str) -> set[str]:
    """The fvae_ct modules a bundle runs: those its configs name (``fvae_ct.x.y`` in ``bundles/<bundle>/configs/*``)
    and those its docs run as commands (``python -m fvae_ct.x.y`` in ``docs/*.md`` and the shared sections its README
    names, e.g. fvae_aug_seg's lesion generator)."""
    refs = set()
    for p in sorted((REPO / "bundles" / bundle / "configs").iterdir()):
        if p.is_file() and not _skip(p):
            refs.update(_REF.findall(p.read_text()))
    docs = sorted((REPO / "bundles" / bundle / "docs").glob("*.md"))
    readme = REPO / "bundles" / bundle / "docs" / "README.md"
    if readme.is_file():
        docs += [shared_section(name) for name in SHARED_MARKER.findall(readme.read_text())]
    for doc in docs:
        refs.update(re.findall(r"python -m (fvae_ct(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", doc.read_text()))
    missing = sorted(r for r in refs if _longest_module(r) is None)
    if missing:
        raise SystemExit(f"{bundle}: its configs or README name fvae_ct modules that do not exist: {missing}")
    return {_longest_module(r) for r in refs}


def import_closure(modules, package: Path = PACKAGE) -> set[str]:
    """``modules`` and every fvae_ct module they import, transitively, with the packages above each (importing
    ``fvae_ct.a.b`` runs ``fvae_ct/__init__.py`` and ``fvae_ct/a/__init__.py`` first)."""
    todo, seen = list(modules), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:n]) for n in range(1, len(parts)))
        todo.extend(module_imports(m, package) - seen)
    return seen


def vendored_modules(bundle: str) -> set[str]:
    """The fvae_ct modules a bundle's archive carries: the import closure of its configs' references."""
    return import_closure(config_references(bundle))


def bundle_files(bundle: str) -> list[tuple[Path, str]]:
    """(source file, archive name) pairs of one bundle, sorted by archive name."""
    src = REPO / "bundles" / bundle
    if not (src / "configs" / "metadata.json").is_file():
        raise SystemExit(f"{src}: not a bundle (no configs/metadata.json)")
    files = [(p, f"{bundle}/{p.relative_to(src).as_posix()}") for p in src.rglob("*") if p.is_file() and not _skip(p)]
    for m in sorted(vendored_modules(bundle)):
        p = _module_file(m)
        files.append((p, f"{bundle}/fvae_ct/{p.relative_to(PACKAGE).as_posix()}"))
    return sorted(files, key=lambda f: f[1])


def shared_section(name: str) -> Path:
    """The file of the shared README section ``name``; a marker naming no section stops the build."""
    f = SHARED_DOCS / f"{name}.md"
    if not f.is_file():
        known = sorted(p.stem for p in SHARED_DOCS.glob("*.md") if p.stem != "README")
        raise SystemExit(f"<!-- shared: {name} -->: no {f.relative_to(REPO)} (shared sections: {known})")
    return f


def _large_files_summary(bundle: str) -> str:
    """What ``download_large_files`` fetches, one entry per file or per folder of files: ``models/a.pth``,
    ``sample_data/series/`` (20 files)."""
    import yaml

    groups: dict[str, int] = {}
    for item in yaml.safe_load((REPO / "bundles" / bundle / "large_files.yml").read_text())["large_files"]:
        parts = item["path"].split("/")
        key = "/".join(parts[:2]) + "/" if len(parts) > 2 else item["path"]
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"`{k}` ({n} files)" if k.endswith("/") else f"`{k}`" for k, n in groups.items())


def placeholders(bundle: str) -> dict[str, str]:
    """The values the shared sections' ``{{name}}`` placeholders take for one bundle."""
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    subs = sorted({m.split(".")[1] for m in vendored_modules(bundle) if m.count(".") >= 1} & WORKFLOW_PACKAGES)
    return {
        "bundle": bundle,
        "version": meta["version"],
        "torch": meta["pytorch_version"],
        "vendored": "the shared core plus " + " and ".join(f"`fvae_ct.{s}`" for s in subs),
        "large_files": _large_files_summary(bundle),
    }


def expand_shared(text: str, values: dict[str, str]) -> str:
    """``text`` with every ``<!-- shared: <name> -->`` line replaced by that shared section, placeholders filled in,
    and every ``<!-- repo-only -->`` line left out; an unknown section or placeholder stops the build."""

    def section(m: re.Match) -> str:
        body = shared_section(m.group(1)).read_text().strip("\n")

        def fill(p: re.Match) -> str:
            if p.group(1) not in values:
                raise SystemExit(f"{m.group(1)}.md: unknown placeholder {p.group(0)} (known: {sorted(values)})")
            return values[p.group(1)]

        return _PLACEHOLDER.sub(fill, body)

    return SHARED_MARKER.sub(section, REPO_ONLY.sub("", text))


def archive_readme(bundle: str) -> str:
    """The archive's ``docs/README.md``: the repository README with the shared sections inserted."""
    text = (REPO / "bundles" / bundle / "docs" / "README.md").read_text()
    return expand_shared(text, placeholders(bundle))


def _archive_bytes(bundle: str, src: Path, name: str) -> bytes:
    if name == f"{bundle}/docs/README.md":
        return archive_readme(bundle).encode()
    return src.read_bytes()


def build(bundle: str, out: Path) -> Path:
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{bundle}_v{meta['version']}.zip"
    tmp = dest.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for src, name in bundle_files(bundle):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, _archive_bytes(bundle, src, name))
    tmp.replace(dest)
    return dest


def unpack(archive: Path, dest: Path, large_files: bool = True) -> Path:
    """Unpack an archive into ``dest`` (-> ``dest/<bundle>``) and, with ``large_files``, put every file its
    ``large_files.yml`` names where MONAI's ``download_large_files`` would, taken from ``$FVAE_ASSETS`` (looked up
    by upstream URL; this machine cannot download). Returns the bundle folder."""
    import shutil

    import yaml

    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)
        bundle = dest / z.namelist()[0].split("/")[0]
    if large_files:
        from fvae_ct.assets import ASSETS, search_path

        by_url = {a.url: a for a in ASSETS.values()}
        for item in yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]:
            asset = by_url[item["url"]]
            src = next((p / asset.relpath for p in search_path() if (p / asset.relpath).is_file()), None)
            if src is None:
                raise SystemExit(f"{asset.relpath}: not in FVAE_ASSETS; set it to the shared assets folder")
            (bundle / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, bundle / item["path"])
    return bundle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "dist"))
    ap.add_argument("--bundles", default=",".join(BUNDLES))
    ap.add_argument("--unpack", metavar="DIR", help="also unpack each archive into DIR, with its large files")
    a = ap.parse_args(argv)
    for b in [b for b in a.bundles.split(",") if b]:
        dest = build(b, Path(a.out))
        with zipfile.ZipFile(dest) as z:
            names = z.namelist()
        code = sum(n.endswith(".py") for n in names)
        print(f"{dest}: {len(names)} files ({code} vendored .py), {dest.stat().st_size / 1024:.0f} KiB")
        if a.unpack:
            print(f"  unpacked: {unpack(dest, Path(a.unpack))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
