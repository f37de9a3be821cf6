"""Sources of photos (AAF, CSV, ...) prepared once: ``faceage prepare``'s code (MTCNN and the
crop policy) turns them into aligned crops, cached under a key of their files, the crop policy,
the crop size and the detector settings; later runs reuse them, also when the files were copied
(their bytes are compared)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from filelock import FileLock

from faceage.config import DataConfig
from faceage.data.prepare import (
    DEFAULT_CROP_SIZE,
    DIGEST_COLUMN,
    detector_metadata,
    file_digest,
    prepare_detector,
    prepare_table,
)
from faceage.data.readers import GENDER_CODES, LoadReport
from faceage.data.sources import SourceSpec, resolve_sources
from faceage.errors import UserError
from faceage.inference.alignment import CropPolicy


def prepared_root(data: DataConfig) -> Path:
    return Path(data.prepared_dir or os.path.expanduser("~/.cache/faceage/prepared"))


def prepare_key(origins: Sequence[str], policy: dict, size: int, detector: dict) -> str:
    """A key of the files (path, size, mtime), the crop policy, the crop size and the detector."""
    key = hashlib.sha1(json.dumps([policy, size, detector], sort_keys=True).encode())
    for p in sorted(origins):
        try:
            st = os.stat(p)
            key.update(f"\n{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            key.update(f"\n{p}|missing".encode())
    return key.hexdigest()[:16]


def find_covering_prepare(root: Path, fmt: str, origins: Sequence[str], policy: dict, size: int,
                          detector: dict) -> Path | None:
    """A finished prepared set of this format, crop policy, size and detector that holds every
    one of ``origins`` as they are now; None when there is none. It may hold more (a run on a
    subset, such as a ``limit``, reuses a full prepare instead of detecting the faces again), and
    the files may have new modification times with the same bytes (a copy, a re-download): its
    index's digests are compared with the files'. A set written before the index had digests
    counts when it is newer than each file."""
    wanted = set(origins)
    policy, detector = json.loads(json.dumps(policy)), json.loads(json.dumps(detector))
    digests: dict[str, str | None] | None = None  # of the wanted files, read once when needed
    newest: float | None = None
    for meta_path in sorted(root.glob(f"{fmt}-*/prepare.json")):
        try:
            meta = json.loads(meta_path.read_text())
            if (meta.get("crop_policy") != policy or meta.get("crop_size") != size
                    or meta.get("detector") != detector):
                continue
            index = pd.read_csv(meta_path.parent / "index.csv", keep_default_na=False,
                                usecols=lambda c: c in ("source_path", DIGEST_COLUMN))
            recorded = dict(zip((os.path.realpath(p) for p in index["source_path"]),
                                index.get(DIGEST_COLUMN, [""] * len(index)), strict=True))
            if not wanted <= recorded.keys():
                continue
            if DIGEST_COLUMN in index.columns:
                if digests is None:
                    digests = {p: file_digest(p) for p in wanted}
                if all(digests[p] is not None and digests[p] == recorded[p] for p in wanted):
                    return meta_path.parent
                continue
            if newest is None:
                newest = max(os.stat(p).st_mtime for p in wanted)
            if meta_path.stat().st_mtime >= newest:
                return meta_path.parent
        except (OSError, ValueError):
            continue
    return None


def prepare_source(spec: SourceSpec, rows: pd.DataFrame, data: DataConfig,
                   report: LoadReport, *, local: bool | None = None,
                   say=print) -> pd.DataFrame:
    """``rows`` of a source of photos with ``path`` pointing at their aligned crops, prepared
    with ``faceage prepare``'s Ray Data code the first time and reused after; images without a
    face (or unreadable) are left out and counted in ``report``.

    Only the crops come from the cache: every label (age, age range, gender, group) and the
    split stay ``rows``' own, read from the source now. So the key holds the image files and the
    crop settings but no labels, and a cache written before a label changed, or before age
    ranges existed (its index has no age_low/age_high), is reused with today's labels."""
    policy, detector = CropPolicy(), prepare_detector()
    policy_meta, detector_meta = policy.to_metadata(), detector_metadata(detector)
    origins = rows["origin"].tolist()
    key = prepare_key(origins, policy_meta, DEFAULT_CROP_SIZE, detector_meta)
    root = prepared_root(data)
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{spec.format}-{key}"
    with FileLock(str(root / f"{spec.format}-{key}.lock")):
        covering = None if (out / "prepare.json").is_file() else find_covering_prepare(
            root, spec.format, origins, policy_meta, DEFAULT_CROP_SIZE, detector_meta)
        if covering is not None:
            out = covering
            say(f"[faceage] {spec.name}: reusing {len(rows)} images' crops from the prepared "
                f"set in {out} (the same files, by their bytes)")
        elif (out / "prepare.json").is_file():
            say(f"[faceage] {spec.name}: reusing the prepared crops in {out}")
        else:
            if local is None:
                import ray

                # Inside an actor (a Tune trial) the trial holds the CPUs Ray Data's actors
                # would wait for: prepare in this process instead.
                local = (not ray.is_initialized()
                         or ray.get_runtime_context().get_actor_id() is not None)
            say(f"[faceage] {spec.name}: preparing {len(rows)} images once (MTCNN + crop "
                f"policy {policy.name}) into {out}")
            table = pd.DataFrame({
                "source_path": origins, "age": rows["age"].to_numpy(),
                "age_low": rows["age_low"].to_numpy(), "age_high": rows["age_high"].to_numpy(),
                "gender": [GENDER_CODES.get(g, -1) for g in rows["gender"]],
                "race": -1, "group": rows["group"].to_numpy()})
            src_dir = Path(spec.path).expanduser().resolve()
            summary = prepare_table(
                table, src_dir if src_dir.is_dir() else src_dir.parent, out,
                source={"path": str(src_dir), "format": spec.format, "limit": spec.limit},
                policy=policy, detector=detector, local=local)
            say(f"[faceage] {spec.name}: prepared {summary['images']} images in "
                f"{summary['seconds']:.0f}s ({summary['images_per_second']:.1f}/s): "
                f"{summary['with_face']} with a face, {summary['no_face']} without, "
                f"{summary['unreadable']} unreadable")
    return crops_of(spec, rows, out, report)


