"""configs/train.yaml and configs/multi.yaml split the shared data exactly as before issue 19.

The reference (tests/fixtures/split_reference.json) was computed with the code before the data layer
was rebuilt. It covers the table the driver writes to split.csv (path, age, split, source,
gender, group) as the sources are read, before prepare and decoding: those only drop rows (AAF
photos without a face, unreadable files) and point the AAF rows at their crops, and they need
MTCNN and the images themselves. So that the hash is the same on every machine, ``path`` is the
file's path relative to its source's folder (for these flat folders: the file name).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from faceage.config import load_config
from faceage.data.run_data import RunData

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
REFERENCE = REPO / "tests" / "fixtures" / "split_reference.json"
SPLIT_COLUMNS = ["path", "age", "split", "source", "gender", "group"]


def split_table(config: Path, sources: set[str] | None = None) -> pd.DataFrame:
    """What the driver writes to split.csv for ``config``'s sources (``RunData.split_table``),
    paths relative to their source's folder; only ``sources`` (the reference's: a source added
    to a config later, e.g. KFAD with its range columns, must not move the others' splits)."""
    cfg = load_config(config).with_absolute_paths(REPO)
    data = RunData.read(cfg.data)
    folders = {s.name: s.path for s in data.sources}
    table = data.split_table()
    assert list(table.columns)[:len(SPLIT_COLUMNS)] == SPLIT_COLUMNS
    if sources is not None:
        table = table[table["source"].isin(sources)].reset_index(drop=True)
    table = table[SPLIT_COLUMNS]
    rel = [os.path.relpath(p, folders[s]) for p, s in zip(table["path"], table["source"],
                                                          strict=True)]
    return table.assign(path=rel)


def csv_sha256(table: pd.DataFrame) -> str:
    text = io.StringIO()
    table.to_csv(text, index=False, lineterminator="\n")
    return hashlib.sha256(text.getvalue().encode()).hexdigest()


@pytest.mark.skipif(not (SHARED_DATA / "utkface").is_dir() or not (SHARED_DATA / "aaf").is_dir(),
                    reason=f"the shipped configs' data (UTKFace, AAF) is not under {SHARED_DATA}")
@pytest.mark.parametrize("name", ["train", "multi"])
def test_shipped_configs_split_as_before(name):
    expected = json.loads(REFERENCE.read_text())[name]
    sources = {key.split("/")[0] for key in expected["counts"]}
    table = split_table(REPO / "configs" / f"{name}.yaml", sources)
    counts = {f"{source}/{split}": int(n)
              for (source, split), n in table.groupby(["source", "split"]).size().items()}
    assert counts == expected["counts"]  # says where it differs, when it does
    assert len(table) == expected["rows"]
    assert csv_sha256(table) == expected["sha256"]
