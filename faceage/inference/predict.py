"""``faceage predict``: ages of the faces in photos, folders of photos or a video."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from faceage.arguments import add_engine_argument
from faceage.errors import ImageError, UserError
from faceage.inference.detection import DetectorConfig
from faceage.inference.images import Photo, load_image
from faceage.inference.interval import DEFAULT_COVERAGE, check_coverage
from faceage.inference.pipeline import FacePipeline, face_records

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm",
                    ".heic", ".heif", ".avif")
BATCH_IMAGES = 8


def coverage_arg(text: str) -> float:
    """argparse type of ``--coverage``: a float in (0, 0.99]."""
    try:
        return check_coverage(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (recursively, sorted); missing paths kept."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in PHOTO_EXTENSIONS)
            if not found:
                raise UserError(f"{p}: the folder holds no images ({', '.join(PHOTO_EXTENSIONS)})")
            out.extend(found)
        else:
            out.append(p)
    return out


def image_result(path: str, faces: list[dict[str, Any]] | None, error: str | None) -> dict:
    """One line of ``faceage predict --json``."""
    return {"path": path, "faces": faces or [], "error": error}


def predict_files(pipeline: FacePipeline, paths: Sequence[Path], keep_images: bool = False,
                  max_pixels: int | None = None) -> Iterator[tuple[dict, Photo | None]]:
    """``(result, photo)`` per path, in order; the model runs once per batch of images."""
    for start in range(0, len(paths), BATCH_IMAGES):
        chunk = paths[start:start + BATCH_IMAGES]
        images: list[Photo | None] = []
        errors: list[str | None] = []
        for p in chunk:
            try:
                images.append(pipeline.finder.load(p, max_pixels=max_pixels))
                errors.append(None)
            except ImageError as exc:
                images.append(None)
                errors.append(str(exc))
        ok = [im for im in images if im is not None]
        predicted = iter(pipeline.predict_faces(ok))
        for p, im, err in zip(chunk, images, errors, strict=True):
            if im is None:
                yield image_result(str(p), None, err), None
                continue
            faces, estimates = next(predicted)
            records = face_records(faces, estimates)
            yield image_result(str(p), records, None), (im if keep_images else None)


def _human_lines(result: dict) -> list[str]:
    if result["error"]:
        return []
    faces = result["faces"]
    if not faces:
        return [f"{result['path']}: no face found"]
    lines = []
    for i, f in enumerate(faces, 1):
        box = ", ".join(f"{v:.0f}" for v in f["box"])
        low, high = f["age_interval"]
        lines.append(f"{result['path']}: face {i}/{len(faces)}  age {f['age']:.1f} "
                     f"({low:.0f}-{high:.0f})  "
                     f"box ({box})  score {f['score']:.3f}")
    return lines


def _annotated_path(output: Path, source: Path, many: bool) -> Path:
    if not many:
        return output
    return output / f"{source.stem}.annotated.jpg"


def _check_output(output: Path | None, n_inputs: int) -> None:
    if output is None:
        return
    if n_inputs > 1 and output.suffix.lower() in PHOTO_EXTENSIONS:
        raise UserError(f"--output {output}: with {n_inputs} images, --output must be a folder")
    if n_inputs > 1:
        output.mkdir(parents=True, exist_ok=True)
    elif output.suffix.lower() not in PHOTO_EXTENSIONS:
        raise UserError(f"--output {output}: name an image file (.jpg, .png) for one input")


def run_predict(args: argparse.Namespace, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    from faceage.inference.annotate import draw_faces
    from faceage.inference.modelfile import load_model_file

    if args.video:
        return run_video(args, out, err)
    if not args.paths:
        raise UserError("give one or more images or folders (or --video FILE --output FILE)")
    paths = expand_inputs(args.paths)
    output = Path(args.output).expanduser() if args.output else None
    _check_output(output, len(paths))
    model = load_model_file(args.model, engine=args.engine)
    pipeline = FacePipeline(model, detector_config(args), no_face=args.no_face, tta=args.tta,
                            coverage=args.coverage)
    failures = 0
    for result, photo in predict_files(pipeline, paths, keep_images=output is not None):
        if result["error"]:
            failures += 1
            print(f"error: {result['error']}", file=err)
        if args.json:
            print(json.dumps(result), file=out, flush=True)
        else:
            for line in _human_lines(result):
                print(line, file=out, flush=True)
        if output is not None and photo is not None:
            target = _annotated_path(output, Path(result["path"]), len(paths) > 1)
            # A large JPEG was decoded at a reduced scale: draw on the whole photo.
            full = photo.pixels if photo.scale == (1.0, 1.0) else load_image(result["path"])
            draw_faces(full, result["faces"]).save(target)
    if output is not None and not args.json:
        print(f"annotated: {output}", file=err)
    return 2 if failures else 0


def detector_config(args: argparse.Namespace) -> DetectorConfig:
    cfg: dict[str, Any] = {}
    if getattr(args, "min_face_size", None):
        cfg["min_face_size"] = args.min_face_size
    if getattr(args, "min_score", None) is not None:
        cfg["min_score"] = args.min_score
    if getattr(args, "min_face_fraction", None) is not None:
        cfg["min_face_fraction"] = args.min_face_fraction
    if getattr(args, "engine", None):
        cfg["engine"] = args.engine
    if getattr(args, "mirror", None) is not None:
        cfg["mirror"] = args.mirror
    try:
        return DetectorConfig(**cfg)
    except ValidationError as exc:
        bad = "; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}"
                        for e in exc.errors())
        raise UserError(bad) from None


# -- video ---------------------------------------------------------------------------------------


def run_video(args: argparse.Namespace, out=None, err=None) -> int:
    """Annotate every frame of ``args.video`` into ``args.output`` (and JSON lines per frame)."""
    out, err = out or sys.stdout, err or sys.stderr
    import av
    from tqdm import tqdm

    from faceage.inference.annotate import draw_faces
    from faceage.inference.modelfile import load_model_file
    from faceage.inference.video import VideoWriter, frame_rate, open_video, rgb_frames

    src = Path(args.video).expanduser()
    if not src.is_file():
        raise UserError(f"video not found: {src}")
    if not args.output:
        raise UserError("--video needs --output FILE.mp4 for the annotated video")
    dst = Path(args.output).expanduser()
    if dst.suffix.lower() not in (".mp4", ".mkv", ".mov", ".avi"):
        raise UserError(f"--output {dst}: name a video file (.mp4, .mkv, .mov)")
    model = load_model_file(args.model, engine=args.engine)
    pipeline = FacePipeline(model, detector_config(args), no_face=args.no_face, tta=args.tta,
                            coverage=args.coverage)
    frames = faces_seen = 0
    with open_video(src, str(src)) as inp:
        total = inp.streams.video[0].frames or None
        dst.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=total, desc=f"frames of {src.name}", unit="frame", file=err)
        try:
            with VideoWriter(dst, frame_rate(inp)) as writer:
                for t, rgb in rgb_frames(inp):
                    faces, estimates = pipeline.predict_faces([rgb])[0]
                    records = face_records(faces, estimates)
                    faces_seen += len(records)
                    if args.json:
                        print(json.dumps({"frame": frames, "time": t, "faces": records}),
                              file=out, flush=True)
                    writer.write(np.asarray(draw_faces(rgb, records)))
                    frames += 1
                    bar.update(1)
        except av.error.FFmpegError as exc:
            raise UserError(f"{src}: decoding failed at frame {frames} ({exc})") from None
        finally:
            bar.close()
    if frames == 0:
        raise UserError(f"{src}: no frames could be decoded")
    print(f"{frames} frames, {faces_seen} faces; annotated video: {dst}", file=err)
    return 0


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders of images")
    p.add_argument("--model", help="model file (default: the shipped models/faceage-default.pt)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per image (per frame with --video), one per line")
    p.add_argument("--output", help="annotated image (a folder for several inputs), or the "
                                    "annotated video with --video")
    p.add_argument("--no-face", choices=("skip", "whole"), default="skip",
                   help="when no face is found: report none (skip) or use the whole image as "
                        "the face (whole; for pre-cropped photos)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each face with its mirror image (default: as the model was "
                        "validated, its flip_average)")
    p.add_argument("--coverage", type=coverage_arg, default=DEFAULT_COVERAGE,
                   help="each age interval covers this share of faces like the validation "
                        "faces (above 0, at most 0.99; default 0.8: a central 80%% interval)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="also detect on the mirror image and average each face with its "
                        "mirror's, so a face and its mirror image read alike (default: on; "
                        "twice the detection time)")
    add_engine_argument(p)
    p.add_argument("--video", help="a video file to annotate frame by frame (needs --output)")
    p.add_argument("--min-face-size", type=int, help="smallest face in pixels (default 20)")
    p.add_argument("--min-score", type=float, help="detection score threshold (default 0.9)")
    p.add_argument("--min-face-fraction", type=float,
                   help="smallest face as a share of the photo's shorter side (default 0.03; "
                        "0 finds smaller faces in large photos, more slowly)")
