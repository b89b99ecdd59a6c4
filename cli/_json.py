"""Strict JSON for the commands' ``--json`` output and records: a missing number (NaN, an infinity) is
``null``, numpy scalars and arrays are numbers and lists, so that every JSON parser reads the output."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``obj`` with non-finite numbers as ``null`` (``kwargs``: ``indent``, ``default``, ...)."""
    return json.dumps(_plain(obj), allow_nan=False, **kwargs)
