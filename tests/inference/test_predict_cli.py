"""`faceage predict` and `faceage evaluate` end to end, with a real (untrained) model file."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from faceage.cli import main
from faceage.inference.modelfile import DEFAULT_MODEL_PATH

UTKFACE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "utkface"

FACE_KEYS = {"box", "score", "age", "age_interval", "landmarks"}


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut_path, rocket_path) -> Path:
    """A folder of good and bad inputs, named so they sort in a known order."""
    d = tmp_path_factory.mktemp("photos")
    shutil.copy(astronaut_path, d / "a_astronaut.jpg")
    shutil.copy(rocket_path, d / "b_rocket.jpg")
    (d / "c_empty.jpg").write_bytes(b"")
    (d / "d_text.jpg").write_text("not a photo\n")
    data = astronaut_path.read_bytes()
    (d / "e_truncated.jpg").write_bytes(data[: len(data) // 2])
    _bomb_png(d / "f_bomb.png")
    return d


@pytest.fixture(scope="module")
def crowd_path(tmp_path_factory, astronaut_path) -> Path:
    """Thirty copies of the astronaut's face on one picture."""
    src = np.asarray(Image.open(astronaut_path).convert("RGB"))
    face = np.asarray(Image.fromarray(src[40:200, 160:290]).resize((80, 98)))
    canvas = np.full((5 * 110, 6 * 100, 3), 235, np.uint8)
    for r in range(5):
        for c in range(6):
            canvas[r * 110 + 6: r * 110 + 104, c * 100 + 10: c * 100 + 90] = face
    path = tmp_path_factory.mktemp("crowd") / "crowd.png"
    Image.fromarray(canvas).save(path)
    return path


def test_predict_json_for_one_photo(capsys, untrained_model_file, astronaut_path):
    code, out, _ = _run(capsys, "predict", astronaut_path, "--model", untrained_model_file,
                        "--json")
    assert code == 0
    [line] = _json_lines(out)
    assert set(line) == {"path", "faces", "error"}
    assert line["path"] == str(astronaut_path) and line["error"] is None
    [face] = line["faces"]
    assert set(face) == FACE_KEYS
    assert np.allclose(face["box"], [181, 62, 268, 172], atol=10)
    assert len(face["landmarks"]) == 5 and isinstance(face["age"], float)
    low, high = face["age_interval"]
    assert 0 <= low <= face["age"] <= high


def test_predict_coverage_sets_the_interval(capsys, untrained_model_file, astronaut_path):
    widths = []
    for coverage in ("0.5", "0.95"):
        code, out, _ = _run(capsys, "predict", astronaut_path, "--model", untrained_model_file,
                            "--json", "--coverage", coverage)
        assert code == 0
        [face] = _json_lines(out)[0]["faces"]
        widths.append(face["age_interval"][1] - face["age_interval"][0])
    assert 0 < widths[0] < widths[1]
    with pytest.raises(SystemExit):
        main(["predict", str(astronaut_path), "--coverage", "1.5"])
    assert "at most 0.99" in capsys.readouterr().err


def test_predict_human_output(capsys, untrained_model_file, astronaut_path):
    code, out, _ = _run(capsys, "predict", astronaut_path, "--model", untrained_model_file)
    assert code == 0
    assert "face 1/1" in out and "age" in out
    assert re.search(r"age \d+\.\d \(\d+-\d+\)", out)


def test_every_bad_input_gets_a_line_and_processing_goes_on(capsys, untrained_model_file,
                                                            photos):
    code, out, err = _run(capsys, "predict", photos, "--model", untrained_model_file, "--json")
    assert code == 2  # some inputs failed
    lines = _json_lines(out)
    assert [Path(x["path"]).name for x in lines] == [
        "a_astronaut.jpg", "b_rocket.jpg", "c_empty.jpg", "d_text.jpg", "e_truncated.jpg",
        "f_bomb.png"]
    by_name = {Path(x["path"]).name: x for x in lines}
    assert len(by_name["a_astronaut.jpg"]["faces"]) == 1
    assert by_name["b_rocket.jpg"] == {"path": str(photos / "b_rocket.jpg"), "faces": [],
                                       "error": None}  # no face is a result, not an error
    assert "empty" in by_name["c_empty.jpg"]["error"]
    assert "not an image" in by_name["d_text.jpg"]["error"]
    assert "truncated" in by_name["e_truncated.jpg"]["error"]
    assert "pixels" in by_name["f_bomb.png"]["error"]
    for name in ("c_empty.jpg", "d_text.jpg", "e_truncated.jpg", "f_bomb.png"):
        assert by_name[name]["faces"] == []
        assert f"error: {photos / name}" in err


