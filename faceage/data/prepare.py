"""``faceage prepare``: detect and align every face of a labelled data set in parallel (Ray Data).

Writes ``OUT/crops/...`` (one aligned crop per image: its largest face), ``OUT/index.csv`` (one row
per source image, faceless and unreadable ones included with an empty ``crop_path``; a CSV's
other columns, such as a ``family`` to split by, after ``INDEX_COLUMNS``) and
``OUT/prepare.json`` (the crop policy and detector settings, which training copies into the
model file). The index's last column, ``source_digest``, is a digest of each source file's bytes:
a copy of the data with new modification times still finds its prepared crops. Train on it
with ``faceage train --set data.format=prepared data.path=OUT``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from faceage.data.readers import (
    FORMATS,
    GENDER_CODES,
    UTKFACE_RACES,
    LoadReport,
    gender_name,
    read_dataset,
)
from faceage.errors import UserError
from faceage.inference.alignment import CropPolicy
from faceage.inference.detection import DetectorConfig

INDEX_COLUMNS = ["source_path", "crop_path", "age", "age_low", "age_high", "gender", "race",
                 "group", "status", "faces", "score", "x1", "y1", "x2", "y2", "error"]
# What each index row copies from its source row (``group``: "" when it has none).
LABEL_COLUMNS = ("source_path", "age", "age_low", "age_high", "gender", "race")
DEFAULT_CROP_SIZE = 200  # the UTKFace chip size; training resizes from here
DIGEST_COLUMN = "source_digest"


def file_digest(path: str | os.PathLike) -> str | None:
    """A digest of a file's bytes (None when it cannot be read): what a prepared crop was cut
    from, independent of the file's modification time (a copy or a re-download keeps it)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "blake2b").hexdigest()[:32]
    except OSError:
        return None


def crop_name(source: str, root: Path) -> str:
    """The crop's path under ``crops/``: the source's path below the data root, as a JPEG.

    Keeping the file name keeps the hash-based train/val/test split of the source data.
    """
    src = Path(source)
    try:
        rel = src.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(src.name)
    name = str(rel)
    return name if name.lower().endswith((".jpg", ".jpeg")) else name + ".jpg"


class DetectAlignCrops:
    """A Ray Data actor: decodes, detects, aligns and writes the crop of each row's image."""

    def __init__(self, out_dir: str, root: str, policy: dict, size: int, detector: dict,
                 no_face: str = "skip", threads: int = 1, extra_columns: tuple[str, ...] = ()):
        import torch

        from faceage.inference.pipeline import FaceFinder

        torch.set_num_threads(threads)
        self.out_dir = Path(out_dir)
        self.root = Path(root)
        self.finder = FaceFinder(policy, size, detector, no_face)
        self.extra_columns = list(extra_columns)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from PIL import Image

        from faceage.errors import ImageError
        from faceage.inference.images import load_image

        rows = []
        for rec in batch.to_dict("records"):
            row: dict[str, Any] = {c: rec.get(c) for c in (*LABEL_COLUMNS, *self.extra_columns)}
            row["group"] = rec.get("group") or ""
            # Empty strings, not None: every block then has the same Arrow schema.
            row.update(crop_path="", status="ok", faces=0, score=np.nan, x1=np.nan,
                       y1=np.nan, x2=np.nan, y2=np.nan, error="")
            try:
                image = load_image(rec["source_path"])
                faces = self.finder.find(image)
            except ImageError as exc:
                row.update(status="unreadable", error=str(exc))
                rows.append(row)
                continue
            row["faces"] = len(faces)
            if not faces:
                row["status"] = "no-face"
                rows.append(row)
                continue
            face = faces[0]
            name = crop_name(rec["source_path"], self.root)
            target = self.out_dir / "crops" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(face.crop).save(target, quality=95)
            x1, y1, x2, y2 = (float(v) for v in face.box)
            row.update(crop_path=f"crops/{name}", score=float(face.score), x1=x1, y1=y1, x2=x2,
                       y2=y2)
            rows.append(row)
        return pd.DataFrame(rows, columns=INDEX_COLUMNS + self.extra_columns)


