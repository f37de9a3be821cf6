"""Corrections from users: the folder (faceage.corrections), the server's face memory
(faceage.serving.corrections), `faceage corrections`, POST /corrections (and its deprecated alias
/feedback) on the session's Serve (conftest ``serve_app`` runs with a corrections folder), and the
folder as training and evaluation data.

A full disk is tested twice: for real, on a 64 KiB tmpfs mounted in a private mount namespace
(``unshare -rm``; skipped where user namespaces are not allowed), and with ``os.write`` made to
fail half-way through the manifest row (the one case a real disk cannot be made to hit on cue).
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from faceage.cli import main
from faceage.config import MAX_AGE
from faceage.corrections import (
    COLUMNS,
    CorrectionError,
    CorrectionFolder,
    RememberedFace,
    check_age,
    encode_crop,
    new_face_id,
)
from faceage.serving.corrections import FaceMemory

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120


def crop(age: float = 30, size: int = 40, seed: int = 0) -> bytes:
    """A JPEG 'crop' whose shade follows the age (something a tiny model can learn)."""
    rng = np.random.default_rng(seed)
    colour = np.array([age * 2.5, 120, 255 - age * 2.5])
    pixels = (colour + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
    return encode_crop(pixels)


def face(age: float = 30, seed: int = 0, predicted: float = 35.0) -> RememberedFace:
    return RememberedFace(crop(age, seed=seed), predicted, predicted - 5, predicted + 6,
                          "faceage-test", "1.0")


def manifest_rows(folder: Path) -> list[dict]:
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def fill(folder: Path, count: int, seed: int = 0) -> tuple[CorrectionFolder, list[str]]:
    """A corrections folder with ``count`` corrections (ages 2-88); their ids."""
    store = CorrectionFolder(folder, create=True)
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(count):
        age = float(rng.integers(2, 89))
        face_id = new_face_id()
        store.add(face_id, face(age, seed=seed * 1000 + i, predicted=age + 4), age)
        ids.append(face_id)
    return store, ids


# -- the store ------------------------------------------------------------------------------------


def test_ages_are_checked_like_the_readers_check_them():
    assert MAX_AGE == 120
    assert [check_age(a) for a in (0, 34.5, 120)] == [0.0, 34.5, 120.0]
    for bad in (-1, 120.5, float("nan"), float("inf")):
        with pytest.raises(CorrectionError, match="outside 0-120") as err:
            check_age(bad)
        assert err.value.status == 400
    for bad in ("34", None, True, [34]):
        with pytest.raises(CorrectionError, match="not a number"):
            check_age(bad)


def test_memory_forgets_the_oldest_and_the_expired():
    now = [0.0]
    memory = FaceMemory(capacity=3, keep_s=10, clock=lambda: now[0])
    for name in "abcd":
        memory.remember(name, face())
    assert len(memory) == 3
    with pytest.raises(CorrectionError, match="last 3 answers for 10 s") as err:
        memory.recall("a")  # pushed out by d
    assert err.value.status == 404
    assert memory.recall("b").model_name == "faceage-test"
    now[0] = 10.5
    with pytest.raises(CorrectionError, match="not known"):
        memory.recall("c")  # expired
    memory.remember("e", face())  # drops the expired ones
    assert len(memory) == 1 and memory.recall("e")


def test_a_correction_is_a_crop_and_a_row_the_csv_readers_take(tmp_path):
    from faceage.data.readers import read_dataset

    store = CorrectionFolder(tmp_path / "fb", create=True)
    face_id = new_face_id()
    row, replaced = store.add(face_id, face(41, predicted=34.52), 41)
    assert not replaced and row["id"] == face_id and row["time"].endswith("Z")
    [stored] = manifest_rows(tmp_path / "fb")
    assert list(stored) == COLUMNS
    assert stored == {**row, "age": "41", "predicted": "34.52", "predicted_low": "29.52",
                      "predicted_high": "40.52", "model_name": "faceage-test",
                      "model_version": "1.0"}
    image = Image.open(tmp_path / "fb" / f"{face_id}.jpg")
    assert image.format == "JPEG" and image.size == (40, 40)
    # A second correction of the same face replaces the first: one row, one crop.
    row, replaced = store.add(face_id, face(41, predicted=34.52), 43.5)
    assert replaced and [r["age"] for r in manifest_rows(tmp_path / "fb")] == ["43.5"]
    assert sorted(p.name for p in (tmp_path / "fb").iterdir()) == sorted(
        [f"{face_id}.jpg", "manifest.csv", "manifest.csv.lock"])
    # Both csv readers keep the extra columns; `manifest` uses the crops whole.
    df, report = read_dataset("manifest", tmp_path / "fb" / "manifest.csv")
    assert report.kept == 1 and df["age"].tolist() == [43.5]
    assert df["path"].tolist() == [str(tmp_path / "fb" / f"{face_id}.jpg")]
    assert df["predicted"].tolist() == [34.52] and df["model_version"].tolist() == [1.0]


def test_bad_corrections_write_nothing(tmp_path):
    store = CorrectionFolder(tmp_path, create=True)
    before = (tmp_path / "manifest.csv").read_bytes()
    for bad in (-3, 121, "forty"):
        with pytest.raises(CorrectionError):
            store.add(new_face_id(), face(), bad)
    with pytest.raises(CorrectionError, match="not one this server gives"):
        store.add("../../etc/passwd", face(), 30)
    assert (tmp_path / "manifest.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "manifest.csv.lock"]
    with pytest.raises(CorrectionError, match="has no manifest.csv"):
        CorrectionFolder(tmp_path / "elsewhere")
    (tmp_path / "manifest.csv").write_text("path,age\nx.jpg,3\n")
    with pytest.raises(CorrectionError, match="not a corrections manifest"):
        store.add(new_face_id(), face(), 30)


def test_a_failed_row_write_leaves_no_half_row_and_no_crop(tmp_path, monkeypatch):
    """ENOSPC half-way through the manifest row (os.write made to fail: the second write of an
    add, after the crop's)."""
    store, _ = fill(tmp_path, 2)
    before = (tmp_path / "manifest.csv").read_bytes()
    files = sorted(p.name for p in tmp_path.iterdir())
    real_write, calls = os.write, []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(CorrectionError, match="disk of the corrections folder .* is full") as err:
        store.add(new_face_id(), face(), 30)
    monkeypatch.setattr(os, "write", real_write)
    assert err.value.status == 507 and len(calls) == 2
    assert (tmp_path / "manifest.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    store.add(new_face_id(), face(), 31)  # and the folder still works
    assert len(manifest_rows(tmp_path)) == 3


FULL_DISK_CHILD = r"""
import json, os, sys
from faceage.corrections import CorrectionError, CorrectionFolder, RememberedFace, new_face_id
root = sys.argv[1]
store = CorrectionFolder(root, create=True)
stored, error = [], None
for i in range(200):
    face = RememberedFace(os.urandom(9000 + 37 * i), 30.0, 25.0, 36.0, "m", "1")
    face_id = new_face_id()
    try:
        store.add(face_id, face, 40)
    except CorrectionError as exc:
        error = {"status": exc.status, "message": str(exc)}
        break
    stored.append(face_id)
print(json.dumps({"stored": stored, "error": error, "files": sorted(os.listdir(root)),
                  "rows": [r["id"] for r in store.rows()]}))
"""


def test_a_full_disk_is_a_507_and_leaves_the_folder_whole(tmp_path):
    """A real full disk: a 64 KiB tmpfs in a private mount namespace (no root needed where
    unprivileged user namespaces are allowed; visible to the child only)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()}")
    mount = tmp_path / "small"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=64k tmpfs {mount} && "
              f"exec {sys.executable} -c \"$0\" {mount}/fb")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, FULL_DISK_CHILD],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    if done.returncode != 0 and "mount" in done.stderr and "faceage" not in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["error"] and out["error"]["status"] == 507, out
    assert "is full; nothing was stored" in out["error"]["message"]
    assert 1 <= len(out["stored"]) < 200 and out["rows"] == out["stored"]
    assert out["files"] == sorted([f"{i}.jpg" for i in out["stored"]]
                                  + ["manifest.csv", "manifest.csv.lock"])


def _add_many(folder: str, count: int, seed: int) -> list[str]:
    store = CorrectionFolder(folder)
    ids = []
    for i in range(count):
        face_id = new_face_id()
        store.add(face_id, face(20 + i, seed=seed * 100 + i), 20 + i)
        ids.append(face_id)
    return ids


def test_concurrent_writers_threads_and_processes_keep_the_manifest_whole(tmp_path):
    store = CorrectionFolder(tmp_path, create=True)
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda s=s: results.append(_add_many(str(tmp_path), 10,
                                                                            s)))
               for s in range(4)]
    with ProcessPoolExecutor(3, mp_context=get_context("fork")) as pool:
        futures = [pool.submit(_add_many, str(tmp_path), 10, 10 + s) for s in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        results += [f.result(timeout=300) for f in futures]
    written = [i for ids in results for i in ids]
    assert len(written) == len(set(written)) == 70
    rows = store.rows()
    assert sorted(r["id"] for r in rows) == sorted(written)
    assert all((tmp_path / r["path"]).is_file() for r in rows)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    # Deleting under the lock while writers add: nothing lost, nothing half-written.
    with ProcessPoolExecutor(2, mp_context=get_context("fork")) as pool:
        futures = [pool.submit(_add_many, str(tmp_path), 10, 20 + s) for s in range(2)]
        assert sorted(store.delete(written[:30])) == sorted(written[:30])
        more = [i for f in futures for i in f.result(timeout=300)]
    assert sorted(r["id"] for r in store.rows()) == sorted(written[30:] + more)
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == sorted(
        f"{i}.jpg" for i in written[30:] + more)


# -- `faceage corrections` ------------------------------------------------------------------------


def test_cli_lists_and_deletes(tmp_path, capsys):
    _, ids = fill(tmp_path / "fb", 3)
    assert main(["corrections", "list", str(tmp_path / "fb")]) == 0
    out = capsys.readouterr().out
    assert "3 corrections in" in out and all(i in out for i in ids)
    assert "mean absolute error on them: 4.00 years" in out
    assert f"format: manifest, path: {tmp_path / 'fb' / 'manifest.csv'}" in out

    assert main(["corrections", "delete", str(tmp_path / "fb"), ids[0], "0123456789abcdef"]) == 2
    assert "no entries 0123456789abcdef" in capsys.readouterr().err
    assert len(manifest_rows(tmp_path / "fb")) == 3, "an unknown id deletes nothing"
    assert main(["corrections", "delete", str(tmp_path / "fb"), ids[0]]) == 0
    assert "deleted 1 correction " in capsys.readouterr().out
    assert [r["id"] for r in manifest_rows(tmp_path / "fb")] == ids[1:]
    assert not (tmp_path / "fb" / f"{ids[0]}.jpg").exists()

    assert main(["corrections", "delete", str(tmp_path / "fb")]) == 2
    assert "or --all" in capsys.readouterr().err
    (tmp_path / "fb" / "0123456789abcdef.jpg").write_bytes(b"a crop a crash left behind")
    assert main(["corrections", "delete", "--all", str(tmp_path / "fb")]) == 0
    assert "deleted 2 corrections" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "fb").iterdir()) == ["manifest.csv",
                                                                   "manifest.csv.lock"]
    assert main(["corrections", "list", str(tmp_path / "nothing")]) == 2
    assert "has no manifest.csv" in capsys.readouterr().err


def test_faceage_feedback_is_a_deprecated_alias(tmp_path, capsys):
    from faceage.corrections_cli import list_entries

    lines: list[str] = []
    list_entries(CorrectionFolder(tmp_path / "fb", create=True), out=lines.append)
    assert lines == [f"0 corrections in {tmp_path / 'fb' / 'manifest.csv'}"]
    _, ids = fill(tmp_path / "fb", 2)
    assert main(["feedback", "list", str(tmp_path / "fb")]) == 0
    out, err = capsys.readouterr()
    assert "2 corrections in" in out and all(i in out for i in ids)
    assert "`faceage feedback` is a deprecated name of `faceage corrections`" in err
    assert main(["feedback", "delete", "--all", str(tmp_path / "fb")]) == 0
    assert "deleted 2 corrections" in capsys.readouterr().out


def test_evaluate_reports_the_models_error_on_the_corrections(untrained_model_file, tmp_path,
                                                              capsys):
    fill(tmp_path / "fb", 12)
    report = tmp_path / "report.json"
    code = main(["evaluate", "--model", str(untrained_model_file), "--data",
                 f"manifest:{tmp_path / 'fb' / 'manifest.csv'}", "--report", str(report),
                 "--no-mlflow"])
    out = capsys.readouterr().out
    assert code == 0, out
    block = json.loads(report.read_text())["sources"]["manifest"]
    assert block["images"] == block["evaluated"] == 12, block
    assert block["metrics"]["n"] == 12 and block["metrics"]["mae"] > 0, block


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_tiny_training_run_takes_the_folder_as_a_source(ray_local, tmp_path):
    from faceage.config import load_config
    from faceage.inference.modelfile import load_model_file
    from faceage.training.driver import run_training

    fill(tmp_path / "fb", 48)
    manifest = tmp_path / "fb" / "manifest.csv"
    cfg = load_config(None, [
        f"data.sources=[{{format: manifest, path: {manifest}, name: users}}]",
        f"storage_path={tmp_path / 'runs'}", "name=corrections", "data.limit=null",
        f"data.cache_dir={tmp_path / 'cache'}", "model.pretrained=none", "model.input_size=32",
        "model.head_hidden=16", "train.batch_size=8", "scaling.num_workers=1",
        "scaling.cpus_per_worker=1", "train.max_steps_per_epoch=2", "train.eval_tta=false",
        "schedule.stages=[{name: head, train: 0, epochs: 1}]"])
    outcome = run_training(cfg)
    split = list(csv.DictReader(open(outcome.run_dir / "split.csv")))
    assert len(split) == 48 and {Path(r["path"]).parent for r in split} == {tmp_path / "fb"}
    model = load_model_file(outcome.model_path)
    assert model.metadata["data"]["train"] == sum(r["split"] == "train" for r in split)


# -- POST /corrections on the session's Serve -----------------------------------------------------


def predict(url: str, path: Path, route: str = "/predict") -> dict:
    answer = requests.post(url + route, data=path.read_bytes(),
                           headers={"Content-Type": "image/jpeg"}, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    return answer.json()


def correct(url: str, body, content_type: str = "application/json",
            route: str = "/corrections") -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url + route, data=data, headers={"Content-Type": content_type},
                         timeout=TIMEOUT)


@pytest.mark.slow
@pytest.mark.serve
def test_a_corrected_face_lands_in_the_folder(serve_url, serve_corrections_dir, astronaut_path):
    info = requests.get(serve_url + "/model", timeout=TIMEOUT).json()["corrections"]
    assert info["enabled"] and info["dir"] == str(serve_corrections_dir)
    crop_size = requests.get(serve_url + "/model", timeout=TIMEOUT).json()["detector"][
        "crop_size"]
    answer = predict(serve_url, astronaut_path)
    [face_id] = answer["corrections"]["face_ids"]
    assert answer["corrections"]["keep_s"] == 3600 and len(answer["faces"]) == 1
    stored = correct(serve_url, {"face_id": face_id, "age": 41})
    assert stored.status_code == 200, stored.text
    body = stored.json()
    [face] = answer["faces"]
    assert body["id"] == face_id and body["age"] == 41 and not body["replaced"]
    assert body["predicted"] == face["age"] and body["age_interval"] == face["age_interval"]
    assert body["model"] == answer["model"] and body["stored_in"] == str(serve_corrections_dir)
    [row] = [r for r in manifest_rows(serve_corrections_dir) if r["id"] == face_id]
    assert float(row["predicted"]) == face["age"] and row["model_version"] == \
        answer["model"]["version"]
    crop_image = Image.open(serve_corrections_dir / row["path"])
    assert crop_image.size == (crop_size, crop_size)
    # /feedback, the deprecated alias, is the same handler: it replaces the first correction.
    again = correct(serve_url, {"face_id": face_id, "age": 42.5}, route="/feedback").json()
    assert again["replaced"] and again["id"] == face_id
    assert [r["age"] for r in manifest_rows(serve_corrections_dir)
            if r["id"] == face_id] == ["42.5"]


@pytest.mark.slow
@pytest.mark.serve
def test_bad_corrections_are_clear_errors_and_write_nothing(serve_url, serve_corrections_dir,
                                                            astronaut_path, rocket_path):
    [face_id] = predict(serve_url, astronaut_path)["corrections"]["face_ids"]
    assert "corrections" not in predict(serve_url, rocket_path), "no face, no ids"
    before = (serve_corrections_dir / "manifest.csv").read_bytes()
    files = sorted(p.name for p in serve_corrections_dir.iterdir())
    cases = [
        ({"face_id": face_id, "age": -1}, 400, "outside 0-120"),
        ({"face_id": face_id, "age": 121}, 400, "outside 0-120"),
        ({"face_id": face_id, "age": "forty"}, 400, "not a number"),
        ({"face_id": face_id, "age": None}, 400, "not a number"),
        ({"face_id": face_id}, 400, "age is missing"),
        ({"age": 30}, 400, "face_id is missing"),
        ({"face_id": face_id, "age": 30, "name": "Eileen"}, 400, "unknown fields ['name']"),
        ([face_id, 30], 400, "JSON object"),
        (b"face_id=x&age=3", 400, "not JSON"),
        ({"face_id": "0123456789abcdef", "age": 30}, 404, "not known here"),
        ({"face_id": "x" * 300, "age": 30}, 404, "not known here"),
        (b"{" + b" " * 5000 + b"}", 413, "limit of 4096"),
    ]
    for (body, status, message), route in zip(cases, ["/corrections", "/feedback"] * 6,
                                              strict=True):
        answer = correct(serve_url, body, route=route)
        assert answer.status_code == status, (route, body, answer.text)
        assert answer.json() == {"error": answer.json()["error"], "status": status}
        assert message in answer.json()["error"], (route, body, answer.text)
    wrong_type = correct(serve_url, {"face_id": face_id, "age": 30}, "text/plain")
    assert wrong_type.status_code == 415 and "application/json" in wrong_type.json()["error"]
    assert (serve_corrections_dir / "manifest.csv").read_bytes() == before
    assert sorted(p.name for p in serve_corrections_dir.iterdir()) == files
    schema = requests.get(serve_url + "/openapi.json", timeout=TIMEOUT).json()
    assert set(schema["paths"]["/corrections"]["post"]["responses"]) >= {"200", "404", "507"}
    assert schema["paths"]["/feedback"]["post"]["deprecated"] is True


@pytest.mark.slow
@pytest.mark.serve
def test_frames_name_their_faces_and_the_live_stream_does_not(serve_url, astronaut_path):
    from websockets.sync.client import connect

    files = [("frames", ("a.jpg", astronaut_path.read_bytes(), "image/jpeg"))] * 2
    frames = requests.post(serve_url + "/predict/frames", files=files, timeout=TIMEOUT).json()
    ids = [i for f in frames["frames"] for i in f["corrections"]["face_ids"]]
    assert len(ids) == len(set(ids)) == 2
    assert correct(serve_url, {"face_id": ids[1], "age": 41}).status_code == 200
    with connect(serve_url.replace("http", "ws") + "/stream", open_timeout=TIMEOUT) as ws:
        ws.send(astronaut_path.read_bytes())
        result = json.loads(ws.recv(timeout=TIMEOUT))
    assert len(result["faces"]) == 1 and "corrections" not in result


# -- with corrections off (no Serve needed) --------------------------------------------------------


def test_corrections_off_answer_404_saying_how_to_turn_them_on():
    import asyncio

    from starlette.requests import Request

    from faceage.serving.app import Ingress, ServeArgs
    from faceage.serving.corrections import CorrectionSettings, corrections_info
    from faceage.serving.schemas import ApiError

    plain = Ingress.func_or_class.__bases__[0]
    ingress = plain(None, None, ServeArgs().model_dump())
    request = Request({"type": "http", "method": "POST", "path": "/corrections", "headers": []})
    with pytest.raises(ApiError) as off, ThreadPoolExecutor(1) as pool:
        # In a thread: the browser tests' Playwright may hold an event loop in this one.
        pool.submit(asyncio.run, ingress.correct(request)).result()
    assert off.value.status == 404 and "--corrections-dir DIR" in off.value.message
    assert corrections_info(CorrectionSettings(), None) == {"enabled": False,
                                                            "note": off.value.message}


def test_feedback_is_a_deprecated_alias_of_corrections():
    """POST /feedback, the old name, is the same handler as POST /corrections, marked deprecated
    (the session's Serve tests send corrections to both)."""
    from faceage.serving.app import api

    paths = api.openapi()["paths"]
    assert paths["/feedback"]["post"]["deprecated"] is True
    assert "deprecated" not in paths["/corrections"]["post"]
    assert paths["/feedback"]["post"]["responses"] == paths["/corrections"]["post"]["responses"]
    assert paths["/feedback"]["post"]["requestBody"] == paths["/corrections"]["post"][
        "requestBody"]


def test_args_feedback_is_the_deprecated_name_of_args_corrections():
    from faceage.serving.args import ServeArgs

    assert ServeArgs().corrections.dir is None
    with pytest.warns(FutureWarning, match="args.feedback is deprecated: it is now "
                                           "args.corrections"):
        old = ServeArgs.model_validate({"feedback": {"dir": "/srv/fb", "keep_s": 60}})
    assert (old.corrections.dir, old.corrections.keep_s, old.corrections.keep_faces) == (
        "/srv/fb", 60, 2048)
    # serve/config.yaml's corrections block with an old `--set args.feedback.dir=...` on top
    with pytest.warns(FutureWarning):
        both = ServeArgs.model_validate({"corrections": {"dir": None, "keep_faces": 9},
                                         "feedback": {"dir": "/srv/fb"}})
    assert (both.corrections.dir, both.corrections.keep_faces) == ("/srv/fb", 9)
    assert "feedback" not in both.model_dump()


def test_an_unusable_corrections_folder_fails_the_build(untrained_model_file, tmp_path):
    from faceage.errors import UserError
    from faceage.serving.app import app

    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(UserError, match="args.corrections.dir: cannot create the corrections "
                                        "folder"):
        app({"model_path": str(untrained_model_file),
             "corrections": {"dir": str(tmp_path / "a-file" / "fb")}})


def test_up_takes_a_corrections_folder():
    import argparse

    from faceage.cli import build_parser
    from faceage.up import add_up_arguments

    args = build_parser("up").parse_args(["up", "--corrections-dir", "~/fb"])
    assert args.corrections_dir == Path("~/fb")
    assert build_parser("up").parse_args(["up"]).corrections_dir is None
    # --feedback-dir: the deprecated old name, kept out of --help.
    old = build_parser("up").parse_args(["up", "--feedback-dir", "~/old"])
    assert old.corrections_dir == Path("~/old")
    up = argparse.ArgumentParser()
    add_up_arguments(up)
    assert "--corrections-dir" in up.format_help() and "--feedback" not in up.format_help()
