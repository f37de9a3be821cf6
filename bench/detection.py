"""facenet-pytorch's MTCNN.detect against faceage's MTCNN on the same frames (ms per frame).

    uv run python bench/detection.py                      # 3 rounds, 1 and 2 torch threads
    uv run python bench/detection.py --rounds 5 --wild 100

Frames: 640x480, real face photos (the astronaut of tests/fixtures and, when ../shared/data/aaf is
there, All-Age-Faces photos) placed at the zooms of bench/stream_profile.py's webcam clip, from a
face a fifth of the frame high to a close-up; and a 1280x720 photo with five faces (the rocket
photo with the astronaut's face pasted in, as bench/pipeline.py makes it).

Variants, interleaved in every round (their order rotates) so that load on the machine hits them
alike: facenet-pytorch's ``MTCNN.detect`` (``keep_all``, min face 20 px); faceage's
``detect_faces`` (the same work: one MTCNN pass); faceage's ``FaceDetector.detect`` (what the
pipeline calls: one pass, plus a padded pass when a face fills the frame; without the mirror
pass the photo profile adds, ``mirror: false``). Medians per frame
of wall and CPU time (this process, all threads); the "x faster" columns are facenet-pytorch's
total over the variant's in the same round: median over rounds (min-max). ``--wild N``
also checks both find the same faces on N photos of bench/wild_faces.py (UTKFace test chips in
synthetic scenes; needs ../shared/data/utkface).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from faceage.inference.detection import DetectorConfig, FaceDetector
from faceage.inference.mtcnn import detect_faces, load_nets
from testkit.frames import group_photo, place

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "fixtures"
AAF = REPO.parent / "shared" / "data" / "aaf"
UTKFACE = REPO.parent / "shared" / "data" / "utkface"



def webcam_frames(count: int) -> list[np.ndarray]:
    """``count`` 640x480 frames: face photos at zooms 0.6-1.6 of the frame height."""
    photos = [np.asarray(Image.open(DATA / "astronaut.jpg").convert("RGB"))]
    if AAF.is_dir():
        names = sorted(p.name for p in AAF.glob("*.jpg"))
        photos += [np.asarray(Image.open(AAF / n).convert("RGB"))
                   for n in names[:: max(1, len(names) // 5)][:5]]
    zooms = np.linspace(0.6, 1.6, count)
    return [place(photos[i % len(photos)], z, 320 + 100 * np.sin(i), 240 + 20 * np.cos(i))
            for i, z in enumerate(zooms)]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def compare(facenet, nets, images: list[np.ndarray]) -> dict:
    """Faces found by both on ``images``: counts, the worst box IoU and score difference."""
    out = {"images": len(images), "facenet": 0, "faceage": 0, "same_count": 0, "min_iou": 1.0,
           "max_score_diff": 0.0}
    for image in images:
        try:
            boxes, probs = facenet.detect(image)
        except RuntimeError as exc:  # facenet-pytorch fails when every candidate is degenerate
            if "non-empty" not in str(exc):
                raise
            boxes = None
        boxes = np.zeros((0, 4)) if boxes is None else boxes
        ours, _ = detect_faces(image, nets, 20.0)
        out["facenet"] += len(boxes)
        out["faceage"] += len(ours)
        out["same_count"] += len(boxes) == len(ours)
        for box, prob in zip(boxes, probs if len(boxes) else [], strict=True):
            best = max(ours, key=lambda b, box=box: iou(box, b), default=None)
            out["min_iou"] = min(out["min_iou"], iou(box, best) if best is not None else 0.0)
            if best is not None:
                out["max_score_diff"] = max(out["max_score_diff"], abs(float(best[4]) - prob))
    return out


def wild_photos(count: int) -> list[np.ndarray]:
    """``count`` photos made by bench/wild_faces.py from UTKFace chips (seed 0)."""
    from wild_faces import make_wild

    names = sorted(p.name for p in UTKFACE.glob("*.jpg"))
    rng = np.random.default_rng(0)
    return [make_wild(np.asarray(Image.open(UTKFACE / n).convert("RGB")), rng)[0]
            for n in names[:: max(1, len(names) // count)][:count]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frames", type=int, default=6, help="640x480 frames per round")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads")
    p.add_argument("--max-seconds", type=float, default=90,
                   help="after the first round, start no more timing after this many seconds")
    p.add_argument("--wild", type=int, default=0, help="also compare faces on N wild photos")
    args = p.parse_args()
    from facenet_pytorch import MTCNN

    facenet = MTCNN(keep_all=True, min_face_size=20, device="cpu").eval()
    nets = load_nets()
    detector = FaceDetector(DetectorConfig(mirror=False))  # one pass, as facenet-pytorch does
    variants = {"facenet-pytorch MTCNN.detect": lambda im: facenet.detect(im, landmarks=True),
                "faceage detect_faces": lambda im: detect_faces(im, nets, 20.0),
                "faceage FaceDetector.detect": detector.detect}
    sets = {"640x480": webcam_frames(args.frames), "1280x720, 5 faces": [group_photo()]}
    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)  # the parity checks: one thread does not spin on a busy machine
    parity = {name: compare(facenet, nets, images) for name, images in sets.items()}
    if args.wild:
        if UTKFACE.is_dir():
            images = wild_photos(args.wild)
            parity[f"wild_faces.py x{len(images)}"] = compare(facenet, nets, images)
        else:
            print(f"(--wild skipped: {UTKFACE} is not there)")

    # times[(set, threads, variant)] = per-frame seconds; totals: per round, for the ratios.
    # Wall and CPU time (all threads of this process): on a shared machine the CPU time says
    # what a detection costs when others' work also delays it.
    times: dict[tuple, list[float]] = {}
    cpu_times: dict[tuple, list[float]] = {}
    totals: dict[tuple, list[float]] = {}
    cpu_totals: dict[tuple, list[float]] = {}
    start = time.perf_counter()
    try:
        for r in range(args.rounds):
            for threads in args.threads:
                # A block (every variant at one thread count) runs whole or not at all, so that
                # each ratio compares runs of the same round.
                if r and time.perf_counter() - start > args.max_seconds:
                    break
                torch.set_num_threads(threads)
                cv2.setNumThreads(threads)
                names = list(variants)
                names = names[r % len(names):] + names[: r % len(names)]
                for set_name, images in sets.items():
                    for name in names:
                        if r == 0:
                            variants[name](images[0])  # warm-up, untimed
                        spent, cpu = [], []
                        for image in images:
                            t0, c0 = time.perf_counter(), time.process_time()
                            variants[name](image)
                            spent.append(time.perf_counter() - t0)
                            cpu.append(time.process_time() - c0)
                        key = (set_name, threads, name)
                        times.setdefault(key, []).extend(spent)
                        cpu_times.setdefault(key, []).extend(cpu)
                        totals.setdefault(key, []).append(sum(spent))
                        cpu_totals.setdefault(key, []).append(sum(cpu))
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])

    reference = "facenet-pytorch MTCNN.detect"
    done = {t: len(totals[("640x480", t, reference)]) for t in args.threads}
    print(f"\nrounds done per thread count {done} in {time.perf_counter() - start:.0f} s; "
          f"{args.frames} frames of 640x480, 1 photo of 1280x720 per round; "
          f"torch {torch.__version__}\n")
    print("| image | threads | variant | wall ms per frame | x faster (wall) | CPU ms per frame | "
          "x faster (CPU) |")
    print("|---|---|---|---|---|---|---|")

    def ratio(ref: list[float], mine: list[float]) -> str:
        r = [a / b for a, b in zip(ref, mine, strict=True)]
        return f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"

    for set_name in sets:
        for threads in args.threads:
            ref = (set_name, threads, reference)
            for name in variants:
                key = (set_name, threads, name)
                wall = statistics.median(times[key]) * 1000
                cpu = statistics.median(cpu_times[key]) * 1000
                x_wall = ratio(totals[ref], totals[key]) if name != reference else "1"
                x_cpu = ratio(cpu_totals[ref], cpu_totals[key]) if name != reference else "1"
                print(f"| {set_name} | {threads} | {name} | {wall:.1f} | {x_wall} | {cpu:.1f} | "
                      f"{x_cpu} |")
    print("\nSame faces (facenet-pytorch MTCNN.detect vs faceage detect_faces, min face 20 px):\n")
    print("| images | faces facenet / faceage | same count | min box IoU | max score diff |")
    print("|---|---|---|---|---|")
    for name, c in parity.items():
        print(f"| {name} | {c['facenet']} / {c['faceage']} | {c['same_count']} of {c['images']} | "
              f"{c['min_iou']:.3f} | {c['max_score_diff']:.1e} |")


if __name__ == "__main__":
    main()
