"""One batch runner for every per-case loop: reconstruction, analysis, the latent cache, the generation evaluation.

::

    with BatchRunner(folder, "fvae recon (taef2)", csv={"metrics.csv": COLUMNS}) as run:
        cases = run.plan(list_cases)          # rank 0: lock, clean temporaries, list, shard; every rank: the plan
        for case in run.mine():               # this rank's share (progress bar on rank 0)
            with run.case(case) as c:         # an exception: logged, recorded as a failure, the loop goes on
                c.add(row)                    # rows: appended to metrics.csv and fsync'd when the case ends
        rows, failures = run.gather()         # every rank's rows and failures, in case order; files merged
    run.raise_failures()                      # one BatchFailure listing the failed cases

One run at a time per folder (:func:`fvae_ct.io.folder_lock`, refused at once with a one-line
:class:`~fvae_ct.errors.InputError`); the temporaries of an interrupted run are removed. Under torchrun every rank
runs the same code: rank 0 lists the cases and splits them by voxel count (:func:`fvae_ct.distributed.shard`), each
rank appends its rows to ``<table>.rank<r>.csv``, rank 0 merges them (atomically) and removes the rank files.
Resume is the caller's: skip a case whose output is complete (``skip_existing``); :attr:`BatchRunner.previous` holds
the rows of an earlier run by case name.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import distributed
from .errors import BatchFailure, FvaeError
from .io import case_voxels, clean_temporaries, folder_lock, write_text_atomic

__all__ = ["BatchRunner", "CaseRecord", "failure_message", "csv_cell", "append_csv", "write_csv", "read_csv"]

log = logging.getLogger("fvae_ct")


def failure_message(failures: Sequence[dict], n_cases: int, note: str = "") -> str:
    """``"<k> of <n> case(s) failed<note>:"`` and one line per failure ``"  case (input): error"``."""
    return f"{len(failures)} of {n_cases} case(s) failed{note}:\n" + "\n".join(
        f"  {f['case']} ({f['input']}): {f['error']}" for f in failures
    )


def csv_cell(v) -> str:
    """A CSV cell: floats with 6 significant digits (``inf`` kept, NaN empty: not measured), lists joined with
    `` | ``, ``None`` empty."""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return " | ".join(map(str, v))
    return "" if v is None else str(v)


def _csv_text(columns: Sequence[str], rows: Sequence[dict], fmt: Callable, header: bool) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    if header:
        w.writeheader()
    for row in rows:
        w.writerow({k: fmt(row.get(k)) for k in columns})
    return buf.getvalue()


def write_csv(path, columns: Sequence[str] | None, rows: Sequence[dict], fmt: Callable = csv_cell) -> Path:
    """``path`` with a header and ``rows`` in one atomic write; ``columns=None``: every key of the rows, in order."""
    columns = list(dict.fromkeys(k for r in rows for k in r)) if columns is None else columns
    return write_text_atomic(path, _csv_text(columns, rows, fmt, header=True))


def append_csv(path, columns: Sequence[str], rows: Sequence[dict], fmt: Callable = csv_cell) -> None:
    """Append ``rows`` to ``path`` and push them to disk (an interrupted run keeps them)."""
    with open(path, "a", newline="") as f:
        f.write(_csv_text(columns, rows, fmt, header=False))
        f.flush()
        os.fsync(f.fileno())


def read_csv(path) -> list[dict]:
    """The rows of a CSV file (empty when there is none or it cannot be read)."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []


class CaseRecord:
    """What one case adds (kept only when the case ends without an exception)."""

    def __init__(self, runner: BatchRunner, case):
        self.case = case
        self.rows: dict[str, list[dict]] = {}
        self._default = runner.default_table

    def add(self, *rows: dict, table: str | None = None) -> None:
        """Rows of this case for ``table`` (default: the first CSV file of the runner, else ``"rows"``)."""
        self.rows.setdefault(table or self._default, []).extend(rows)


