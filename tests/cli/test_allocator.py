"""The commands' glibc allocator settings (``cli/_allocator.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")

# Fills and frees three 4 MB arrays 20 times and reports the minor page faults it took: one fault per 4 kB
# page each time when freed blocks go back to the kernel, about one pass's worth when they are kept.
_PROBE = """
import json, os, resource, sys
import numpy as np
from robust_rlhf.cli._allocator import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a, b, c = np.empty(500_000), np.empty(500_000), np.empty(500_000)
    a.fill(1.0), b.fill(1.0), c.fill(1.0)
    del a, b, c
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults": faults,
                  "env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}}))
"""


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def test_tuned_allocator_reuses_freed_blocks_and_passes_settings_to_children() -> None:
    from robust_rlhf.cli._allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

    plain, tuned = _probe("plain"), _probe("tune")
    pages = 3 * 500_000 * 8 // 4096
    assert plain["faults"] >= 10 * pages  # each fresh block faulted in again
    assert tuned["tuned"] is True
    assert tuned["faults"] <= 3 * pages  # the first block's pages, then reuse
    assert tuned["env"] == {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
                            "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def test_users_allocator_settings_are_kept() -> None:
    out = _probe("tune", MALLOC_MMAP_THRESHOLD_="65536")
    assert out["env"]["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert out["env"]["MALLOC_TRIM_THRESHOLD_"] is not None


def test_only_the_array_commands_tune_the_allocator() -> None:
    """``simulate`` (an array command) sets the thresholds; ``data-check`` (an LLM data command) leaves
    glibc's defaults."""
    from robust_rlhf.cli.main import ARRAY_COMMANDS, SUBCOMMANDS

    assert ARRAY_COMMANDS <= set(SUBCOMMANDS)
    probe = ("import os, sys\n"
             "from robust_rlhf.cli.main import main\n"
             "main(sys.argv[1:])\n"
             "print('tuned' if 'MALLOC_TRIM_THRESHOLD_' in os.environ else 'default')\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for args, want in ((["simulate", "--list"], "tuned"), (["data-check", "/nonexistent.jsonl"], "default")):
        out = subprocess.run([sys.executable, "-c", probe, *args], env=clean, capture_output=True, text=True)
        assert out.stdout.splitlines()[-1] == want, (args, out.stdout, out.stderr)
