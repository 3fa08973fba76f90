"""The one constraints file (``constraints.txt``): exact versions of everything the project's environments install.

    python tools/pins.py check [--env test] [--python .venv/bin/python] [--subset]
    python tools/pins.py export --env monailabel > constraints-monailabel.txt

``constraints.txt`` has one section per environment, headed ``# [name] ...``; each adds to the sections above it:
- ``[test]``: the test environment (``make install``: library, test tools, lint plugins, the JAX reference stack,
  pip and setuptools);
- ``[bundles]``: what a bundle's ``metadata.json`` requirements pull in beyond that (the bundle-check and model-zoo
  environments: ``[test]`` + ``[bundles]``);
- ``[<bundle>]`` (e.g. ``[fvae_aug_seg]``): ``#!`` overrides for one bundle whose ``metadata.json`` asks for other
  versions than ``[bundles]`` (its bundle-check and model-zoo environments; :func:`bundle_env`);
- ``[monailabel]``: what the ``make monailabel-check`` environment adds (MONAI Label and its server stack), and
  ``#! name==version`` lines for the packages it holds at another version than the sections above (pip reads them
  as comments, so the whole file stays one valid constraints file for pip).

``check`` compares ``pip list`` of an interpreter with the section of its environment and fails, one line per
package, on an installed package with no pin (unpinned), a version other than its pin (drifted) and, unless
``--subset`` (an environment that installs only part of the section, such as a bundle's), a pin that nothing
installed (stale). ``export`` writes the constraints one environment is installed with.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
SECTION = re.compile(r"^#\s*\[(\w+)\]")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read(path: Path = CONSTRAINTS) -> dict[str, dict[str, str]]:
    """``{section: {canonical name: version}}``; ``[monailabel]`` overrides are read into section ``monailabel!``."""
    sections: dict[str, dict[str, str]] = {}
    current = None  # the section being read
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        head = SECTION.match(line)
        if head:
            current = head.group(1)
            sections.setdefault(current, {})
            continue
        override = line.startswith("#!")
        if override:
            line = line[2:].strip()
        if not line or line.startswith("#"):
            continue
        pin = PIN.match(line)
        if pin is None or current is None:
            raise SystemExit(f"{path}:{n}: not a 'name==version' line inside a '# [section]': {raw!r}")
        target = sections.setdefault(f"{current}!" if override else current, {})
        name = canonical(pin.group(1))
        if name in target:
            raise SystemExit(f"{path}:{n}: {pin.group(1)} pinned twice")
        target[name] = pin.group(2)
    if "test" not in sections:
        raise SystemExit(f"{path}: no '# [test]' section")
    return sections


def pins_for(env: str, sections: dict[str, dict[str, str]]) -> tuple[dict[str, str], set[str]]:
    """(the pins of one environment, the names its own section holds). Sections are layers in file order: an
    environment holds its own section and every section above it, then its ``#!`` overrides."""
    if env not in sections or env.endswith("!"):
        names = ", ".join(k for k in sections if not k.endswith("!"))
        raise SystemExit(f"no '# [{env}]' section in {CONSTRAINTS.name}; sections: {names}")
    pins: dict[str, str] = {}
    for name, section in sections.items():
        if not name.endswith("!"):
            pins.update(section)
        if name == env:
            break
    own = {**sections[env], **sections.get(f"{env}!", {})}
    return {**pins, **own}, set(own)


def bundle_env(bundle: str, sections: dict[str, dict[str, str]]) -> str:
    """The constraints section a bundle's environments install with: its own when there is one, else ``bundles``."""
    return bundle if bundle in sections else "bundles"


def installed(python: str) -> dict[str, str]:
    """``{canonical name: version}`` of an interpreter's environment, the project's own editable install left out."""
    out = subprocess.run(
        [python, "-m", "pip", "list", "--format=json", "--exclude-editable", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {canonical(d["name"]): d["version"] for d in json.loads(out)}


def same(installed_version: str, pinned: str) -> bool:
    """``==`` as PEP 440 reads it for a release: a local label (``2.13.0+cpu``) matches ``2.13.0``."""
    return installed_version == pinned or installed_version.split("+")[0] == pinned


def compare(have: dict[str, str], pins: dict[str, str], own: set[str], subset: bool = False) -> list[str]:
    """One line per problem (empty: the environment is exactly what the constraints say)."""
    problems = []
    for name, version in sorted(have.items()):
        if name not in pins:
            problems.append(f"unpinned: {name}=={version} is installed but not in {CONSTRAINTS.name}")
        elif not same(version, pins[name]):
            problems.append(f"drifted: {name} is {version}, {CONSTRAINTS.name} pins {pins[name]}")
    if not subset:
        problems += [f"stale: {n}=={pins[n]} is pinned but not installed" for n in sorted(own - set(have))]
    return problems


def export(env: str, sections: dict[str, dict[str, str]]) -> str:
    pins, _ = pins_for(env, sections)
    head = f"# generated by tools/pins.py export --env {env} from {CONSTRAINTS.name}; do not edit\n"
    return head + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["check", "export"])
    p.add_argument("--env", default="test", help="section of constraints.txt (default: test)")
    p.add_argument("--python", default=sys.executable, help="interpreter whose environment is checked")
    p.add_argument("--subset", action="store_true", help="the environment installs part of the section only")
    a = p.parse_args(argv)
    sections = read()
    if a.command == "export":
        sys.stdout.write(export(a.env, sections))
        return 0
    pins, own = pins_for(a.env, sections)
    problems = compare(installed(a.python), pins, own, a.subset)
    for line in problems:
        print(f"{a.python}: {line}", file=sys.stderr)
    if problems:
        print(
            f"{len(problems)} package(s) differ from the [{a.env}] pins; a new version is a deliberate change: "
            f"edit {CONSTRAINTS.name} and rebuild the environment (make install)",
            file=sys.stderr,
        )
        return 1
    print(f"{a.python}: {len(pins)} pins of [{a.env}] hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
