"""The data layer's readers (UTKFace names, manifests, the format registry), the split hash, the
decode cache and the transforms."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from faceage.config import AugmentConfig, DataConfig, SplitConfig
from faceage.data.augment import BatchAugment
from faceage.data.datasets import DecodedCache, cache_size_for, eval_transform
from faceage.data.readers import (
    FORMATS,
    parse_utkface_name,
    read_dataset,
    read_manifest,
    read_utkface,
)
from faceage.data.run_data import RunData
from faceage.data.split import assign_split
from faceage.errors import UserError

# Malformed names exactly as they occur in the public UTKFace release.
REAL_MALFORMED = [
    "24_0_1_20170116220224657 .jpg.chip.jpg",  # space before the extension
    "39_1_20170116174525125.jpg.chip.jpg",  # race missing
    "55_0_0_20170116232725357jpg.chip.jpg",  # dot missing
]


@pytest.mark.parametrize("name, expected", [
    ("25_0_1_20170116174525125.jpg.chip.jpg", (25, 0, 1)),
    ("1_1_4_20161221193459128.jpg.chip.jpg", (1, 1, 4)),
    ("116_1_0_20170120134921760.jpg.chip.jpg", (116, 1, 0)),
])
def test_parse_utkface_name(name, expected):
    assert parse_utkface_name(name) == expected


@pytest.mark.parametrize("name", REAL_MALFORMED + [
    "0_0_1_20170116174525125.jpg.chip.jpg",  # age 0
    "121_0_1_20170116174525125.jpg.chip.jpg",  # beyond MAX_AGE
    "25_2_1_20170116174525125.jpg.chip.jpg",  # gender 2
    "25_0_5_20170116174525125.jpg.chip.jpg",  # race 5
    "25_0_1_20170116174525125.jpg",  # not the chip file
    "face.jpg",
])
def test_parse_utkface_name_rejects_malformed(name):
    assert parse_utkface_name(name) is None


def test_read_utkface_counts_malformed_names(tmp_path, utkface_images):
    good = utkface_images(tmp_path, 6)
    for name in REAL_MALFORMED:
        shutil.copy(good[0], tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "subdir").mkdir()
    df, report = read_utkface(tmp_path)
    assert len(df) == 6 and report.kept == 6
    assert sorted(df["path"]) == sorted(str(p) for p in good)
    assert list(df.columns) == ["path", "age", "gender", "race"]
    assert sorted(report.skipped["malformed names"]) == sorted(REAL_MALFORMED)
    summary = report.summary()
    assert "6 images" in summary and "skipped 3 malformed names" in summary


def test_missing_and_empty_data_dir_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"data directory not found: {missing}"):
        read_utkface(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"no UTKFace images found in {empty}"):
        read_utkface(empty)
    a_file = tmp_path / "file.jpg"
    a_file.write_bytes(b"x")
    with pytest.raises(UserError, match="got a file"):
        read_utkface(a_file)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_and_unreadable_images_are_skipped_and_reported_once(tmp_path, utkface_images):
    images = utkface_images(tmp_path / "faces", 12)
    _truncate(images[3])
    _truncate(images[7])
    images[9].write_bytes(b"this is not a JPEG")
    bad = sorted(str(images[i]) for i in (3, 7, 9))
    cfg = DataConfig(path=str(tmp_path / "faces"), limit=None, cache_dir=str(tmp_path / "cache"))

    data = RunData.read(cfg).decoded(cfg, input_size=32, progress=False)

    assert len(data.table) == 9
    assert not set(bad) & set(data.table["path"])
    reported = data.report.skipped["unreadable or truncated files"]
    assert sorted(reported) == bad
    summary = data.report.summary(first=2)
    assert summary.count("unreadable or truncated") == 1
    assert "skipped 3 unreadable or truncated files (" in summary
    assert summary.count(str(tmp_path)) == 2 and summary.endswith(", ...)")
    assert data.summary()["skipped"] == {"unreadable or truncated files": 3}
    # The cache remembers what could not be read: a second run reports the same, decodes nothing.
    again = RunData.read(cfg).decoded(cfg, input_size=32, progress=False)
    assert sorted(again.report.skipped["unreadable or truncated files"]) == bad
    assert again.cache.array_path == data.cache.array_path


def test_workers_get_the_drivers_table_and_reuse_its_cache(tmp_path, utkface_images):
    images = utkface_images(tmp_path / "faces", 12)
    _truncate(images[4])
    cfg = DataConfig(path=str(tmp_path / "faces"), limit=None, cache_dir=str(tmp_path / "cache"))
    data = RunData.read(cfg).decoded(cfg, input_size=32, progress=False)
    built = data.cache.meta_path.stat().st_mtime_ns

    shipped = data.ship()
    worker = RunData.from_shipped(shipped)
    assert worker.summary()["skipped"] == {"unreadable or truncated files": 1}
    pd.testing.assert_frame_equal(worker.table, data.table)
    assert worker.cache.meta_path == data.cache.meta_path  # the same cache, not decoded again
    assert data.cache.meta_path.stat().st_mtime_ns == built
    assert np.array_equal(worker.dataset("val")[0][0], data.dataset("val")[0][0])

    # A node that cannot read what the driver read stops with the files' names.
    lost = dict(shipped, cache_dir=str(tmp_path / "other-node"))
    _truncate(images[0])
    os.utime(images[0], ns=(1, 1))
    with pytest.raises(UserError, match=f"1 images that the driver read.*{images[0].name}"):
        RunData.from_shipped(lost)


def test_decoded_cache_is_rebuilt_when_a_file_changes(tmp_path, utkface_images):
    images = utkface_images(tmp_path / "faces", 3)
    paths = [str(p) for p in images]
    first = DecodedCache(paths, 24, str(tmp_path / "cache")).build(progress=False)
    assert first.valid.all() and first.array.shape == (3, 24, 24, 3)
    _truncate(images[1])
    os.utime(images[1], ns=(1, 1))
    second = DecodedCache(paths, 24, str(tmp_path / "cache")).build(progress=False)
    assert second.array_path != first.array_path
    assert second.unreadable() == [paths[1]]


def test_manifest_reader(tmp_path, utkface_images):
    images = utkface_images(tmp_path / "imgs", 5)
    rows = [
        {"path": f"imgs/{images[0].name}", "age": 31, "source": "a"},
        {"path": str(images[1]), "age": 45.5, "source": "b"},
        {"path": f"imgs/{images[3].name}", "age": 0, "source": "d"},
    ]
    csv = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    df, report = read_manifest(csv)
    assert list(df["path"]) == [str(tmp_path / "imgs" / images[0].name), str(images[1]),
                                str(tmp_path / "imgs" / images[3].name)]
    assert list(df["age"]) == [31.0, 45.5, 0.0]  # 0-120, a newborn included
    assert list(df["age_low"]) == list(df["age_high"]) == list(df["age"])  # exact: own range
    assert list(df["source"]) == ["a", "b", "d"]  # extra columns are kept
    assert list(df["gender"]) == [-1] * 3 and list(df["race"]) == [-1] * 3
    assert report.kept == 3 and not report.skipped  # a bad row is an error: tests/test_age_ranges
    # By its format name, as training and `faceage prepare` read it: csv and manifest are the
    # same reader (csv's photos are detected and cropped first, a manifest's used whole).
    for fmt in ("manifest", "csv"):
        df2, _ = read_dataset(fmt, csv)
        assert list(df2["path"]) == list(df["path"])
    assert FORMATS["csv"].detect and not FORMATS["manifest"].detect


def test_unknown_format_lists_the_registry(tmp_path):
    with pytest.raises(UserError, match="unknown data format 'fer2013'; use one of") as err:
        read_dataset("fer2013", tmp_path)
    for name, fmt in FORMATS.items():
        assert f"  {name}: {fmt.about}" in str(err.value)


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="manifest not found"):
        read_manifest(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,years\na.jpg,3\n")
    with pytest.raises(UserError, match=r"bad.csv needs columns path and age"):
        read_manifest(bad)
    useless = tmp_path / "useless.csv"
    useless.write_text("path,age\n")
    with pytest.raises(UserError, match="useless.csv lists no rows"):
        read_manifest(useless)


def test_split_is_deterministic_and_stable_when_files_are_added():
    names = [f"/data/{a}_0_0_2017{i:08d}.jpg.chip.jpg" for i, a in enumerate(range(1, 2001))]
    cfg = SplitConfig(val=0.1, test=0.15, seed=3)
    first = assign_split(names, cfg)
    assert (first == assign_split(names, cfg)).all()
    shares = {s: float(np.mean(first == s)) for s in ("train", "val", "test")}
    assert abs(shares["val"] - 0.1) < 0.03 and abs(shares["test"] - 0.15) < 0.03
    # New files (anywhere in the list) leave every old assignment alone.
    more = [f"/data/50_1_2_2018{i:08d}.jpg.chip.jpg" for i in range(500)]
    grown = assign_split(more[:250] + names + more[250:], cfg)
    assert (grown[250:250 + len(names)] == first).all()
    # Only the file name counts, not the folder it was read from.
    moved = [n.replace("/data/", "/elsewhere/") for n in names]
    assert (assign_split(moved, cfg) == first).all()
    assert (assign_split(names, SplitConfig(val=0.1, test=0.15, seed=4)) != first).any()


def test_limit_takes_a_stable_subset(tmp_path, utkface_images):
    utkface_images(tmp_path, 30)
    df, report = read_dataset("utkface", tmp_path, limit=10)
    assert len(df) == 10 and report.kept == 10 and report.available == 30
    assert "a stable subset of 30" in report.summary()
    utkface_images(tmp_path, 5, seed=1)
    df2, _ = read_dataset("utkface", tmp_path, limit=10)
    assert len(set(df["path"]) & set(df2["path"])) >= 5


def test_dataset_yields_uint8_and_eval_transform_batches_as_one_by_one(tmp_path, utkface_images):
    utkface_images(tmp_path / "faces", 20, size=56)
    cfg = DataConfig(path=str(tmp_path / "faces"), limit=None, cache_dir=str(tmp_path / "cache"))
    data = RunData.read(cfg).decoded(cfg, input_size=48, progress=False)
    ds = data.dataset("train")
    img, target = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, cache_size_for(48), cache_size_for(48))
    age = float(data.subset("train")["age"].iloc[0])
    assert target.tolist() == [age, age]  # (age_low, age_high): an exact age is its own range
    batch = torch.stack([ds[i][0] for i in range(4)])
    tf = eval_transform(48)
    one_by_one = torch.stack([tf(x) for x in batch])
    assert torch.allclose(tf(batch), one_by_one, atol=1e-6)
    assert tf(batch).shape == (4, 3, 48, 48)


def test_batch_augment_output_and_randomness():
    images = torch.randint(0, 256, (8, 3, 50, 50), dtype=torch.uint8)
    aug = BatchAugment(40, AugmentConfig())
    out = aug(images, torch.Generator().manual_seed(1))
    assert out.shape == (8, 3, 40, 40) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Values are normalised [0, 1] pixels: within ImageNet's (0 - mean)/std .. (1 - mean)/std.
    assert out.min() >= -2.2 and out.max() <= 2.7
    same = aug(images, torch.Generator().manual_seed(1))
    other = aug(images, torch.Generator().manual_seed(2))
    assert torch.equal(out, same) and not torch.equal(out, other)


def test_batch_augment_colour_maps():
    x = torch.rand(6, 3, 16, 16)
    gray = BatchAugment(16, AugmentConfig(color_jitter=0.0, grayscale=1.0)).colour(x)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    plain = BatchAugment(16, AugmentConfig(color_jitter=0.0, grayscale=0.0)).colour(x)
    assert torch.allclose(plain, x, atol=1e-6)
    jittered = BatchAugment(16, AugmentConfig(color_jitter=0.4, grayscale=0.0)).colour(x)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, x)


def test_batch_augment_without_randomness_matches_the_eval_view():
    # Flat colours survive any crop, mirror or rotation unchanged: the warp maps colour exactly.
    images = torch.zeros(4, 3, 40, 40, dtype=torch.uint8)
    for i, c in enumerate([(10, 200, 30), (250, 250, 250), (0, 0, 0), (90, 60, 180)]):
        images[i] = torch.tensor(c, dtype=torch.uint8).view(3, 1, 1)
    aug = BatchAugment(32, AugmentConfig(color_jitter=0.0, grayscale=0.0, jpeg=0.0))
    assert torch.allclose(aug(images), eval_transform(32)(images), atol=1e-5)


def _faults(**shares) -> BatchAugment:
    off = {"color_jitter": 0.0, "grayscale": 0.0, "blur": 0.0, "downscale": 0.0, "jpeg": 0.0}
    return BatchAugment(32, AugmentConfig(**{**off, **shares}))


def test_real_photo_faults_change_only_the_images_they_pick():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=gen)
    for name, fault in (("blur", "blur"), ("downscale", "downscale"), ("jpeg", "jpeg")):
        aug = _faults(**{name: 0.5})
        out = getattr(aug, fault)(x.clone(), torch.Generator().manual_seed(3))
        changed = (out - x).abs().flatten(1).amax(1) > 1e-4
        assert 16 < changed.sum() < 48, name  # about half the batch
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 + 1e-6
        # Each fault removes fine detail: the changed images lose high frequencies.
        def detail(t):
            return (t[..., 1:] - t[..., :-1]).abs().mean()
        assert detail(out[changed]) < detail(x[changed]), name
        none = getattr(_faults(), fault)(x.clone(), torch.Generator().manual_seed(3))
        assert torch.equal(none, x), name


def test_blur_keeps_flat_images_and_grey_stays_grey_through_the_faults():
    flat = torch.full((4, 3, 32, 32), 0.4)
    assert torch.allclose(_faults(blur=1.0).blur(flat.clone()), flat, atol=1e-6)
    assert torch.allclose(_faults(downscale=1.0).downscale(flat.clone()), flat, atol=1e-6)
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    grey = _faults(grayscale=1.0, blur=1.0, downscale=1.0)(images, torch.Generator()
                                                           .manual_seed(0))
    pixels = grey * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor(
        [0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)


def test_augment_settings_are_checked():
    with pytest.raises(ValueError, match="jpeg_quality"):
        AugmentConfig(jpeg_quality=(0, 50))
    with pytest.raises(ValueError, match="downscale_to"):
        AugmentConfig(downscale_to=(0.5, 1.5))
