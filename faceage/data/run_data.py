"""A training run's data, read once on the driver: ``RunData``.

The driver reads, splits and checks the sources before Ray starts (``RunData.read``), prepares
and decodes them once Ray is up (``RunData.decoded``), writes ``split.csv`` from the result and
ships it to the workers through the object store (``ship`` / ``RunData.from_shipped``). Export
and evaluation take the same object: nothing downstream resolves the sources from the config
again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from faceage.config import DataConfig
from faceage.data.datasets import DecodedCache, FaceAgeDataset, decode_table
from faceage.data.prepared_sources import prepare_raw_sources, prepared_crop_policy
from faceage.data.readers import LoadReport
from faceage.data.sources import SourceSpec, range_rows, read_sources, source_counts
from faceage.errors import UserError

# UTKFace's own chips: what a model trained on them alone expects at inference.
UTKFACE_CHIP_POLICY = {"name": "utkface-chip"}
# split.csv's columns; a run with age ranges adds RANGE_SPLIT_COLUMNS at the end.
SPLIT_COLUMNS = ["path", "age", "split", "source", "gender", "group"]
RANGE_SPLIT_COLUMNS = ["age_low", "age_high"]


@dataclass
class RunData:
    """The sources of a run and the table of their images, each with its split.

    ``table`` has ``faceage.data.sources.TABLE_COLUMNS`` (path, age, age_low, age_high, gender,
    group, source, origin, split); once ``decoded`` it holds exactly the images that train
    (faceless and unreadable ones dropped, ``path`` on the aligned crops of photo sources) plus
    ``cache_index``, their row in ``cache``, the decoded images.
    """

    sources: list[SourceSpec]
    table: pd.DataFrame
    report: LoadReport  # what was skipped, and why
    crop_policy: dict  # how the training images are framed; inference crops faces the same way
    cache: DecodedCache | None = None  # the decoded images, once ``decoded``

    @classmethod
    def read(cls, data: DataConfig) -> RunData:
        """Resolve, read, limit and split ``data``'s sources; no image is opened."""
        table, report, sources = read_sources(data)
        return cls(sources, table, report, prepared_crop_policy(data) or UTKFACE_CHIP_POLICY)

    def decoded(self, data: DataConfig, input_size: int, progress: bool = True) -> RunData:
        """This data with photo sources on their aligned crops (prepared once and cached; with
        Ray up, by Ray Data) and every image decode-cached (the cache is shared per node)."""
        table = prepare_raw_sources(self.table, data, self.report)
        table, cache = decode_table(table, self.report, data, input_size, progress)
        return replace(self, table=table, cache=cache)

    def dataset(self, split: str, transform=None) -> FaceAgeDataset:
        """The decoded images of ``split`` with their age ranges (exact ages: low == high) as
        targets."""
        if self.cache is None:
            raise RuntimeError("RunData.dataset() needs the decoded data (RunData.decoded)")
        rows = self.subset(split)
        return FaceAgeDataset(self.cache, rows["cache_index"].to_numpy(),
                              rows[["age_low", "age_high"]].to_numpy(), transform)

    def subset(self, split: str) -> pd.DataFrame:
        return self.table[self.table["split"] == split]

    @property
    def has_ranges(self) -> bool:
        """Whether some image is labelled by an age range rather than one age."""
        return bool(range_rows(self.table).any())

    def split_table(self) -> pd.DataFrame:
        """What ``split.csv`` holds: ``SPLIT_COLUMNS``, and the age range of each image at the
        end when some image has one (a run of exact ages writes the file it always did)."""
        return self.table[SPLIT_COLUMNS + (RANGE_SPLIT_COLUMNS if self.has_ranges else [])]

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def source_weights(self) -> dict[str, float]:
        return {s.name: s.weight for s in self.sources}

    def source_column(self, split: str) -> np.ndarray:
        """The source name of each image of ``split``, in table order."""
        return self.subset(split)["source"].to_numpy()

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split of each source."""
        return source_counts(self.table)

    def summary(self) -> dict:
        """Counts, the training ages' mean and spread, and what was skipped."""
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
            "sources": source_counts(self.table),
        }

    def describe_sources(self, counts: dict[str, dict[str, int]] | None = None) -> list[dict]:
        """Each source's settings (name, format, path, ...) with its image counts."""
        counts = self.counts() if counts is None else counts
        return [{**s.describe(), **counts.get(s.name, {})} for s in self.sources]

    def ship(self) -> dict:
        """What a worker needs, to put in the object store once: the decoded table, the decode
        cache's key (its files, size and folder), the sources and the load report (small: the
        skipped files' names)."""
        if self.cache is None:
            raise RuntimeError("RunData.ship() needs the decoded data (RunData.decoded)")
        return {"table": self.table, "cache_paths": self.cache.paths,
                "cache_size": self.cache.size, "cache_dir": self.cache.cache_dir,
                "sources": self.sources, "report": self.report, "crop_policy": self.crop_policy}

    @classmethod
    def from_shipped(cls, shipped: dict, progress: bool = False) -> RunData:
        """The driver's ``RunData`` on a worker, with the decode cache for exactly its files
        (reused where the driver built it, built on another node)."""
        cache = DecodedCache(shipped["cache_paths"], shipped["cache_size"], shipped["cache_dir"])
        cache.build(progress=progress)
        assert cache.valid is not None
        table = shipped["table"]
        lost = table.loc[~cache.valid[table["cache_index"].to_numpy()], "path"].tolist()
        if lost:
            raise UserError(f"{len(lost)} images that the driver read cannot be read on this "
                            f"worker's node ({', '.join(lost[:3])}); check that every node sees "
                            "the data at the same paths")
        return cls(shipped["sources"], table, shipped["report"], shipped["crop_policy"], cache)
