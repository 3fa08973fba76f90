"""Peak resident memory of a block of code in this process, for the bench scripts' child processes."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """Context manager sampling this process's resident memory every ``interval`` s: ``before`` (bytes at entry) and
    ``peak`` (the largest sample, bytes). compare-vaes measures whole child processes instead (``wait4``); the bench
    children need the peak of the reconstruction alone, after the model is loaded."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.before, self.peak, self._run = interval, 0, 0, False
        self.proc = psutil.Process()

    def _loop(self) -> None:
        while self._run:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = self.proc.memory_info().rss
        self._run = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._run = False
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
