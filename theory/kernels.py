r"""The compiled logistic kernel of the fitting engine: build, cache, load and call.

``logistic_kernel.cpp`` evaluates, for every replication ``r`` at once,

.. math::
    L_r = \sum_i a_{ri}\,\mathrm{softplus}(u_{ri}) - b_{ri} u_{ri},\quad
    \nabla L_r = \sum_i (a_{ri}\sigma(u_{ri}) - b_{ri}) x_{ri},\quad
    \nabla^2 L_r = \sum_i a_{ri}\sigma(u_{ri})\sigma(-u_{ri})\, x_{ri} x_{ri}^\top

with ``u_ri = x_ri . theta_r``, in one pass over the pairs (margins, transcendental functions, gradient
and the Hessian's distinct entries fused), which batched BLAS products cannot do. Every logistic VR
objective has this form (``fitting._logistic_coefficients``).

The kernel is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``) for this
machine's processor and cached under ``$ROBUST_RLHF_KERNEL_DIR`` (default
``~/.cache/robust-rlhf/kernels``), keyed by the source, the flags and the processor. Without a compiler
(or with ``ROBUST_RLHF_KERNELS=0``) ``available()`` is False and the engine uses its torch path, which
gives the same numbers to rounding; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "logistic_eval", "unavailable_reason"]

_LOG = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("logistic_kernel.cpp")
# -ffast-math lets the compiler call glibc's vector exp/log1p; it is given to the compile step only, so
# the shared object does not link crtfastmath (which would flush denormals in the whole process).
_COMPILE = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17"]
_LINK = ["-shared", "-fopenmp"]
_VERSION = 1

_lock = threading.Lock()
_state: dict[str, object] = {}


def _processor() -> str:
    """What ``-march=native`` depends on: the processor's feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("ROBUST_RLHF_KERNEL_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "robust-rlhf" / "kernels"


def _build(cxx: str) -> Path:
    """Compile the kernel into the cache (atomically: a finished file or none) and return its path."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_COMPILE + _LINK).encode(), cxx.encode(),
                                     _processor().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"logistic_kernel-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        for cmd in ([cxx, *_COMPILE, "-c", str(_SOURCE), "-o", str(obj)], [cxx, *_LINK, str(obj), "-o", str(lib)]):
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if run.returncode:
                raise RuntimeError(f"`{' '.join(cmd)}` failed: {run.stderr.strip()[-2000:]}")
        os.replace(lib, target)
    return target


def _load() -> ctypes.CDLL | None:
    if os.environ.get("ROBUST_RLHF_KERNELS", "1") == "0":
        _state["reason"] = "disabled by ROBUST_RLHF_KERNELS=0"
        return None
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        _state["reason"] = f"no C++ compiler ({cxx!r} not found; set CXX)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
        if lib.rr_kernel_version() != _VERSION:
            raise RuntimeError(f"kernel version {lib.rr_kernel_version()} != {_VERSION}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _state["reason"] = f"could not build or load {_SOURCE.name}: {exc}"
        return None
    fn = lib.rr_logistic_eval
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, ptr]
    fn.restype = None
    return lib


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib = _load()
                if lib is None:
                    _LOG.warning("compiled logistic kernel unavailable (%s): the fitting engine uses its "
                                 "slower torch path", _state["reason"])
                _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the compiled kernel is built and loaded (building it on the first call)."""
    return _lib() is not None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True)."""
    return None if available() else str(_state["reason"])


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def logistic_eval(Xt: Tensor, a: Tensor, b: Tensor, theta: Tensor, mode: int = 2,
                  out: tuple[Tensor, Tensor | None, Tensor | None] | None = None,
                  margins: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(L, grad L, Hessian of L)`` of the module docstring, for ``Xt`` (R, d, P) the transposed
    features, ``a``, ``b`` (R, P) and ``theta`` (R, d), all contiguous float64.

    ``mode`` 0: value only (gradient and Hessian None); 1: and the gradient; 2: and the Hessian. With
    ``out`` the results are added to those tensors (of the same shapes). ``margins`` (R, P), if given,
    receives ``u``.
    """
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"compiled logistic kernel unavailable: {_state['reason']}")
    R, d, P = Xt.shape
    for name, t, shape in (("Xt", Xt, (R, d, P)), ("a", a, (R, P)), ("b", b, (R, P)), ("theta", theta, (R, d)),
                           ("margins", margins, (R, P))):
        if t is not None and (t.dtype != torch.float64 or not t.is_contiguous() or tuple(t.shape) != shape
                              or t.device.type != "cpu"):
            raise ValueError(f"logistic_eval: {name} must be a contiguous float64 CPU tensor of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if out is None:
        value = torch.empty(R, dtype=torch.float64)
        grad = torch.empty(R, d, dtype=torch.float64) if mode >= 1 else None
        hess = torch.empty(R, d, d, dtype=torch.float64) if mode >= 2 else None
    else:
        value, grad, hess = out
    lib.rr_logistic_eval(R, P, d, _ptr(Xt), _ptr(a), _ptr(b), _ptr(theta), mode, int(out is not None),
                         torch.get_num_threads(), _ptr(value), _ptr(grad), _ptr(hess), _ptr(margins))
    return value, grad, hess
