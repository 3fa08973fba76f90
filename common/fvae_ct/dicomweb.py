"""DICOMweb in and out (a PACS or Orthanc with its DICOMweb plugin), with ``dicomweb-client``.

* Input: a study or series address, ``<base>/studies/<StudyUID>`` or ``<base>/studies/<StudyUID>/series/<SeriesUID>``
  (:func:`parse_address`). QIDO-RS finds its CT series (:func:`find_series`): one case each, named
  ``<SeriesNumber>_<SeriesDescription>`` (else by the series UID), whose ``source`` is the series address and whose
  ``path`` is a folder of a temporary directory (removed when the process ends). WADO-RS fetches a series into that
  folder when the case is run (:func:`fetch_series`; under torchrun by the rank that runs it; a failed fetch fails
  that case only), and it is then read and checked as any local DICOM series. :func:`fetch_cases` finds and fetches
  at once.
* Output: :func:`store_files` sends DICOM files (a derived series, a DICOM SEG) to ``<base>`` with STOW-RS.

Credentials never come from an address or a config: an address with ``user:password@`` is refused. A server that
needs them gets them from the environment: ``FVAE_DICOMWEB_TOKEN`` (a bearer token), or ``FVAE_DICOMWEB_USER`` +
``FVAE_DICOMWEB_PASSWORD`` (basic), else ``requests`` reads ``~/.netrc`` (or the file ``$NETRC`` names). Every
message names the server without credentials (:func:`redact`); an HTTP failure is one :class:`InputError` line
naming the server and the status.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

from .errors import InputError, OptionError

__all__ = [
    "Address",
    "is_address",
    "parse_address",
    "redact",
    "store_target",
    "find_series",
    "fetch_series",
    "fetch_cases",
    "store_files",
]

log = logging.getLogger("fvae_ct")

# WADO-RS: the instances as stored (a server without a codec, e.g. Debian's Orthanc for JPEG 2000, cannot transcode)
ANY_SYNTAX = (("application/dicom", "*"),)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# QIDO-RS attributes; instances: NumberOfSeriesRelatedInstances
_TAG = {
    "modality": "00080060",
    "series": "0020000E",
    "number": "00200011",
    "description": "0008103E",
    "instances": "00201209",
}
#: the in-plane size assumed for a series' voxel count before it is fetched (sharding across ranks only)
_PLANE = 512 * 512


def is_address(value) -> bool:
    """Whether ``value`` is an ``http://`` / ``https://`` address (a DICOMweb input), not a local path."""
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://"))


def redact(url: str) -> str:
    """``url`` without the ``user:password@`` part (what messages and logs show)."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return re.sub(r"//[^/@]*@", "//", str(url))
    if "@" not in parts.netloc:
        return str(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


@dataclass(frozen=True)
class Address:
    """A DICOMweb address: the service root ``base`` and, for an input, a study and maybe one series."""

    base: str
    study: str | None = None
    series: str | None = None


def _split(value, option: str) -> tuple[str, list[str]]:
    if not is_address(value):
        raise OptionError(f"{option}: expected an http:// or https:// DICOMweb address, got {value!r}")
    parts = urlsplit(value.strip())
    if parts.username is not None or parts.password is not None:
        raise OptionError(
            f"{option} {redact(value)}: credentials in the address are refused; set FVAE_DICOMWEB_USER and "
            "FVAE_DICOMWEB_PASSWORD (or FVAE_DICOMWEB_TOKEN) in the environment, or use ~/.netrc"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is no number
    except ValueError as e:
        raise OptionError(f"{option} {value!r}: {e}") from e
    if not parts.hostname or parts.query or parts.fragment:
        raise OptionError(f"{option} {value!r}: expected http(s)://host[:port]/path without ?query or fragment")
    segments = [s for s in parts.path.split("/") if s]
    return urlunsplit((parts.scheme.lower(), parts.netloc, "", "", "")), segments


def parse_address(value, option: str = "input") -> Address:
    """``<base>/studies/<StudyUID>[/series/<SeriesUID>]`` -> :class:`Address`; anything else is an
    :class:`OptionError` naming ``option``."""
    root, seg = _split(value, option)
    low = [s.lower() for s in seg]
    if "studies" not in low:
        raise OptionError(
            f"{option} {redact(value)}: expected a DICOMweb study or series address, <base>/studies/<StudyUID>"
            "[/series/<SeriesUID>]"
        )
    i = len(low) - 1 - low[::-1].index("studies")
    rest = seg[i + 1 :]
    ok = len(rest) in (1, 3) and (len(rest) == 1 or rest[1].lower() == "series")
    uids = rest[0::2]
    if not ok or not all(_UID.match(u) and len(u) <= 64 for u in uids):
        raise OptionError(
            f"{option} {redact(value)}: expected <base>/studies/<StudyUID>[/series/<SeriesUID>] with UIDs of "
            "digits and dots"
        )
    base = root + "/" + "/".join(seg[:i]) if i else root
    return Address(base, uids[0], uids[1] if len(uids) > 1 else None)


def store_target(value, option: str = "store") -> str | None:
    """The DICOMweb service root of ``--store`` (``None``/empty: store nothing), checked once; a study address is
    refused (STOW-RS goes to the root, the objects name their study)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    root, seg = _split(value, option)
    if "studies" in [s.lower() for s in seg]:
        raise OptionError(f"{option} {redact(value)}: expected the DICOMweb root (e.g. http://host:8042/dicom-web)")
    return root + ("/" + "/".join(seg) if seg else "")


