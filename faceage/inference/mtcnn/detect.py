"""MTCNN's three stages on one image: pyramid → P-net → NMS → R-net → O-net with landmarks.

The algorithm, thresholds, resampling and box arithmetic are facenet-pytorch's ``detect_face``;
what differs is how the work is done: pyramid levels and candidate crops are gathered from one
summed-area table (resample.py) instead of a float copy of the image pooled once per level and
once per candidate box, the nets' max-pooling avoids torch's slow NCHW kernel (nets.py), and each
NMS is one torchvision call.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torchvision.ops import batched_nms, nms

from faceage.inference.mtcnn.boxes import crop_windows, nms_min, regress, square
from faceage.inference.mtcnn.nets import MtcnnNets
from faceage.inference.mtcnn.resample import crop_resize, integral_image, resize_level

# R-/O-net candidates per forward pass: bounds memory on an image with thousands of candidates.
CHUNK = 512


def pyramid_scales(height: int, width: int, min_face: float, factor: float) -> list[float]:
    """The scales P-net sees the image at: the first maps ``min_face`` to P-net's 12 px window,
    each next one is ``factor`` x the previous, down to a shorter side of 12 px."""
    scale = 12.0 / min_face
    shorter = min(height, width) * scale
    scales = []
    while shorter >= 12:
        scales.append(scale)
        scale *= factor
        shorter *= factor
    return scales


@lru_cache(maxsize=16)
def _windows(shapes: tuple[tuple[int, int], ...], scales: tuple[float, ...],
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The image window (x1, y1, x2, y2) of every P-net output cell of every pyramid level,
    levels concatenated (M, 4), and each cell's level (M,): the same for every frame of a size,
    so cached."""
    windows, levels = [], []
    for level, ((h, w), scale) in enumerate(zip(shapes, scales, strict=True)):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                indexing="ij")
        # A cell is a 12x12 window at stride 2 of its level (float32 as facenet-pytorch computes).
        cell = torch.stack([xs.flatten(), ys.flatten()], dim=1).float()
        windows.append(torch.cat([((2 * cell + 1) / scale).floor(),
                                  ((2 * cell + 12) / scale).floor()], dim=1))
        levels.append(torch.full((h * w,), level, device=device))
    return torch.cat(windows), torch.cat(levels)


def propose(table: torch.Tensor, nets: MtcnnNets, scales: Sequence[float],
            threshold: float) -> torch.Tensor:
    """P-net over the pyramid of the image with summed-area ``table``: candidate boxes (N, 5:
    x1, y1, x2, y2, score), regressed and squared, after NMS within each scale (IoU 0.5) and
    across scales (0.7)."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    scores, offsets, shapes = [], [], []
    for scale in scales:
        offset, probs = nets.pnet(resize_level(table, int(h * scale + 1), int(w * scale + 1)))
        shapes.append(tuple(probs.shape[2:]))
        scores.append(probs[0, 1].flatten())
        offsets.append(offset[0].flatten(1))
    # All levels' cells at once: a few tensor operations instead of a dozen per level.
    windows, levels = _windows(tuple(shapes), tuple(scales), table.device)
    keep = torch.nonzero(torch.cat(scores) >= threshold).squeeze(1)
    if len(keep) == 0:
        return torch.zeros((0, 5), device=table.device)
    score = torch.cat(scores)[keep]
    boxes = torch.cat([windows[keep], score[:, None], torch.cat(offsets, dim=1)[:, keep].T], dim=1)
    boxes = boxes[batched_nms(boxes[:, :4], boxes[:, 4], levels[keep], 0.5)]
    boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
    # P-net's offsets are fractions of the window's size (x2 - x1, no + 1: facenet-pytorch's).
    w_box = boxes[:, 2] - boxes[:, 0]
    h_box = boxes[:, 3] - boxes[:, 1]
    moved = boxes[:, :4] + boxes[:, 5:9] * torch.stack([w_box, h_box, w_box, h_box], dim=1)
    return square(torch.cat([moved, boxes[:, 4:5]], dim=1))


def _crops(table: torch.Tensor, boxes: torch.Tensor,
           size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes that overlap the image, and their ``size`` x ``size`` net inputs."""
    windows = crop_windows(boxes, table.shape[1] - 1, table.shape[0] - 1)
    # facenet-pytorch skips a box outside the image when cropping but not when scoring, which
    # misaligns boxes and scores (or fails on an empty list); such a box is no face: drop it.
    inside = (windows[:, 2] > windows[:, 0]) & (windows[:, 3] > windows[:, 1])
    return boxes[inside], crop_resize(table, windows[inside], size)


