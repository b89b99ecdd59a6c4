"""Helpers shared by the benchmark scripts: machine load and sampled peak memory."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from typing import Any

import numpy as np

# OpenMP's wait policy is left to the environment, as users run the engine: libgomp's default lets a
# thread spin briefly before it sleeps, which is what makes torch's many small parallel operations cheap
# (the fitting engine took 2.2 x longer with OMP_WAIT_POLICY=PASSIVE, measured 2026-11-23). On a machine
# where other processes compete for the cores, spinning threads can slow every operation instead: the
# scripts print the load average and warn when it is high (``load_before_timing``); time them on an
# idle machine, or set OMP_WAIT_POLICY=PASSIVE and say so.


def load_before_timing() -> list[float]:
    """``load_average()``, with a warning on stderr when the 1-minute load exceeds half the cores."""
    load = load_average()
    cpus = os.cpu_count() or 1
    if load[0] > 0.5 * cpus:
        print(f"warning: load average {load[0]} on {cpus} cores before timing: other processes compete for the "
              "cores, the figures will be slow and noisy", file=sys.stderr)
    return load


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (the benchmarks run on shared machines: print them)."""
    return [round(x, 2) for x in os.getloadavg()]


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


_MALLINFO2 = _mallinfo2()


def heap_bytes() -> int | None:
    """Bytes the C allocator has handed out and not taken back (glibc ``mallinfo2``: in-use arena
    chunks plus mmapped blocks), the CPU counterpart of ``torch.cuda.memory_allocated``; None when
    glibc's ``mallinfo2`` is unavailable. torch and numpy allocate their CPU arrays with it.

    Unlike the resident set size it falls when memory is freed, so a process that ran something
    bigger before does not hide a later peak (freed pages the allocator keeps stay resident)."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return int(m.uordblks + m.hblkhd)


class PeakMemory:
    """Peak memory above the level at ``start()``, sampled every ``interval`` seconds in a thread.

    ``above_base``: peak of ``heap_bytes()`` above its value at ``start()`` (allocated memory; the
    resident set size where mallinfo2 is missing); ``rss_above_base``: the same for the resident set
    size (an underestimate when the allocator reuses pages freed before ``start()``). A peak shorter
    than the interval can be missed."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval

    def _heap(self) -> int:
        h = heap_bytes()
        return rss_bytes() if h is None else h

    def start(self) -> "PeakMemory":
        self.base, self.rss_base = self._heap(), rss_bytes()
        self.peak, self.rss_peak = self.base, self.rss_base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self.peak = max(self.peak, self._heap())
        self.rss_peak = max(self.rss_peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.above_base

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def above_base(self) -> int:
        return self.peak - self.base

    @property
    def rss_above_base(self) -> int:
        return self.rss_peak - self.rss_base


def first_reps(data: Any, k: int) -> Any:
    """The first ``k`` replications of a ``PairData`` (a copy): a warm-up fit's data."""
    from dataclasses import replace

    cut = lambda a: None if a is None else np.ascontiguousarray(a[:k])  # noqa: E731
    return replace(data, dphi=cut(data.dphi), z=cut(data.z), g=cut(data.g), dphi_ref=cut(data.dphi_ref),
                   g_ref=cut(data.g_ref), ref_weight=cut(data.ref_weight), features=cut(data.features),
                   features_ref=cut(data.features_ref))