def _prepare_on_ray(table: pd.DataFrame, actor_kwargs: dict, batch_size: int,
                    workers: int | None) -> tuple[pd.DataFrame, int]:
    import ray

    from faceage.runtime import start_ray

    if not ray.is_initialized():
        # $RAY_ADDRESS joins that cluster; without it a new local instance (retried on a slow
        # start), never another one found on the machine.
        start_ray(os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
                  include_dashboard=False)
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Enough blocks that every actor stays busy and progress moves steadily.
    blocks = max(1, min(len(table) // batch_size, workers * 8))
    bounds = np.linspace(0, len(table), blocks + 1).astype(int)
    ds = ray.data.from_pandas([table.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:],
                                                               strict=True)])
    ds = ds.map_batches(DetectAlignCrops, fn_constructor_kwargs=actor_kwargs,
                        batch_size=batch_size, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    return ds.to_pandas(), workers


def _prepare_here(table: pd.DataFrame, actor_kwargs: dict, batch_size: int) -> pd.DataFrame:
    from tqdm import tqdm

    work = DetectAlignCrops(**actor_kwargs, threads=max(1, (os.cpu_count() or 1) // 2))
    parts = []
    with tqdm(total=len(table), desc="preparing", unit="img", file=sys.stderr) as bar:
        for start in range(0, len(table), batch_size):
            parts.append(work(table.iloc[start:start + batch_size]))
            bar.update(len(parts[-1]))
    return pd.concat(parts, ignore_index=True)


def run_prepare(data: str, fmt: str, out: str, *, limit: int | None = None,
                size: int = DEFAULT_CROP_SIZE, policy: CropPolicy | None = None,
                detector: DetectorConfig | None = None, workers: int | None = None,
                no_face: str = "skip", batch_size: int = 16,
                local: bool = False) -> dict[str, Any]:
    """Prepare ``data`` into ``out`` with Ray Data (or in this process); returns a summary."""
    df, load_report = read_dataset(fmt, data, limit)
    # Codes in the index (0 male, 1 female, -1 unknown), whatever words the source uses.
    df["gender"] = [GENDER_CODES.get(gender_name(g), -1) for g in df["gender"]]
    if "race" not in df.columns:
        df["race"] = -1
    if "group" not in df.columns:
        races = pd.to_numeric(df["race"], errors="coerce").fillna(-1).astype(int)
        df["group"] = [UTKFACE_RACES.get(r, "") for r in races]
    df["group"] = df["group"].fillna("").astype(str)
    root = Path(data).expanduser().resolve()
    root = root if root.is_dir() else root.parent
    table = df.rename(columns={"path": "source_path"})[[*LABEL_COLUMNS, "group"]]
    table["source_path"] = [str(Path(p).resolve()) for p in table["source_path"]]
    # A CSV's other columns (a family to split by, notes) go into the index as text, so a
    # prepared source keeps them.
    for col in (c for c in df.columns if c not in INDEX_COLUMNS and c != "path"):
        table[col] = df[col].where(df[col].notna(), "").astype(str)
    source = {"path": str(Path(data).expanduser().resolve()), "format": fmt, "limit": limit}
    return prepare_table(table, root, out, source=source, size=size, policy=policy,
                         detector=detector, workers=workers, no_face=no_face,
                         batch_size=batch_size, local=local, load_report=load_report)


def prepare_detector(**settings: Any) -> DetectorConfig:
    """The detector training crops are prepared with: every face from ``min_face_size`` up,
    whatever the photo's size (no ``min_face_fraction``), one pass (no ``mirror``), as prepare
    always ran: training flips half its images anyway."""
    return DetectorConfig(**{"min_face_fraction": 0.0, "mirror": False, **settings})


def detector_metadata(detector: DetectorConfig) -> dict:
    """A detector's settings as prepare records them, its part of the cache key: without
    ``decode_side``, which prepare does not use (it reads every file whole), ``engine`` (torch
    or ONNX Runtime find the same faces) and ``mirror`` when off, so sets prepared before those
    settings existed are still found and reused."""
    exclude = {"decode_side", "engine"} | ({"mirror"} if not detector.mirror else set())
    return detector.model_dump(mode="json", exclude=exclude)


def prepare_table(table: pd.DataFrame, root: Path, out: str | Path, *, source: dict,
                  size: int = DEFAULT_CROP_SIZE, policy: CropPolicy | None = None,
                  detector: DetectorConfig | None = None, workers: int | None = None,
                  no_face: str = "skip", batch_size: int = 16, local: bool = False,
                  load_report: LoadReport | None = None) -> dict[str, Any]:
    """Prepare the rows of ``table`` (``LABEL_COLUMNS`` and ``group``, then any other columns,
    which the index keeps after ``INDEX_COLUMNS``) into ``out``: the one prepare path of
    ``faceage prepare`` and of training's raw AAF/CSV sources."""
    policy = policy or CropPolicy()
    detector = detector or prepare_detector()
    out_dir = Path(out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = {k: len(v) for k, v in load_report.skipped.items()} if load_report else {}
    extras = [c for c in table.columns if c not in INDEX_COLUMNS]

    actor_kwargs = {"out_dir": str(out_dir), "root": str(root), "policy": policy.to_metadata(),
                    "size": size, "detector": detector_metadata(detector),
                    "no_face": no_face, "extra_columns": tuple(extras)}
    started = time.perf_counter()
    if local:
        index, workers = _prepare_here(table, actor_kwargs, batch_size), 1
    else:
        index, workers = _prepare_on_ray(table, actor_kwargs, batch_size, workers)
    index = index.sort_values("source_path").reset_index(drop=True)
    seconds = time.perf_counter() - started
    index = index[INDEX_COLUMNS + [c for c in extras if c != DIGEST_COLUMN]]
    index[DIGEST_COLUMN] = [file_digest(p) or "" for p in index["source_path"]]
    index.to_csv(out_dir / "index.csv", index=False)
    counts = index["status"].value_counts().to_dict()
    summary = {
        "images": int(len(index)),
        "with_face": int(counts.get("ok", 0)),
        "no_face": int(counts.get("no-face", 0)),
        "unreadable": int(counts.get("unreadable", 0)),
        "several_faces": int((index["faces"] > 1).sum()),
        "skipped_when_reading": skipped,
        "seconds": round(seconds, 1),
        "images_per_second": round(len(index) / max(seconds, 1e-9), 1),
        "workers": workers,
    }
    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "crop_policy": policy.to_metadata(),
        "crop_size": size,
        "detector": detector_metadata(detector),
        "no_face": no_face,
        "summary": summary,
    }
    (out_dir / "prepare.json").write_text(json.dumps(meta, indent=2))
    return {**summary, "out": str(out_dir)}


def run_prepare_command(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    if args.size < 32:
        raise UserError(f"--size {args.size}: crops need at least 32 pixels")
    policy = CropPolicy(margin=args.margin)
    detector = prepare_detector(min_face_size=args.min_face_size, pad=args.pad)
    s = run_prepare(args.data, args.format, args.out, limit=args.limit, size=args.size,
                    policy=policy, detector=detector, workers=args.workers,
                    no_face=args.no_face, local=args.local)
    print(f"\nprepared {s['images']} images in {s['seconds']:.0f}s "
          f"({s['images_per_second']:.1f}/s, {s['workers']} worker(s)): "
          f"{s['with_face']} with a face, {s['no_face']} without, {s['unreadable']} unreadable, "
          f"{s['several_faces']} with several faces (largest kept)", file=out)
    print(f"index:  {Path(s['out']) / 'index.csv'}\ntrain:  faceage train --set "
          f"data.format=prepared data.path={s['out']}", file=out)
    return 0


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="UTKFace or AAF folder, or CSV manifest (path,age[,gender,group]; "
                        "age_low,age_high for a row labelled by an age range)")
    p.add_argument("--format", choices=[n for n, f in FORMATS.items() if not f.prepared],
                   default="utkface", help="csv and manifest are the same CSV reader")
    p.add_argument("--out", required=True, help="output folder for crops/, index.csv, "
                                                "prepare.json")
    p.add_argument("--limit", type=int, help="prepare a stable subset of this many images")
    p.add_argument("--size", type=int, default=DEFAULT_CROP_SIZE, help="crop side in pixels")
    p.add_argument("--margin", type=float, default=0.0,
                   help="widen the UTKFace-chip framing by this fraction per side")
    p.add_argument("--min-face-size", type=int, default=20, help="smallest face in pixels")
    p.add_argument("--pad", choices=("auto", "always", "never"), default="auto",
                   help="pad images before detecting: always suits pre-cropped data like UTKFace "
                        "(a face filling the frame), saving auto's first pass")
    p.add_argument("--no-face", choices=("skip", "whole"), default="skip",
                   help="images without a detected face: list them (skip) or use the whole "
                        "image (whole, for pre-cropped data)")
    p.add_argument("--workers", type=int, help="detector actors (default: one per CPU)")
    p.add_argument("--local", action="store_true",
                   help="run in this process without Ray (small sets, debugging)")
