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
from faceage.data.datasets import PreparedData, decode_table, open_shipped, shippable
from faceage.data.readers import LoadReport
from faceage.data.sources import (
    SourceSpec,
    prepare_raw_sources,
    prepared_crop_policy,
    range_rows,
    read_sources,
    source_counts,
)

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
    ``cache_index``, and ``images`` is their decode cache.
    """

    sources: list[SourceSpec]
    table: pd.DataFrame
    report: LoadReport  # what was skipped, and why
    crop_policy: dict  # how the training images are framed; inference crops faces the same way
    images: PreparedData | None = None

    @classmethod
    def read(cls, data: DataConfig) -> RunData:
        """Resolve, read, limit and split ``data``'s sources; no image is opened."""
        table, report, sources = read_sources(data)
        return cls(sources, table, report, prepared_crop_policy(data) or UTKFACE_CHIP_POLICY)

    def decoded(self, data: DataConfig, input_size: int, progress: bool = True) -> RunData:
        """This data with photo sources on their aligned crops (prepared once and cached; with
        Ray up, by Ray Data) and every image decode-cached (the cache is shared per node)."""
        table = prepare_raw_sources(self.table, data, self.report)
        images = decode_table(table, self.report, data, input_size, progress)
        return replace(self, table=images.table, images=images)

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
        """Counts, the training ages' mean and spread, and what was skipped (decoded only)."""
        if self.images is None:
            raise RuntimeError("RunData.summary() needs the decoded data (RunData.decoded)")
        return self.images.summary()

    def describe_sources(self, counts: dict[str, dict[str, int]] | None = None) -> list[dict]:
        """Each source's settings (name, format, path, ...) with its image counts."""
        counts = self.counts() if counts is None else counts
        return [{**s.describe(), **counts.get(s.name, {})} for s in self.sources]

    def ship(self) -> dict:
        """What a worker needs, to put in the object store once: the decoded table, the decode
        cache's key, the sources and the load report (small: the skipped files' names)."""
        if self.images is None:
            raise RuntimeError("RunData.ship() needs the decoded data (RunData.decoded)")
        return {"images": shippable(self.images), "sources": self.sources,
                "report": self.report, "crop_policy": self.crop_policy}

    @classmethod
    def from_shipped(cls, shipped: dict, progress: bool = False) -> RunData:
        """The driver's ``RunData`` on a worker, with the decode cache for exactly its files
        (reused where the driver built it, built on another node)."""
        images = replace(open_shipped(shipped["images"], progress), report=shipped["report"])
        return cls(shipped["sources"], images.table, shipped["report"], shipped["crop_policy"],
                   images)
