"""Writing outputs all or nothing (temporary file + rename), marking our own reconstructions, and one run per output
folder (an OS lock). Never writes over an input."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.wrapstruct import WrapStruct

from .cases import is_nifti
from .errors import InputError

__all__ = [
    "atomic_write",
    "atomic_folder",
    "write_text_atomic",
    "save_nifti_atomic",
    "clean_temporaries",
    "folder_lock",
    "is_own_output",
    "OUTPUT_MARK",
]

log = logging.getLogger("fvae_ct")

_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)*$")


def clean_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries an interrupted :func:`atomic_write` or :func:`atomic_folder` left in ``folder``
    (files, and folders holding only files, named ``.<name>.<8 random>.tmp<suffixes>``); returns what was removed."""
    removed = []
    if Path(folder).is_dir():
        for f in Path(folder).iterdir():
            if not _TEMPORARY.match(f.name) or f.is_symlink():
                continue
            if f.is_file():
                f.unlink()
                removed.append(f)
            elif f.is_dir() and all(e.is_file() and not e.is_symlink() for e in f.iterdir()):
                shutil.rmtree(f)
                removed.append(f)
    return removed


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write ``path`` all or nothing: ``write(tmp)`` fills a temporary ``.<name>.<8 random>.tmp<suffixes>`` beside it,
    which is then renamed over ``path`` (usual permissions); returns ``path``. A failing ``write`` leaves
    ``path`` as it was (the temporary is removed; one left by a kill is what :func:`clean_temporaries` removes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_folder(path: str | os.PathLike, write, replace=lambda old: False) -> Path:
    """Write the folder ``path`` all or nothing: ``write(tmp)`` fills a temporary sibling folder
    ``.<name>.<8 random>.tmp``, which is then renamed to ``path``; returns ``path``. A failing ``write`` removes the
    temporary and leaves ``path`` as it was (one left by a kill is what :func:`clean_temporaries` removes), so a partial
    folder is never visible under ``path``.

    An existing ``path`` is replaced only if ``replace(path)`` says so (e.g. it is an earlier output of ours), else
    :class:`InputError`; the old folder is first renamed to a temporary name and removed after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_dir() or not replace(path):
            raise InputError(
                path,
                "exists and is not an earlier output of fvae-ct: not replaced; move it away or use "
                "another output folder",
            )
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; outputs get the usual permissions
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            os.replace(path, old)  # onto the empty folder just made: the old output, out of the way
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None and old.exists():
            if not path.exists():  # the new folder did not get in: the old one goes back
                os.replace(old, path)
            else:
                shutil.rmtree(old)
    return path


def save_nifti_atomic(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    like: str | os.PathLike | None = None,
    forbid=(),
    description: str | None = None,
) -> Path:
    """Write ``data`` (X, Y, Z) as NIfTI via a temporary file + rename, never over a path in ``forbid``.

    ``like``: a NIfTI whose header (codes, units, description) is reused, with the data type of ``data``; when
    ``data`` lies on its grid, its qform and sform are kept exactly (matrices and codes). ``description``: the
    header's ``descrip`` (at most 79 characters), e.g. :data:`OUTPUT_MARK` to mark our own outputs.
    """
    path = Path(path)
    if any(os.path.realpath(path) == os.path.realpath(f) for f in forbid):  # realpath: a link loop is no error
        raise InputError(path, "refusing to overwrite an input file; choose another output folder")
    header: nib.Nifti1Header | None = None
    same_grid = False
    if like is not None and is_nifti(Path(like)):
        ref = nib.load(str(like))
        assert isinstance(ref, nib.Nifti1Image) and isinstance(ref.header, nib.Nifti1Header)  # a .nii / .nii.gz
        header = ref.header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(1.0, 0.0)
        same_grid = tuple(ref.shape[:3]) == tuple(data.shape[:3]) and np.allclose(ref.affine, affine, atol=1e-5)
        if same_grid and len(ref.shape) == 4 and ref.shape[3] == 1 and data.ndim == 3:
            data = data[..., None]  # keep a singleton 4th dimension of the input
    if description is not None:
        if header is None:
            header = nib.Nifti1Header()
            header.set_data_dtype(data.dtype)
        header["descrip"] = description.encode("utf-8")[:79]
    if same_grid:
        # the input's grid: keep its qform and sform exactly (matrices and codes, also code 0, a qform that differs
        # from the sform, a sheared sform), as nibabel keeps a header it is given without an affine
        img = nib.Nifti1Image(data, None, header=header)
        atomic_write(path, lambda tmp: nib.save(img, tmp))
        return path
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=header)
    img.set_sform(
        np.asarray(affine, dtype=np.float64),
        code=int(header["sform_code"]) if header is not None and int(header["sform_code"]) > 0 else 1,
    )
    img.set_qform(
        np.asarray(affine, dtype=np.float64),
        code=int(header["qform_code"]) if header is not None and int(header["qform_code"]) > 0 else 1,
    )
    atomic_write(path, lambda tmp: nib.save(img, tmp))
    return path


OUTPUT_MARK = "fvae-ct reconstruction"  # NIfTI descrip of the reconstructions we write


def is_own_output(path: str | os.PathLike) -> bool:
    """Whether the NIfTI at ``path`` is a reconstruction fvae-ct wrote (its header's ``descrip``)."""
    try:
        header = nib.load(str(path)).header
        assert isinstance(header, WrapStruct)  # a header of named fields (NIfTI, Analyze, ...)
        descrip = bytes(header["descrip"].item())
    except Exception:  # noqa: BLE001 - unreadable: not something we can call ours
        return False
    return descrip.decode("utf-8", "replace").startswith(OUTPUT_MARK)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str):
    """Hold an exclusive lock on ``folder`` (``<folder>/.fvae.lock``) for the ``with`` block, or refuse at once
    (:class:`InputError` naming the folder and the holder's pid) when another process holds it. The operating
    system releases the lock when its holder dies, even by SIGKILL, so a crashed run never blocks the next. The folder
    is created; one that cannot be written (read-only, no permission) is refused as :class:`InputError`."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no lock
        log.warning("%s: file locking is not available here; do not run two jobs into this folder", folder)
        yield None
        return
    path = Path(folder) / ".fvae.lock"
    while True:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only folder or file system, a file where a folder should be, no permission
            raise InputError(folder, f"cannot write here (read-only?): {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise InputError(
                folder, f"another run is writing into this output folder ({holder}); wait for it or use another folder"
            ) from None
        try:  # the file we locked may have been unlinked by a holder that just finished: lock the current one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what}, pid {os.getpid()}".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` all or nothing (:func:`atomic_write`); returns ``path``."""
    path = Path(path)

    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, w)
    return path