def _session():
    import requests

    session = requests.Session()  # trust_env: ~/.netrc / $NETRC when nothing below is set
    token = os.environ.get("FVAE_DICOMWEB_TOKEN")
    user, password = os.environ.get("FVAE_DICOMWEB_USER"), os.environ.get("FVAE_DICOMWEB_PASSWORD")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user:
        session.auth = (user, password or "")
    return session


def _client(base: str):
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise OptionError(
            f"{redact(base)}: DICOMweb needs the package dicomweb-client, which is not installed: "
            "pip install dicomweb-client"
        ) from None

    client = DICOMwebClient(url=base, session=_session())
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)  # a busy server: 429/503/504 ...
    return client


def _http_error(base: str, what: str, e: Exception) -> InputError:
    """One line naming the server (no credentials), the request and the status (or why no answer came)."""
    response = getattr(e, "response", None)
    if response is not None and getattr(response, "status_code", None) is not None:
        problem = f"{what}: HTTP {response.status_code} {response.reason or ''}".rstrip()
    else:
        problem = f"{what}: no answer ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    return InputError(redact(base), problem)


def _call(base: str, what: str, fn, *args, **kwargs):
    import requests

    try:
        return fn(*args, **kwargs)
    except (requests.RequestException, OSError) as e:
        raise _http_error(base, what, e) from None


def _value(attrs: dict, tag: str) -> Any:
    values = (attrs.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _case_name(attrs: dict) -> str:
    number, description = _value(attrs, _TAG["number"]), _value(attrs, _TAG["description"])
    text = "_".join(str(v) for v in (number, description) if v not in (None, ""))
    text = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("._")
    return text[:80] or f"series_{str(_value(attrs, _TAG['series']))[-12:]}"


_TEMP: list[Path] = []


def _remove_temp() -> None:
    for p in _TEMP:
        shutil.rmtree(p, ignore_errors=True)


def _register(path: Path) -> None:
    """Remove ``path`` when the process ends."""
    if not _TEMP:
        atexit.register(_remove_temp)
    _TEMP.append(path)


def _workdir() -> Path:
    """A private temporary folder, removed when the process ends."""
    path = Path(tempfile.mkdtemp(prefix="fvae_dicomweb_"))
    _register(path)
    return path


def find_series(value) -> list:
    """The CT series of a DICOMweb study / series address (QIDO-RS), nothing fetched yet: ``[Case(name, folder,
    source=<series address>, size=<instances x 512 x 512>)]`` in the server's order, each folder in a temporary
    folder removed at exit, for :func:`fetch_series`."""
    from .cases import Case, unique_names

    address = parse_address(value)
    base, shown = address.base, redact(value)
    filters = {"SeriesInstanceUID": address.series} if address.series else {}
    search = _client(base).search_for_series
    found = _call(base, f"QIDO-RS search of {shown}", search, address.study, search_filters=filters)
    series = [s for s in found if address.series or str(_value(s, _TAG["modality"]) or "").upper() == "CT"]
    if not series:
        other = sorted({str(_value(s, _TAG["modality"])) for s in found})
        raise InputError(shown, "no such series" if address.series or not found else f"no CT series (only {other})")
    folder = _workdir()
    cases = []
    for s in series:
        uid = str(_value(s, _TAG["series"]))
        size = int(_value(s, _TAG["instances"]) or 1) * _PLANE
        cases.append(Case(_case_name(s), uid, source=f"{redact(base)}/studies/{address.study}/series/{uid}", size=size))
    for case in unique_names(cases):
        case.path = str(folder / case.name)
    return cases


def fetch_series(case) -> None:
    """Fetch the series of ``case.source`` (WADO-RS, the instances as stored) into the folder ``case.path``, unless
    it is there already; the folder appears whole (written beside it, then renamed) and is removed at exit. A failed
    or empty retrieval is an :class:`InputError` naming the server."""
    target = Path(case.path)
    if target.is_dir() and any(target.iterdir()):
        return
    address = parse_address(case.source)
    base, shown = address.base, redact(case.source)
    if not target.parent.is_dir():  # another process's temporary folder (torchrun on another node)
        target.parent.mkdir(parents=True)
        _register(target.parent)
    retrieve = _client(base).retrieve_series
    datasets = _call(
        base, f"WADO-RS retrieval of {shown}", retrieve, address.study, address.series, media_types=ANY_SYNTAX
    )
    if not datasets:
        raise InputError(shown, "the series has no instances")
    part = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for i, ds in enumerate(datasets):
            ds.save_as(part / f"{i:05d}.dcm", enforce_file_format=True)
        part.rename(target)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    _register(target)
    log.info("%s: %d instances fetched -> %s", shown, len(datasets), target)


def fetch_cases(value) -> list:
    """:func:`find_series` with every series fetched (:func:`fetch_series`): cases read like local series folders."""
    cases = find_series(value)
    for case in cases:
        fetch_series(case)
    return cases


def store_files(base: str, files: Sequence[str | os.PathLike], what: str = "") -> int:
    """Send the DICOM ``files`` to the DICOMweb root ``base`` (STOW-RS, one request); the number stored. A failed
    request or any instance the server reports as failed is an :class:`InputError` naming the server."""
    import pydicom

    paths = [Path(f) for f in files]
    if not paths:
        return 0
    what = what or str(paths[0].parent)
    datasets = [pydicom.dcmread(f) for f in paths]
    result = _call(base, f"STOW-RS of {what}", _client(base).store_instances, datasets)
    failed = result.get("FailedSOPSequence") if result is not None else None
    if failed:
        reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
        raise InputError(redact(base), f"STOW-RS of {what}: {len(failed)} of {len(paths)} refused (reason {reasons})")
    log.info("%s: %d instance(s) of %s stored", redact(base), len(paths), what)
    return len(paths)
