"""The top of the data layer: the decode cache, the datasets of training, and the decoded table a
run trains on (``PreparedData``). Augmentation: ``faceage.data.augment``; which images an epoch
draws: ``faceage.data.sampling``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from faceage.config import DataConfig
from faceage.data.readers import LoadReport
from faceage.data.sources import prepare_raw_sources, range_rows, read_sources, source_counts
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


@dataclass
class PreparedData:
    """The table of images with their split, the decoded cache, and what was skipped."""

    table: pd.DataFrame  # faceage.data.sources.TABLE_COLUMNS and cache_index
    cache: DecodedCache
    report: LoadReport

    def subset(self, split: str) -> pd.DataFrame:
        return self.table[self.table["split"] == split]

    def summary(self) -> dict:
        counts = self.table["split"].value_counts().to_dict()
        train = self.subset("train")
        return {
            "images": int(len(self.table)),
            "train": int(counts.get("train", 0)),
            "val": int(counts.get("val", 0)),
            "test": int(counts.get("test", 0)),
            "train_age_mean": float(train["age"].mean()) if len(train) else None,
            "train_age_std": float(train["age"].std()) if len(train) > 1 else None,
            "skipped": {k: len(v) for k, v in self.report.skipped.items()},
            # Images labelled by an age range (their age above is the range's middle).
            **({"ranges": n} if (n := int(range_rows(self.table).sum())) else {}),
            **({"sources": source_counts(self.table)} if "source" in self.table.columns
               else {}),
        }


def decode_table(df: pd.DataFrame, report: LoadReport, cfg: DataConfig, input_size: int,
                 progress: bool = True) -> PreparedData:
    """Decode-cache the images of a split table; unreadable ones are dropped and reported."""
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
    return PreparedData(df, cache, report)


def prepare_data(cfg: DataConfig, input_size: int, progress: bool = True) -> PreparedData:
    """Read, split, prepare (sources of photos) and decode-cache a run's sources, as the driver
    does; faceless and unreadable images are dropped and reported."""
    table, report, _ = read_sources(cfg)
    table = prepare_raw_sources(table, cfg, report)
    return decode_table(table, report, cfg, input_size, progress)


def shippable(data: PreparedData) -> dict:
    """What a worker needs to use ``data`` without reading the folder again: the table, the
    cache's file list (its key) and the summary (with what the driver skipped)."""
    return {"table": data.table, "cache_paths": data.cache.paths, "cache_size": data.cache.size,
            "cache_dir": data.cache.cache_dir, "summary": data.summary()}


def open_shipped(shipped: dict, progress: bool = False) -> PreparedData:
    """The driver's table on a worker, with the decode cache for exactly its files (reused
    where the driver built it, built on another node)."""
    cache = DecodedCache(shipped["cache_paths"], shipped["cache_size"], shipped["cache_dir"])
    cache.build(progress=progress)
    assert cache.valid is not None
    table = shipped["table"]
    lost = table.loc[~cache.valid[table["cache_index"].to_numpy()], "path"].tolist()
    if lost:
        raise UserError(f"{len(lost)} images that the driver read cannot be read on this "
                        f"worker's node ({', '.join(lost[:3])}); check that every node sees "
                        "the data at the same paths")
    return PreparedData(table, cache, LoadReport(kept=len(table)))


def make_dataset(data: PreparedData, split: str, transform=None) -> FaceAgeDataset:
    """The images of ``split`` with their age ranges (exact ages: low == high) as targets."""
    rows = data.subset(split)
    ranges = rows[["age_low", "age_high"]] if "age_low" in rows.columns else rows[["age", "age"]]
    return FaceAgeDataset(data.cache, rows["cache_index"].to_numpy(), ranges.to_numpy(),
                          transform)