def crops_of(spec: SourceSpec, rows: pd.DataFrame, out: Path,
             report: LoadReport) -> pd.DataFrame:
    """``rows`` on their crops in the prepared set ``out``; the images without one (no face,
    unreadable, missing from its index) are left out and counted in ``report``."""
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    crops = {}
    for src, crop, status in zip(index["source_path"], index["crop_path"], index["status"],
                                 strict=True):
        crops[os.path.realpath(src)] = (str(out / crop) if crop else None, status)
    paths, keep = [], []
    for origin in rows["origin"]:
        crop, status = crops.get(origin, (None, "missing from the prepared index"))
        if crop is None:
            why = {"no-face": "images without a detected face",
                   "unreadable": "unreadable images"}.get(status, status)
            report.skip(f"{spec.name}: {why}", origin)
        paths.append(crop)
        keep.append(crop is not None)
    prepared = rows.assign(path=paths)[keep]
    if prepared.empty:
        raise UserError(f"{spec.label()}: no face was found in any of its {len(rows)} images; "
                        "check that they are face photos")
    return prepared


def prepare_raw_sources(table: pd.DataFrame, data: DataConfig, report: LoadReport,
                        say=print) -> pd.DataFrame:
    """The table with the rows of every source of photos on their (cached) aligned crops."""
    parts = []
    for spec in resolve_sources(data):
        rows = table[table["source"] == spec.name]
        parts.append(prepare_source(spec, rows, data, report, say=say)
                     if spec.needs_prepare else rows)
    out = pd.concat(parts, ignore_index=True)
    report.kept = len(out)
    return out


def prepared_crop_policy(data: DataConfig) -> dict | None:
    """The crop policy of the run's prepared sources (None: UTKFace chips alone)."""
    for spec in resolve_sources(data):
        if spec.needs_prepare:
            return CropPolicy().to_metadata()
        if spec.prepared:
            idx = Path(spec.path)
            meta_path = (idx if idx.is_dir() else idx.parent) / "prepare.json"
            if meta_path.is_file():
                return json.loads(meta_path.read_text())["crop_policy"]
    return None