def _run_chunked(net: torch.nn.Module, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
    outs = [net(crops[i:i + CHUNK]) for i in range(0, len(crops), CHUNK)]
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def refine(table: torch.Tensor, boxes: torch.Tensor, nets: MtcnnNets,
           threshold: float) -> torch.Tensor:
    """R-net on 24x24 crops of ``boxes``: those scoring above ``threshold``, after NMS (IoU 0.7),
    regressed and squared (N, 5)."""
    boxes, crops = _crops(table, boxes, 24)
    if len(boxes) == 0:
        return boxes
    offsets, probs = _run_chunked(nets.rnet, crops)
    score = probs[:, 1]
    passed = score > threshold
    boxes = torch.cat([boxes[passed, :4], score[passed, None]], dim=1)
    offsets = offsets[passed]
    keep = nms(boxes[:, :4], boxes[:, 4], 0.7)
    return square(regress(boxes[keep], offsets[keep]))


def output(table: torch.Tensor, boxes: torch.Tensor, nets: MtcnnNets,
           threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """O-net on 48x48 crops of ``boxes``: the faces scoring above ``threshold`` (N, 5) and their
    landmarks (N, 5, 2), after NMS on overlap with the smaller box (0.7), best first."""
    boxes, crops = _crops(table, boxes, 48)
    if len(boxes) == 0:
        return boxes, boxes.new_zeros((0, 5, 2))
    offsets, marks, probs = _run_chunked(nets.onet, crops)
    score = probs[:, 1]
    passed = score > threshold
    boxes = torch.cat([boxes[passed, :4], score[passed, None]], dim=1)
    offsets, marks = offsets[passed], marks[passed]
    # Landmarks are fractions of the box (before O-net's own regression), in whole pixels.
    w_box = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
    h_box = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
    points = torch.stack([w_box * marks[:, :5] + boxes[:, 0:1] - 1,
                          h_box * marks[:, 5:] + boxes[:, 1:2] - 1], dim=2)
    boxes = regress(boxes, offsets)
    keep = nms_min(boxes[:, :4], boxes[:, 4], 0.7)
    return boxes[keep], points[keep]


def detect_faces(image: np.ndarray, nets: MtcnnNets, min_face: float = 20.0,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7),
                 factor: float = 0.709) -> tuple[np.ndarray, np.ndarray]:
    """MTCNN on an HxWx3 uint8 RGB image: unclipped boxes with scores (N, 5: x1, y1, x2, y2,
    score) and landmarks (N, 5, 2), best score first; faces of at least ``min_face`` pixels."""
    h, w = image.shape[:2]
    empty = np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
    scales = pyramid_scales(h, w, min_face, factor)
    if not scales:
        return empty
    with torch.inference_mode():
        table = integral_image(image, nets.device)
        boxes = propose(table, nets, scales, thresholds[0])
        if len(boxes) == 0:
            return empty
        boxes = refine(table, boxes, nets, thresholds[1])
        if len(boxes) == 0:
            return empty
        boxes, points = output(table, boxes, nets, thresholds[2])
        return (boxes.float().cpu().numpy().reshape(-1, 5),
                points.float().cpu().numpy().reshape(-1, 5, 2))
