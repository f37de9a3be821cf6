"""The split hash: which images train, validate and test, and which ones a ``limit`` keeps.

Both hash file names only (the split: or a key column a source names, ``split_by``), so a file
keeps its split (and its place in a subset) wherever the data lies, whatever other files come and
go, and on every machine.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from faceage.config import SplitConfig


def unit_hash(text: str) -> float:
    """A number in [0, 1) from the SHA-1 of ``text``: the same in every run and on every machine."""
    digest = hashlib.sha1(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_key(keys: Sequence[str], cfg: SplitConfig) -> np.ndarray:
    """``train``/``val``/``test`` per key from a hash of seed and key: rows that share a key (a
    file name, or a source's ``split_by`` column such as a family) share a split."""
    out = []
    for key in keys:
        u = unit_hash(f"{cfg.seed}:{key}")
        out.append("test" if u < cfg.test else "val" if u < cfg.test + cfg.val else "train")
    return np.array(out)


def assign_split(paths: Sequence[str], cfg: SplitConfig) -> np.ndarray:
    """``train``/``val``/``test`` per file from a hash of seed and name: stable as files come."""
    return split_by_key([os.path.basename(p) for p in paths], cfg)


def stable_subset(paths: Sequence[str], limit: int) -> np.ndarray:
    """Positions, ascending, of at most ``limit`` of ``paths`` chosen by the hash of their names:
    the same files every time, spread over all ages, and mostly kept when files are added."""
    order = np.argsort([unit_hash(f"limit:{os.path.basename(p)}") for p in paths])
    return np.sort(order[:limit])
