"""What the live-stream detection profile costs in accuracy and saves in time, on a video clip.

    uv run python bench/stream_profile.py                       # a made-up webcam clip
    uv run python bench/stream_profile.py --clip my-webcam.mp4  # any clip PyAV reads

Every frame goes through full detection (serve/config.yaml's ``detector``, what /predict uses)
and through the live-stream profile (``stream_detector``, what /stream and /predict/frames use),
also as /stream runs it, searching near the previous frame's faces between whole-frame
detections (``stream_track_frames``), with the same model; the table compares the faces each
finds (matched by box overlap), their boxes (IoU) and their ages, and the detection time per
frame (one torch thread, as a Serve Detector replica has, and the process default).

Without ``--clip`` the clip is made here: 640x480 at 30 fps, real face photos (the astronaut of
tests/fixtures and, when ../shared/data/aaf is there, All-Age-Faces photos of its test split) moving
and zooming as a person in front of a webcam does, from a face a fifth of the frame high to a
close-up that fills most of it, encoded as H.264 and decoded back (the codec's artefacts
included). The people are real, the motion is not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np
import yaml
from PIL import Image

from faceage import DEFAULT_MODEL_PATH
from faceage.inference.detection import DetectorConfig
from faceage.inference.pipeline import FaceFinder, face_records
from faceage.inference.stream import NextFrameSearch
from faceage.webapp.tracking import iou

REPO = Path(__file__).resolve().parents[1]
AAF = REPO.parent / "shared" / "data" / "aaf"
WIDTH, HEIGHT, FPS = 640, 480, 30


def face_photos(count: int) -> list[np.ndarray]:
    """The astronaut and up to ``count - 1`` AAF test-split photos (RGB)."""
    photos = [np.asarray(Image.open(REPO / "tests/fixtures/astronaut.jpg").convert("RGB"))]
    if AAF.is_dir() and count > 1:
        from faceage.config import SplitConfig
        from faceage.data.split import assign_split

        names = sorted(p.name for p in AAF.glob("*.jpg"))
        splits = assign_split(names, SplitConfig(val=0.1, test=0.1, seed=0))
        test = [n for n, s in zip(names, splits, strict=True) if s == "test"]
        step = max(1, len(test) // (count - 1))
        photos += [np.asarray(Image.open(AAF / n).convert("RGB")) for n in test[::step]
                   ][: count - 1]
    return photos


def make_clip(path: Path, seconds_per_photo: float = 3.0, photos: int = 6) -> Path:
    """A 640x480, 30 fps H.264 clip of face photos drifting and zooming in and out."""
    frames_per = int(seconds_per_photo * FPS)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "23"}
        for k, photo in enumerate(face_photos(photos)):
            h, w = photo.shape[:2]
            for i in range(frames_per):
                t = i / frames_per
                # The photo's height on screen goes from 0.6x to 1.6x the frame's and back; the
                # centre drifts sideways and a little up and down.
                zoom = 0.6 + 1.0 * np.sin(np.pi * t) ** 2
                scale = zoom * HEIGHT / h
                cx = WIDTH / 2 + 120 * np.sin(2 * np.pi * t + k)
                cy = HEIGHT / 2 + 30 * np.cos(2 * np.pi * t + k)
                m = np.array([[scale, 0, cx - scale * w / 2], [0, scale, cy - scale * h / 2]])
                frame = cv2.warpAffine(photo, m, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_CONSTANT, borderValue=(70, 80, 90))
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def read_frames(path: Path, limit: int) -> list[np.ndarray]:
    with av.open(str(path)) as clip:
        frames = []
        for frame in clip.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= limit:
                break
    return frames


def timed(finder: FaceFinder, frames: list[np.ndarray], threads: int,
          track: int = 0) -> tuple[list, float]:
    """Faces per frame and the median ms per frame. ``track``: as /stream does (its
    ``NextFrameSearch``), search near the previous frame's faces for up to that many frames between
    whole-frame detections."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, times, tracker = [], [], NextFrameSearch(track)
        for frame in frames:
            start = time.perf_counter()
            faces, tracked = finder.find_tracked(frame, tracker.near())
            times.append(time.perf_counter() - start)
            out.append(faces)
            tracker.update(faces, tracked)
    finally:
        torch.set_num_threads(before)
    return out, statistics.median(times) * 1000


