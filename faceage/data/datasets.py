"""The top of the data layer: the decode cache and the dataset of training. The run's table and
its cache live together in ``faceage.data.run_data.RunData``; augmentation:
``faceage.data.augment``; which images an epoch draws: ``faceage.data.sampling``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from faceage.config import DataConfig
from faceage.data.readers import LoadReport
from faceage.errors import UserError
from faceage.inference.preprocess import eval_transform

__all__ = ["eval_transform"]  # re-exported: the validation transform is the inference one


# -- decoding once -------------------------------------------------------------------------------


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode an image to RGB uint8 and resize its whole frame to ``size`` x ``size``."""
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger
        im = im.convert("RGB")
        im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(im, dtype=np.uint8)


class DecodedCache:
    """All images decoded once into a uint8 memmap (N, S, S, 3) shared by every worker on a node.

    Decoding JPEGs every epoch costs more than the model on small inputs; a cache keyed by the
    file list and size is built once (under a file lock) and reused by later runs.
    """

    def __init__(self, paths: Sequence[str], size: int, cache_dir: str | None = None):
        self.paths = list(paths)
        self.size = size
        self.cache_dir = cache_dir
        key = hashlib.sha1(f"{size}".encode())
        for p in self.paths:
            # Size and mtime in the key: a file replaced in place is decoded again.
            try:
                st = os.stat(p)
                key.update(f"\n{p}|{st.st_size}|{st.st_mtime_ns}".encode())
            except OSError:
                key.update(f"\n{p}|missing".encode())
        key = key.hexdigest()[:16]
        root = Path(cache_dir or os.path.expanduser("~/.cache/faceage/decoded"))
        root.mkdir(parents=True, exist_ok=True)
        self.array_path = root / f"{key}.u8"
        self.meta_path = root / f"{key}.json"
        self._lock_path = root / f"{key}.lock"
        self.valid: np.ndarray | None = None
        self.array: np.ndarray | None = None

    def build(self, progress: bool = True, threads: int | None = None) -> DecodedCache:
        from filelock import FileLock

        with FileLock(str(self._lock_path)):
            if not self.meta_path.exists():
                self._decode_all(progress, threads)
        meta = json.loads(self.meta_path.read_text())
        self.valid = np.array(meta["valid"], dtype=bool)
        shape = (len(self.paths), self.size, self.size, 3)
        self.array = np.memmap(self.array_path, dtype=np.uint8, mode="r", shape=shape)
        return self

    def _decode_all(self, progress: bool, threads: int | None) -> None:
        from tqdm import tqdm

        n = len(self.paths)
        tmp = self.array_path.with_suffix(".tmp")
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, self.size, self.size, 3))
        valid = np.ones(n, dtype=bool)

        def work(i: int) -> None:
            try:
                out[i] = decode_image(self.paths[i], self.size)
            except Exception:  # unreadable, truncated or missing: reported by the caller
                valid[i] = False

        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            it = pool.map(work, range(n))
            for _ in tqdm(it, total=n, desc=f"decoding images ({self.size}px)",
                          disable=not progress, mininterval=5):
                pass
        out.flush()
        os.replace(tmp, self.array_path)
        # The meta file marks the cache complete, so it is written last and atomically.
        meta_tmp = self.meta_path.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps({"size": self.size, "valid": valid.tolist()}))
        os.replace(meta_tmp, self.meta_path)

    def unreadable(self) -> list[str]:
        assert self.valid is not None
        return [p for p, ok in zip(self.paths, self.valid, strict=True) if not ok]


# -- transforms (the eval transform is faceage.inference.preprocess's, in every model file) -----


def cache_size_for(input_size: int) -> int:
    """Images are cached a little larger than the input, so random crops keep detail."""
    return int(round(input_size * 1.25))


class FaceAgeDataset(torch.utils.data.Dataset):
    """Rows of a cached array with their age labels: uint8 CHW images (or through
    ``transform``) and the target ``(age_low, age_high)``, both the age for an exact one.

    ``ages``: (N,) exact ages or (N, 2) ranges. Training leaves ``transform`` unset and
    transforms whole batches (``BatchAugment``, ``eval_transform``), which is much cheaper than
    one image at a time.
    """

    def __init__(self, cache: DecodedCache, indices: np.ndarray, ages: np.ndarray,
                 transform=None):
        self.cache = cache
        self.indices = np.asarray(indices)
        ages = np.asarray(ages, dtype=np.float32)
        self.ages = np.stack([ages, ages], axis=1) if ages.ndim == 1 else ages
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img = torch.from_numpy(np.array(self.cache.array[self.indices[i]])).permute(2, 0, 1)
        if self.transform is not None:
            img = self.transform(img)
        return img, torch.tensor(self.ages[i])


def decode_table(df: pd.DataFrame, report: LoadReport, cfg: DataConfig, input_size: int,
                 progress: bool = True) -> tuple[pd.DataFrame, DecodedCache]:
    """Decode-cache the images of a split table: the table of the readable ones (with their
    ``cache_index``) and the cache; unreadable ones are dropped and reported."""
    df = df.copy()
    cache = DecodedCache(df["path"].tolist(), cache_size_for(input_size), cfg.cache_dir)
    cache.build(progress=progress)
    df["cache_index"] = np.arange(len(df))
    assert cache.valid is not None
    for path in cache.unreadable():
        report.skip("unreadable or truncated files", path)
    df = df[cache.valid].reset_index(drop=True)
    report.kept = len(df)
    where = cfg.sources[0].path if len(cfg.sources) == 1 else "data.sources"
    if df.empty:
        raise UserError(f"none of the images in {where} could be read")
    if (df["split"] == "train").sum() == 0:
        raise UserError(f"no images fell into the training split of {where}; add more data")
    return df, cache