def test_missing_path_and_empty_folder(capsys, untrained_model_file, tmp_path):
    code, out, err = _run(capsys, "predict", tmp_path / "nope.jpg", "--model",
                          untrained_model_file, "--json")
    assert code == 2
    assert "cannot read" in _json_lines(out)[0]["error"]
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "predict", tmp_path / "empty", "--model", untrained_model_file)
    assert code == 2 and "holds no images" in err


def test_thirty_faces(capsys, untrained_model_file, crowd_path):
    code, out, _ = _run(capsys, "predict", crowd_path, "--model", untrained_model_file, "--json")
    assert code == 0
    assert len(_json_lines(out)[0]["faces"]) == 30


def test_no_face_whole_and_tta(capsys, untrained_model_file, rocket_path, astronaut_path):
    code, out, _ = _run(capsys, "predict", rocket_path, "--model", untrained_model_file, "--json",
                        "--no-face", "whole")
    assert code == 0
    [face] = _json_lines(out)[0]["faces"]
    assert face["score"] == 0.0 and face["landmarks"] == []
    code, out, _ = _run(capsys, "predict", astronaut_path, "--model", untrained_model_file,
                        "--json", "--tta")
    assert code == 0 and len(_json_lines(out)[0]["faces"]) == 1


def test_annotated_output(capsys, untrained_model_file, astronaut_path, photos, tmp_path):
    target = tmp_path / "annotated.jpg"
    code, _, _ = _run(capsys, "predict", astronaut_path, "--model", untrained_model_file,
                      "--output", target)
    assert code == 0
    drawn = np.asarray(Image.open(target).convert("RGB"))
    assert drawn.shape == (512, 512, 3)
    original = np.asarray(Image.open(astronaut_path).convert("RGB"))
    assert np.abs(drawn.astype(int) - original.astype(int)).max() > 100  # something was drawn
    folder = tmp_path / "many"
    code, _, _ = _run(capsys, "predict", photos / "a_astronaut.jpg", photos / "b_rocket.jpg",
                      "--model", untrained_model_file, "--output", folder)
    assert code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["a_astronaut.annotated.jpg",
                                                        "b_rocket.annotated.jpg"]
    code, _, err = _run(capsys, "predict", photos / "a_astronaut.jpg", photos / "b_rocket.jpg",
                        "--model", untrained_model_file, "--output", tmp_path / "x.jpg")
    assert code == 2 and "must be a folder" in err


def test_model_errors(capsys, astronaut_path, tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a model")
    code, _, err = _run(capsys, "predict", astronaut_path, "--model", bogus)
    assert code == 2 and "not a faceage model file" in err
    if not DEFAULT_MODEL_PATH.exists():
        code, _, err = _run(capsys, "predict", astronaut_path)
        assert code == 2 and "default model" in err


@pytest.mark.slow
def test_video(capsys, untrained_model_file, astronaut_path, tmp_path):
    import av

    src = np.asarray(Image.open(astronaut_path).convert("RGB").resize((320, 320)))
    video = tmp_path / "in.mp4"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(8):
            frame = np.ascontiguousarray(src[i * 4: i * 4 + 240])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    target = tmp_path / "out.mp4"
    code, out, err = _run(capsys, "predict", "--video", video, "--output", target, "--model",
                          untrained_model_file, "--json")
    assert code == 0
    lines = _json_lines(out)
    assert [x["frame"] for x in lines] == list(range(8))
    assert all(len(x["faces"]) == 1 for x in lines)
    for x in lines:
        low, high = x["faces"][0]["age_interval"]
        assert 0 <= low <= x["faces"][0]["age"] <= high
    assert "8 frames" in err
    with av.open(str(target)) as written:
        frames = list(written.decode(video=0))
    assert len(frames) == 8 and frames[0].width == 320 and frames[0].height == 240
    code, _, err = _run(capsys, "predict", "--video", tmp_path / "nope.mp4", "--output", target,
                        "--model", untrained_model_file)
    assert code == 2 and "video not found" in err
    (tmp_path / "junk.mp4").write_text("junk")
    code, _, err = _run(capsys, "predict", "--video", tmp_path / "junk.mp4", "--output", target,
                        "--model", untrained_model_file)
    assert code == 2 and "not a readable video" in err


# -- evaluate ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_manifest(capsys, untrained_model_file, photos, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,age\n{photos / 'a_astronaut.jpg'},40\n{photos / 'b_rocket.jpg'},30\n"
                        f"{photos / 'd_text.jpg'},20\n")
    report = tmp_path / "out" / "report.json"
    code, out, _ = _run(capsys, "evaluate", "--data", manifest, "--format", "manifest", "--detect",
                        "--model", untrained_model_file, "--json", "--report", report)
    assert code == 0
    r = json.loads(out)
    assert r == json.loads(report.read_text())
    assert (r["images"], r["evaluated"], r["no_face"], r["unreadable"]) == (3, 1, 1, 1)
    assert set(r["metrics"]) >= {"mae", "rmse", "cs5"} and r["mae_by_decade"]["40-49"]["n"] == 1
    assert r["interval_calibration"]["coverage"] == 0.8
    assert r["interval_calibration"]["method"] == "laplace-from-val-mae"
    assert r["interval"]["n"] == 1 and 0 <= r["interval"]["coverage"] <= 1
    assert r["interval"]["mean_width"] > 0 and r["interval_by_decade"]["40-49"]["n"] == 1
    assert report.with_suffix(".png").stat().st_size > 1000
    assert len(report.with_suffix(".csv").read_text().splitlines()) == 4
    rows = pd.read_csv(report.with_suffix(".csv"))
    ok = rows[rows["status"] == "ok"]
    assert ((ok["age_low"] <= ok["pred"]) & (ok["pred"] <= ok["age_high"])).all()
    code, out, _ = _run(capsys, "evaluate", "--data", manifest, "--format", "manifest",
                        "--model", untrained_model_file, "--report", report)
    assert code == 0
    assert "MAE" in out and "RMSE" in out and "CS@5" in out and "decade" in out
    assert "age interval (80%" in out and "covered" in out
    assert json.loads(report.read_text())["evaluated"] == 2  # whole images: the rocket counts