def compare(full: list[list[dict]], other: list[list[dict]]) -> dict:
    """Faces of ``other`` matched to full detection's, frame by frame (box IoU >= 0.3)."""
    ious, age_diffs, both, missed, extra = [], [], 0, 0, 0
    for a, b in zip(full, other, strict=True):
        unmatched = list(range(len(b)))
        for fa in a:
            best = max(unmatched, key=lambda j: iou(fa["box"], b[j]["box"]), default=None)
            if best is not None and iou(fa["box"], b[best]["box"]) >= 0.3:
                unmatched.remove(best)
                both += 1
                ious.append(iou(fa["box"], b[best]["box"]))
                age_diffs.append(abs(fa["age"] - b[best]["age"]))
            else:
                missed += 1
        extra += len(unmatched)
    d = np.array(age_diffs) if age_diffs else np.array([np.nan])
    return {"found": both / max(1, both + missed), "missed": missed, "extra": extra,
            "iou": float(np.mean(ious)) if ious else float("nan"),
            "age_mean": float(np.nanmean(d)), "age_p95": float(np.nanpercentile(d, 95)),
            "age_max": float(np.nanmax(d))}


def parse_candidate(text: str) -> DetectorConfig:
    """``max_side=320,min_face_fraction=0.15`` → the stream profile with those changes."""
    from faceage.serving.app import ServeArgs

    base = ServeArgs().stream_detector.model_dump()
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        base[key.strip()] = yaml.safe_load(value)
    return DetectorConfig(**base)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", help="a video file (default: make the clip described above)")
    p.add_argument("--model", help="model file (default: the shipped model)")
    p.add_argument("--frames", type=int, default=540, help="at most this many frames")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                   help="torch threads to time with (0: the process default)")
    p.add_argument("--candidate", action="append", default=[], metavar="KEY=VALUE,...",
                   help="also try the stream profile with these changes (repeatable)")
    p.add_argument("--track", type=int, default=None,
                   help="frames tracked between whole-frame detections, as /stream does "
                        "(default: serve/config.yaml's args.stream_track_frames; 0: none)")
    args = p.parse_args()

    import torch

    from faceage.inference.modelfile import load_model_file
    from faceage.serving.app import ServeArgs

    model = load_model_file(args.model or DEFAULT_MODEL_PATH)
    serve_args = ServeArgs()
    profiles: dict[str, DetectorConfig] = {"full (photo)": serve_args.detector,
                                           "stream": serve_args.stream_detector}
    for text in args.candidate:
        profiles[f"candidate {text}"] = parse_candidate(text)
    track = serve_args.stream_track_frames if args.track is None else args.track
    runs = [(name, cfg, 0) for name, cfg in profiles.items()]
    if track:
        runs.insert(2, (f"stream, tracked ({track} frames)", serve_args.stream_detector, track))
    with tempfile.TemporaryDirectory(prefix="faceage-clip-") as tmp:
        clip = Path(args.clip) if args.clip else make_clip(Path(tmp) / "webcam.mp4")
        frames = read_frames(clip, args.frames)
    if not frames:
        print(f"error: no frames in {clip}", file=sys.stderr)
        return 2
    print(f"[bench] {len(frames)} frames of {frames[0].shape[1]}x{frames[0].shape[0]}",
          file=sys.stderr)

    default_threads = torch.get_num_threads()
    thread_counts = [t or default_threads for t in args.threads]
    rows = []
    full_records = None
    for name, cfg, tracking in runs:
        finder = FaceFinder.for_model(model.metadata, cfg)
        finder.find(frames[0])
        times = {}
        for threads in thread_counts:
            found, times[threads] = timed(finder, frames, threads, tracking)
        records = [face_records(faces, model.estimate([f.crop for f in faces]))
                   for faces in found]
        if full_records is None:
            full_records = records
        changed = {k: v for k, v in cfg.model_dump().items()
                   if v != DetectorConfig().model_dump()[k]}
        rows.append({"name": name, "settings": ", ".join(f"{k}={v}" for k, v in
                                                         changed.items()) or "defaults",
                     "times": times, "faces": sum(len(r) for r in records),
                     **compare(full_records, records)})
        print(f"[bench] {name}: {times}", file=sys.stderr, flush=True)

    print(f"\n{len(frames)} frames of {frames[0].shape[1]}x{frames[0].shape[0]} "
          f"({clip.name if args.clip else 'the made-up webcam clip'}), model {model.name} "
          f"{model.version}; detection time per frame is the median over all frames\n")
    print("| profile | settings | " + " | ".join(
        f"detect ms, {t} thread{'s' * (t > 1)}" for t in thread_counts)
        + " | faces | found by full detection too | missed | extra | box IoU | "
        "\\|age diff\\| mean | p95 | max |")
    print("|---|---|" + "---:|" * (len(thread_counts) + 8))
    for r in rows:
        print(f"| {r['name']} | {r['settings']} | "
              + " | ".join(f"{r['times'][t]:.1f}" for t in thread_counts)
              + f" | {r['faces']} | {r['found']:.1%} | {r['missed']} | {r['extra']} | "
              f"{r['iou']:.3f} | {r['age_mean']:.2f} | {r['age_p95']:.2f} | "
              f"{r['age_max']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
