r"""Reading user data for the estimators, and atomic writes.

The ``.npz`` format of ``robust-rlhf fit``: ``dphi`` (n x d float, ``phi(x, y1) - phi(x, y2)``),
``z`` (n, 1 if the first response won), ``g`` (n, ``g_hat`` that the first response wins),
``dphi_ref`` (N x d), ``g_ref`` (N); optional ``ref_row`` (N ints: ``i`` in [0, n) shares the prompt
of labelled row ``i``, ``>= n`` an unlabelled prompt shared by equal ids, ``-1`` or absent an
independent prompt) and ``ref_weight`` (N, summing to 1; default uniform). Arrays may carry a
leading replication axis R. ``g``, ``dphi_ref`` and ``g_ref`` may all be absent (MLE only), and ``g``
with ``g_ref`` alone (cross-fitted VRPO learns ``g_hat`` from the labelled pairs: it needs ``dphi_ref`` only).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .data import PairData
from .errors import InputError

__all__ = ["atomic_path", "load_callable", "load_pair_data", "NPZ_KEYS", "EXTRA_KEYS"]

# read once, at import: reading the umask means setting it, which would race with other threads' file creation
_UMASK = os.umask(0)
os.umask(_UMASK)

NPZ_KEYS = ("dphi", "z", "g", "dphi_ref", "g_ref", "ref_row", "ref_weight")
#: arrays that ``simulate.save`` writes beside the format's (provenance; ignored by ``load_pair_data``)
EXTRA_KEYS = ("x", "y", "g_star", "ref_y", "ref_g_star", "metadata")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` atomically.

    An interrupted write leaves the previous file (or none) in place, never a truncated one. A path
    that cannot be written (a folder, a read-only place, a full disk) raises ``InputError``.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {str(path)!r}: it is a folder")
    if path.parent and not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the output folder {str(path.parent)!r}: "
                             f"{exc.strerror or exc}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(f"cannot write to {str(path.parent)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual default mode
    try:
        try:
            yield tmp_path
            os.replace(tmp_path, path)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and exc.filename not in (str(tmp_path), str(path)):
                raise  # a file the body reads is missing: not a write error
            raise InputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def load_pair_data(path: str | Path) -> PairData:
    """Read and validate an ``.npz`` of pairwise data (see the module docstring).

    Besides ``PairData``'s checks, arrays outside the format are ignored with a warning (a misspelt
    ``ref_rows`` would otherwise silently drop the prompt structure). Whether ``dphi`` identifies
    ``theta`` (rank ``d``) is checked by ``fit``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an .npz file")
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    if path.suffix.lower() in (".parquet", ".csv", ".json", ".jsonl"):
        raise InputError(f"{path}: pairwise data are read from an .npz archive of arrays, not a {path.suffix} file "
                         "(`robust-rlhf simulate --out FILE.npz` writes one)")
    try:
        with open(path, "rb") as fh:  # our handle: numpy leaves its own open when a damaged archive fails to load
            loaded = np.load(fh, allow_pickle=False)
            archive = isinstance(loaded, np.lib.npyio.NpzFile)
            if archive:
                with loaded as npz:
                    arrays = {k: npz[k] for k in npz.files if k in NPZ_KEYS}
                    unknown = sorted(set(npz.files) - set(NPZ_KEYS) - set(EXTRA_KEYS))
    except Exception as exc:  # noqa: BLE001  a damaged archive fails in zipfile, zlib, numpy's header parser, ...
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if not archive:
        raise InputError(f"{path}: holds a single array, not an .npz archive of named arrays "
                         f"({', '.join(NPZ_KEYS)}); write it with numpy.savez(path, dphi=..., z=...)")
    if unknown:
        warnings.warn(f"{path}: ignoring array(s) {', '.join(repr(u) for u in unknown)}, which are not part of the "
                      f"format ({', '.join(NPZ_KEYS)})", UserWarning, stacklevel=2)
    for key in ("dphi", "z"):
        if key not in arrays:
            raise InputError(f"{path}: missing array '{key}' (need at least dphi and z)")
    ref_keys = [k for k in ("g", "dphi_ref", "g_ref") if k in arrays]
    if ref_keys and ref_keys != ["dphi_ref"] and len(ref_keys) < 3:
        missing = sorted({"g", "dphi_ref", "g_ref"} - set(ref_keys))
        raise InputError(f"{path}: '{ref_keys[0]}' is given but {', '.join(repr(m) for m in missing)} missing "
                         "(VRPO needs g, dphi_ref and g_ref together; cross-fitted VRPO needs dphi_ref alone)")
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


def load_callable(target: str, name: str = "", factory: bool = False) -> Any:
    """The callable named ``module:attr`` or ``path.py:attr`` (``attr`` may be dotted), imported with the
    current directory on ``sys.path``; with ``factory`` the result of calling it with no arguments.
    ``name`` (the option or field that gave ``target``) starts every error message."""
    where = f"{name}: " if name else ""

    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{where}{target!r}: expected MODULE:FUNCTION (or path/to/file.py:FUNCTION)")
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise InputError(f"{where}{str(path)!r}: file not found")
            # registered under a name of its own while it runs (dataclasses look their module up there), never
            # under a bare stem that could shadow an installed module
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            unique = f"robust_rlhf_user_{path.stem}_{digest}"
            spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[unique] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(unique, None)
                raise
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{where}cannot import {module_name!r}: {exc}") from None
    except SyntaxError as exc:
        raise InputError(f"{where}cannot import {module_name!r}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except InputError:
        raise
    except Exception as exc:  # the module itself fails while it is imported: the user's input, not a check
        raise InputError(f"{where}cannot import {module_name!r}: {type(exc).__name__} while importing it: {exc}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{where}{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if factory:
        try:
            obj = obj()
        except TypeError as exc:
            raise InputError(f"{where}--factory: calling {attr} with no arguments failed ({exc})") from None
    if not callable(obj):
        raise InputError(f"{where}{target!r} is a {type(obj).__name__}, not a callable")
    return obj