def test_evaluate_bad_data(capsys, untrained_model_file, tmp_path):
    code, _, err = _run(capsys, "evaluate", "--data", tmp_path / "none", "--model",
                        untrained_model_file)
    assert code == 2 and "not found" in err


@pytest.mark.skipif(not UTKFACE.is_dir(), reason=f"UTKFace not present at {UTKFACE}")
def test_evaluate_utkface_chips(capsys, untrained_model_file, tmp_path):
    code, out, _ = _run(capsys, "evaluate", "--data", UTKFACE, "--limit", "12", "--model",
                        untrained_model_file, "--report", tmp_path / "r.json")
    assert code == 0 and "MAE" in out
    assert json.loads((tmp_path / "r.json").read_text())["evaluated"] == 12


@pytest.mark.slow
def test_evaluate_breaks_errors_down_by_utkface_labels(capsys, untrained_model_file, tiny_utkface,
                                                       tmp_path):
    report = tmp_path / "utk.json"
    code, out, _ = _run(capsys, "evaluate", "--data", tiny_utkface, "--model",
                        untrained_model_file, "--limit", "40", "--json", "--report", report)
    assert code == 0
    r = json.loads(out)
    assert r["evaluated"] == 40
    assert set(r["mae_by_gender"]) <= {"male", "female"} and r["mae_by_gender"]
    assert set(r["mae_by_race"]) <= {"White", "Black", "Asian", "Indian", "Others"}
    for key in ("mae_by_decade", "mae_by_gender", "mae_by_race"):
        assert sum(v["n"] for v in r[key].values()) == 40, key
    preds = pd.read_csv(report.with_suffix(".csv"))
    assert set(preds["gender"]) <= {0, 1} and set(preds["race"]) <= {0, 1, 2, 3, 4}
    code, out, _ = _run(capsys, "evaluate", "--data", tiny_utkface, "--model",
                        untrained_model_file, "--limit", "40", "--report", report)
    assert code == 0 and "gender" in out and "race" in out


def test_phone_photos_from_the_cli(capsys, untrained_model_file, tmp_path):
    """A 12 MP HEIC and a 12 MP JPEG: one face each, boxes in the original's pixels, and the
    annotated copy at the photo's full size."""
    from testkit.photos import phone_heic, phone_jpeg

    heic, jpeg = tmp_path / "phone.heic", tmp_path / "phone.jpg"
    heic.write_bytes(phone_heic())
    jpeg.write_bytes(phone_jpeg(12))
    code, out, _ = _run(capsys, "predict", heic, jpeg, "--model", untrained_model_file, "--json")
    assert code == 0
    for line, width in zip(_json_lines(out), (4032, 4000), strict=True):
        [face] = line["faces"]
        x1, _, x2, _ = face["box"]
        assert width * 0.35 < (x1 + x2) / 2 < width * 0.65, (line["path"], face["box"])
    code, _, _ = _run(capsys, "predict", jpeg, "--model", untrained_model_file,
                      "--output", tmp_path / "annotated.jpg")
    assert code == 0 and Image.open(tmp_path / "annotated.jpg").size == (4000, 3000)
    code, _, err = _run(capsys, "predict", jpeg, "--model", untrained_model_file,
                        "--min-face-fraction", "2")
    assert code == 2 and "--min-face-fraction: Input should be less than 1" in err
