"""What the recon bundle runs on: the cases of its ``input`` (the bundle's ``datalist`` property).

Our own reconstructions (``<case>_recon.nii.gz`` marked in their header, ``<case>_recon_dicom/`` series marked in
their DerivationDescription) are left out when the output folder is the input folder; any other file there is a case,
and is never written over.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import Case, discover_cases, is_own_output, unique_names
from ..reconstruct import RECON_SUFFIX
from .dicom_output import DICOM_SUFFIX, is_own_series

__all__ = ["list_cases", "datalist", "cases_of"]


def list_cases(input_path, output_dir) -> list[Case]:
    """Cases of a path (see :func:`fvae_ct.io.discover_cases`) or of a list of paths, for a run writing into
    ``output_dir``; a series on a PACS is fetched when its case is run (:func:`fvae_ct.io.fetch_case`)."""
    if isinstance(input_path, (list, tuple)):
        cases = unique_names([c for p in input_path for c in discover_cases(p, fetch=False)])
    else:
        cases = discover_cases(input_path, fetch=False)
    out = Path(output_dir).resolve()

    def ours(c) -> bool:
        if Path(os.path.realpath(c.path)).parent != out:
            return False
        if c.path.endswith(RECON_SUFFIX):
            return is_own_output(c.path)
        return Path(c.path).name.endswith(DICOM_SUFFIX) and is_own_series(c.path)

    return [c for c in cases if not ours(c)]


def datalist(input_path, output_dir) -> list[dict]:
    """The cases as MONAI data items ``{"image": path, "case": name[, "label": path][, "source": address, "size":
    voxels]}`` (``source``: a series on a PACS, fetched into ``image`` when it is run)."""
    return [
        {
            "image": c.path,
            "case": c.name,
            **({"label": c.label} if c.label else {}),
            **({"source": c.source, "size": c.size} if c.source else {}),
        }
        for c in list_cases(input_path, output_dir)
    ]


def cases_of(items) -> list[Case]:
    """The :class:`~fvae_ct.io.Case` of each item of :func:`datalist`."""
    return [Case(d["case"], d["image"], d.get("label"), d.get("source"), d.get("size", 0)) for d in items]
