"""Helpers shared by the benchmark scripts: machine load and sampled peak resident memory."""

from __future__ import annotations

import os
import threading
import time

# On a machine shared with other busy processes, OpenMP threads that spin while waiting for a
# descheduled sibling make torch's small parallel operations up to 20 times slower (measured: a fit
# took 30 s with 2 spinning threads, 1.8 s with 1 thread, 0.9 s with 2 passive ones). Waiting
# passively costs little when the machine is idle. Set before torch is imported; an explicit value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (the benchmarks run on shared machines: print them)."""
    return [round(x, 2) for x in os.getloadavg()]


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory above the level at ``start()``, sampled every 5 ms in a thread."""

    def start(self) -> "PeakMemory":
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak - self.base

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def above_base(self) -> int:
        return self.peak - self.base
