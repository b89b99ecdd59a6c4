"""On-disk cache of built artefacts (tokenizers, pre-trained reference models), keyed by a config hash.

A folder ``<root>/<kind>-<hash>`` is built once in a temporary sibling and renamed into place, so an
interrupted build never leaves a half-written entry and concurrent builders agree on one winner.
The root is ``$ROBUST_RLHF_CACHE`` or ``~/.cache/robust_rlhf`` unless given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robust_rlhf.theory.errors import InputError

__all__ = ["default_cache_dir", "config_hash", "cached_folder"]


def default_cache_dir() -> Path:
    """``$ROBUST_RLHF_CACHE`` if set, else ``~/.cache/robust_rlhf``."""
    env = os.environ.get("ROBUST_RLHF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "robust_rlhf"


def config_hash(obj: Any) -> str:
    """SHA-256 (first 16 hex digits) of ``obj`` as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_folder(root: str | os.PathLike[str], kind: str, key: Any, build: Callable[[Path], None]) -> Path:
    """``<root>/<kind>-<config_hash(key)>``, calling ``build(tmp_folder)`` first if it does not exist.

    ``key.json`` in the folder records what the hash was taken of.
    """
    root = Path(root)
    final = root / f"{kind}-{config_hash(key)}"
    if (final / "key.json").exists():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the cache folder {str(root)!r}: {exc.strerror}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
    try:
        build(tmp)
        (tmp / "key.json").write_text(json.dumps(key, sort_keys=True, indent=1, default=str))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "key.json").exists():  # not another builder's finished copy: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
