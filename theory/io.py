r"""Reading user data for the estimators, and atomic writes.

The ``.npz`` format of ``robust-rlhf fit``: ``dphi`` (n x d float, ``phi(x, y1) - phi(x, y2)``),
``z`` (n, 1 if the first response won), ``g`` (n, ``g_hat`` that the first response wins),
``dphi_ref`` (N x d), ``g_ref`` (N); optional ``ref_row`` (N ints: ``i`` in [0, n) shares the prompt
of labelled row ``i``, ``>= n`` an unlabelled prompt shared by equal ids, ``-1`` or absent an
independent prompt) and ``ref_weight`` (N, summing to 1; default uniform). Arrays may carry a
leading replication axis R. ``g``, ``dphi_ref`` and ``g_ref`` may all be absent (MLE only).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .data import PairData
from .errors import InputError

__all__ = ["atomic_path", "load_pair_data", "NPZ_KEYS"]

NPZ_KEYS = ("dphi", "z", "g", "dphi_ref", "g_ref", "ref_row", "ref_weight")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` atomically.

    An interrupted write leaves the previous file (or none) in place, never a truncated one.
    """
    path = Path(path)
    if path.parent and not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the output folder {str(path.parent)!r}: {exc.strerror}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(f"cannot write to {str(path.parent)!r}: {exc.strerror}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual default mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def load_pair_data(path: str | Path) -> PairData:
    """Read and validate an ``.npz`` of pairwise data (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k in NPZ_KEYS}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    for key in ("dphi", "z"):
        if key not in arrays:
            raise InputError(f"{path}: missing array '{key}' (need at least dphi and z)")
    ref_keys = [k for k in ("g", "dphi_ref", "g_ref") if k in arrays]
    if ref_keys and len(ref_keys) < 3:
        missing = sorted({"g", "dphi_ref", "g_ref"} - set(ref_keys))
        raise InputError(f"{path}: '{ref_keys[0]}' is given but {', '.join(repr(m) for m in missing)} missing "
                         "(VRPO needs g, dphi_ref and g_ref together)")
    lead = arrays["dphi"].ndim == 3
    if arrays["dphi"].ndim not in (2, 3):
        raise InputError(f"{path}: 'dphi' must be n x d (or R x n x d), got shape {arrays['dphi'].shape}")

    def batch(key: str, ndim: int) -> np.ndarray | None:
        if key not in arrays:
            return None
        a = arrays[key]
        if a.ndim == ndim + 1 and lead:
            return a
        if a.ndim != ndim:
            raise InputError(f"{path}: '{key}' has shape {a.shape}; expected {ndim} axes"
                             + (" (plus the replication axis)" if lead else ""))
        return a[None]

    try:
        return PairData(
            dphi=batch("dphi", 2), z=batch("z", 1), g=batch("g", 1), dphi_ref=batch("dphi_ref", 2),
            g_ref=batch("g_ref", 1),
            ref_weight=arrays.get("ref_weight"), ref_row=arrays.get("ref_row"),
        )
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
