"""Small, direct tests of modules the feature tests use only from afar (through Ray, the CLI or
the browser), and the check that every module of faceage/ is imported or run by some test."""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import re
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def faceage_modules() -> set[str]:
    out = set()
    for path in (REPO / "faceage").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] != "__init__":  # a package's own file holds no code worth a test
            out.add(".".join(parts))
    return out


def referenced_by_tests() -> set[str]:
    """Modules the test files import, and dotted names they name in strings (a subprocess's
    ``python -m faceage.train``, a module path handed to a helper)."""
    names: set[str] = set()
    for path in (REPO / "tests").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.update(re.findall(r"faceage(?:\.\w+)+", node.value))
                if node.value == "faceage":  # ``python -m faceage`` runs faceage/__main__.py
                    names.add("faceage.__main__")
    return names


def test_every_module_of_faceage_is_imported_or_run_by_a_test():
    missing = faceage_modules() - referenced_by_tests()
    assert missing == set(), f"no test imports or runs these modules: {sorted(missing)}"


def test_python_m_faceage_is_the_cli(capsys, monkeypatch):
    """``python -m faceage`` (faceage/__main__.py) runs the ``faceage`` command (run here with
    runpy, as ``-m`` does, instead of a second interpreter)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["faceage", "--version"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("faceage", run_name="__main__", alter_sys=True)
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("faceage ")


def run(coro):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# -- serving --------------------------------------------------------------------------------------


def test_serve_args_defaults_and_strictness():
    from pydantic import ValidationError

    from faceage.serving.args import STREAM_DETECTOR_DEFAULTS, ServeArgs

    args = ServeArgs()
    assert args.max_body_bytes == 16 * 1024 * 1024 and args.max_pixels == 64_000_000
    assert args.detector.min_face_fraction == 0.03 and args.detector.decode_side == 1600
    for key, value in STREAM_DETECTOR_DEFAULTS.items():
        assert getattr(args.stream_detector, key) == value
    with pytest.raises(ValidationError, match="max_bodybytes"):
        ServeArgs(max_bodybytes=1)  # a typo is an error, not a silent default


@pytest.mark.slow
@pytest.mark.ray
def test_large_payloads_cross_by_reference(ray_local):
    """payload.py: above the inline size a value becomes a ``Stored`` reference, and unpacks to
    what was packed; small values cross as they are."""
    from faceage.serving.payload import INLINE_BYTES, Stored, pack, unpack

    crops = np.random.default_rng(0).integers(0, 255, (30, 128, 128, 3), dtype=np.uint8)
    assert crops.nbytes > INLINE_BYTES
    packed = pack(crops)
    assert isinstance(packed, Stored) and packed.nbytes == crops.nbytes
    assert np.array_equal(run(unpack(packed)), crops)
    small = b"\xff\xd8 a small photo"
    assert pack(small) is small and run(unpack(small)) is small


# -- inference ------------------------------------------------------------------------------------


def test_video_writer_keeps_even_sides_and_frames_read_back(tmp_path):
    from faceage.inference.video import (
        VideoError,
        VideoWriter,
        encoder_name,
        frame_rate,
        open_video,
        rgb_frames,
    )

    path = tmp_path / "odd.mp4"
    rng = np.random.default_rng(0)
    with VideoWriter(path, Fraction(10)) as writer:
        for _ in range(5):
            writer.write(rng.integers(0, 255, (241, 321, 3), dtype=np.uint8))
    assert writer.size == (320, 240) and writer.frames == 5 and writer.codec == encoder_name()
    with open_video(path.read_bytes(), "odd.mp4") as container:
        assert float(frame_rate(container)) == 10
        frames = list(rgb_frames(container))
    assert len(frames) == 5 and frames[0][1].shape == (240, 320, 3)
    times = [t for t, _ in frames]
    assert times == sorted(times) and times[-1] > times[0]
    with pytest.raises(VideoError, match="not a readable video"):
        open_video(b"not a video", "junk.mp4")


# -- training -------------------------------------------------------------------------------------


def test_epoch_line_names_each_source():
    from faceage.training.worker import epoch_line

    run_ = SimpleNamespace(total_epochs=9, data=SimpleNamespace(source_names=["utk", "aaf"]))
    metrics = {"train_loss": 3.2, "val_mae": 5.5, "val_mae/utk": 5.0, "val_mae/aaf": 6.0,
               "val_mae_all": 5.4, "val_rmse": 7.1, "val_cs5": 0.55, "images_per_s": 80.0,
               "data_share": 0.1, "epoch_seconds": 30.0, "lr_head": 1e-3, "lr_block6": 1e-4,
               "epoch": 2}
    line = epoch_line(run_, SimpleNamespace(name="top"), metrics)
    assert line.startswith("[faceage] epoch 3/9 [top]") and "val MAE 5.50" in line
    assert "[utk 5.00] [aaf 6.00] all 5.40" in line and "lr 1.0e-03" in line


def test_start_line_says_what_a_fresh_run_trains():
    import torch

    from faceage.config import Config
    from faceage.training.worker_setup import start_line

    run_ = SimpleNamespace(cfg=Config(), ctx=SimpleNamespace(dtype=torch.bfloat16), total_epochs=2,
                           steps=10, world=1, device=torch.device("cpu"),
                           schedule=SimpleNamespace(describe=lambda: "  stage head: 1 epoch"))
    assert start_line(run_) == ("[faceage] mobilenet_v2 @ 128px, 2 epochs x 10 steps of 64 x 1 "
                                "worker(s) on cpu, precision bfloat16\n  stage head: 1 epoch")


def test_report_summarises_exact_and_range_labels():
    from faceage.training.report import summarise

    preds = pd.DataFrame({
        "status": ["ok", "ok", "ok", "no-face"], "pred": [30.0, 52.0, 8.0, np.nan],
        "age": [34.0, 50.0, 9.5, 20.0], "gender": ["female", "male", "unknown", "male"],
        "group": ["a", "b", "a", "b"],
        # An exact age is its own range; the third face is labelled 7-12.
        "range_low": [34.0, 50.0, 7.0, 20.0], "range_high": [34.0, 50.0, 12.0, 20.0],
        "in_range": [np.nan, np.nan, 1.0, np.nan],
        "within_one_range": [np.nan, np.nan, 1.0, np.nan],
    })
    report = summarise(preds)
    assert report["images"] == 4 and report["evaluated"] == 3 and report["no_face"] == 1
    # The exact ages are off by 4 and 2, the range label is met: the nearest age is the pred.
    assert report["metrics"]["mae"] == pytest.approx(2.0)
    assert set(report["mae_by_gender"]) == {"female", "male"}  # "unknown" is left out
    assert report["range"]["accuracy"] == 1.0 and report["range_by_range"]["7-12"]["n"] == 1


def test_learning_curves_and_tune_table():
    from faceage.training.plots import learning_curves
    from faceage.training.tune.results import markdown_table

    history = [{"epoch": e, "train_loss": 5 - e, "val_mae": 8 - e, "stage": e // 2,
                "stage_name": f"s{e // 2}"} for e in range(4)]
    path = learning_curves(history, Path(pytest.importorskip("tempfile").mkdtemp()) / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    table = pd.DataFrame([{"trial": "t1", "backbone": "mobilenet_v2", "params": "lr 1",
                           "best_val_mae": 5.25, "best_epoch": 3, "epochs_run": 3,
                           "epochs_planned": 4, "time_s": 61.0, "status": "completed",
                           "images_per_s": 118.6}])
    md = markdown_table(table)
    assert md.splitlines()[0].startswith("| trial | backbone")
    assert "| t1 | mobilenet_v2 | lr 1 | 5.25 | 119 | 3 | 3/4 | 61 | completed |" in md
    # A table from before the speed column still renders.
    assert "| 5.25 | - | 3 |" in markdown_table(table.drop(columns="images_per_s"))


# -- webapp ---------------------------------------------------------------------------------------


def test_the_photo_table_rows():
    from faceage.webapp.main import face_rows

    rows = face_rows([{"age": 34.26, "age_interval": [28.0, 41.4], "score": 0.99912,
                       "box": [10.2, 20.7, 110.0, 140.5]}])
    assert rows == [{"face": 1, "age": "34.3", "interval": "(28–41)", "score": "0.999",
                     "box": "10, 21, 110, 140"}]


def test_the_interval_note_and_the_tabs_the_page_renders(monkeypatch):
    from faceage.webapp import main, serve_status
    from faceage.webapp.video_tab import VIDEO_TYPES, video_tab

    health = {"ok": True, "model": {"interval": {"coverage": 0.8}}}
    monkeypatch.setattr(serve_status, "serve_health", lambda url: health)
    assert serve_status.interval_coverage("http://serve") == "80% of faces"
    health = {"ok": False, "error": "down"}
    assert serve_status.interval_coverage("http://serve") == "most faces"
    digest = serve_status.upload_digest(b"photo")
    assert len(digest) == 12 and digest == serve_status.upload_digest(b"photo")
    assert digest != serve_status.upload_digest(b"another photo")
    assert main.video_tab is video_tab and "mp4" in VIDEO_TYPES


def test_correction_inputs_follow_what_serve_says():
    from faceage.webapp.corrections import corrections_settings, face_ids

    on = {"ok": True, "model": {"corrections": {"enabled": True, "keep_s": 3600}}}
    assert corrections_settings(on) == {"enabled": True, "keep_s": 3600}
    assert corrections_settings({"ok": True, "model": {"corrections": {"enabled": False}}}) is None
    assert corrections_settings({"ok": False, "error": "down"}) is None
    faces = [{"age": 30}, {"age": 40}]
    assert face_ids({"faces": faces, "corrections": {"face_ids": ["a", "b"]}}) == ["a", "b"]
    assert face_ids({"faces": faces, "corrections": {"face_ids": ["a"]}}) == []  # not one a face
    assert face_ids({"faces": faces}) == []
