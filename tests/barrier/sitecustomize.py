"""A deterministic kill barrier for the tests that interrupt a real batch run.

Put this folder first on ``PYTHONPATH`` of the child process (:func:`tests.conftest.barrier_env`) and set
``FVAE_TEST_BLOCK_AFTER=N`` and ``FVAE_TEST_BARRIER_DIR=<folder>``: each process lets its first ``N`` cases of a
:class:`fvae_ct.batch.BatchRunner` run, and on entering case ``N + 1`` writes ``<folder>/blocked.<pid>`` and sleeps
until it is signalled. A test waits for that file and then interrupts the run, so the interruption lands between
cases ``N`` and ``N + 1`` whatever the machine's load (no polling race on a fast or slow case).
"""

import os

if os.environ.get("FVAE_TEST_BLOCK_AFTER"):
    import contextlib
    import time
    from pathlib import Path

    from fvae_ct import batch

    _limit = int(os.environ["FVAE_TEST_BLOCK_AFTER"])
    _folder = Path(os.environ["FVAE_TEST_BARRIER_DIR"])
    _entered = [0]
    _real_case = batch.BatchRunner.case

    @contextlib.contextmanager
    def _case(self, case):
        _entered[0] += 1
        if _entered[0] > _limit:
            (_folder / f"blocked.{os.getpid()}").write_text(case.name)
            while True:  # until SIGINT (KeyboardInterrupt, raised here inside the run) or SIGKILL
                time.sleep(3600)
        with _real_case(self, case) as rec:
            yield rec

    batch.BatchRunner.case = _case