class BatchRunner:
    """Lock, plan, shard, per-case failures, incremental CSV rows, merge and one :class:`BatchFailure` (see the
    module's docstring).

    Args:
        folder: the output folder (created; locked for the ``with`` block on rank 0).
        what: names the run in the lock file, the progress bar and the log.
        csv: ``{file name: columns}`` of the CSV tables written in ``folder`` (``columns=None``: written once at
            the merge with every key of the rows). Rows of other tables are kept in memory only.
        fmt: CSV cell formatter. ``progress``: a progress bar on rank 0. ``resume``: read the rows of an earlier run
            into :attr:`previous` (``{file name: {case: row}}``, also from a killed sharded run's rank files).
        interrupted: called with no argument on Ctrl-C in a single process (e.g. to write a summary).
    """

    def __init__(self, folder, what: str, csv=None, fmt=csv_cell, progress=True, resume=False, interrupted=None):
        self.folder, self.what = Path(folder), what
        self.csv = dict(csv or {})
        self.fmt, self.progress, self.resume, self.on_interrupt = fmt, progress, resume, interrupted
        self.default_table = next(iter(self.csv), "rows")
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.tag = f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""
        self.cases: list = []
        self.shares: list[list[int]] = [[]]
        self.sizes: list[int] = []
        self.previous: dict[str, dict[str, dict]] = {}
        self.rows: dict[str, list[dict]] = {}
        self.failures: list[dict] = []
        self._stack = contextlib.ExitStack()
        self._mine: list = []

    def __enter__(self) -> BatchRunner:
        self._stack.__enter__()
        return self

    def __exit__(self, kind, value, tb):
        with self._stack:  # the lock is released whatever happens here
            if kind is KeyboardInterrupt:
                if self.world == 1 and self.on_interrupt is not None:
                    self.on_interrupt()
                log.error(
                    "%sinterrupted after %d of %d case(s); rerun with skip_existing true to resume",
                    self.tag,
                    len({r["case"] for rs in self.rows.values() for r in rs}),
                    len(self._mine),
                )
        return False

    def part(self, table: str) -> Path:
        """Where this rank appends the rows of ``table`` (the file itself in a single process)."""
        p = self.folder / table
        return p if self.world == 1 else p.with_name(f"{Path(table).stem}.rank{self.rank}{Path(table).suffix}")

    def plan(self, list_cases: Callable[[], list]) -> list:
        """Rank 0 takes the lock, removes temporaries, calls ``list_cases()`` (objects with ``name`` and ``path``) and
        splits them; every rank gets the whole list (returned) and its share (:meth:`mine`). An error of rank 0 is
        raised on every rank."""
        plan: dict[str, Any] | None = None
        error: Exception | None = None
        if self.rank == 0:
            try:
                self._stack.enter_context(folder_lock(self.folder, self.what))  # creates the folder
                for f in clean_temporaries(self.folder):
                    log.info("removed %s, left by an interrupted earlier run", f)
                cases = list(list_cases())
                sizes = (
                    [getattr(c, "size", 0) or case_voxels(c.path) for c in cases]
                    if self.world > 1
                    else [1] * len(cases)
                )
                previous: dict[str, dict[str, dict]] = {}
                for table, columns in self.csv.items():
                    if self.resume and columns is not None:
                        stem, suf = Path(table).stem, Path(table).suffix
                        parts = (*sorted(self.folder.glob(f"{stem}.rank*{suf}")), self.folder / table)
                        previous[table] = {r["case"]: r for p in parts for r in read_csv(p) if r.get("case")}
                plan = {"cases": cases, "sizes": sizes, "shares": distributed.shard(sizes, self.world)}
                plan["previous"] = previous
            except Exception as e:  # noqa: BLE001 - told to every rank, raised below
                error, plan = e, {"error": f"{type(e).__name__}: {e}"}
        plan = distributed.broadcast_object(plan)
        if "error" in plan:
            raise error if error is not None else FvaeError(f"rank 0 could not start the run: {plan['error']}")
        self.cases, self.sizes, self.shares, self.previous = (
            plan["cases"],
            plan["sizes"],
            plan["shares"],
            plan["previous"],
        )
        self._mine = [self.cases[i] for i in self.shares[self.rank]]
        for table, columns in self.csv.items():
            if columns is not None:
                write_text_atomic(self.part(table), ",".join(columns) + "\n")
        return self.cases

    def mine(self):
        """This rank's cases, with a progress bar on rank 0."""
        bar = tqdm(
            self._mine,
            desc=self.what + (f" rank 0 of {self.world}" if self.world > 1 else ""),
            unit="case",
            disable=not self.progress or self.rank != 0,
        )
        for case in bar:
            bar.set_postfix_str(case.name)
            yield case

    @contextlib.contextmanager
    def case(self, case):
        """The context of one case: yields a :class:`CaseRecord`; an ``Exception`` is logged and recorded as the
        case's failure (its rows dropped), the batch goes on; on success its rows are kept and appended to the CSV."""
        rec = CaseRecord(self, case)
        try:
            yield rec
        except Exception as e:  # go on with the other cases, report at the end
            log.error("%s%s failed: %s", self.tag, case.name, e)
            log.debug(traceback.format_exc())
            self.failures.append(
                {"case": case.name, "input": getattr(case, "shown", case.path), "error": f"{type(e).__name__}: {e}"}
            )
            return
        for table, rows in rec.rows.items():
            self.rows.setdefault(table, []).extend(rows)
            if self.csv.get(table) is not None:
                append_csv(self.part(table), self.csv[table], rows, self.fmt)

    def gather(self) -> tuple[dict[str, list[dict]], list[dict]]:
        """Every rank's rows (``{table: rows}``) and failures, in the order of the case list, on every rank; rank 0
        writes the merged CSV files (atomically) and removes the rank files."""
        gathered = distributed.gather_objects((self.rows, self.failures))
        order = {c.name: i for i, c in enumerate(self.cases)}
        tables = dict.fromkeys([*self.csv, *(t for g in gathered for t in g[0])])
        rows = {
            t: sorted((r for g in gathered for r in g[0].get(t, ())), key=lambda r: order[r["case"]]) for t in tables
        }
        failures = sorted((f for g in gathered for f in g[1]), key=lambda f: order[f["case"]])
        if self.rank == 0:
            for table, columns in self.csv.items():
                if columns is None or self.world > 1:
                    write_csv(self.folder / table, columns, rows[table], self.fmt)
                stem, suf = Path(table).stem, Path(table).suffix
                for f in self.folder.glob(f"{stem}.rank*{suf}"):
                    f.unlink()  # merged (or left by an earlier sharded run whose cases are now in the table)
        self.rows, self.failures = rows, failures
        return rows, failures

    def ranks(self) -> list[dict] | None:
        """The share of each rank of a torchrun run (cases, voxels); ``None`` in a single process."""
        if self.world == 1:
            return None
        return [
            {"rank": r, "cases": len(s), "voxels": int(sum(self.sizes[i] for i in s))}
            for r, s in enumerate(self.shares)
        ]

    def raise_failures(self, note: str = "") -> None:
        """One :class:`BatchFailure` listing the failed cases (:func:`failure_message`), if any."""
        if self.failures:
            raise BatchFailure(failure_message(self.failures, len(self.cases), note))
