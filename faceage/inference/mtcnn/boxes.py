"""MTCNN's box arithmetic, as facenet-pytorch does it, vectorised over all boxes."""

from __future__ import annotations

import torch


def square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes ``(N, >=4)`` grown to squares of their longer side around the same centre
    (facenet-pytorch's ``rerec``)."""
    out = boxes.clone()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Boxes ``(N, >=4)`` moved by R-/O-net's offsets ``(N, 4)``, as fractions of the box's
    size counted in whole pixels (``x2 - x1 + 1``; facenet-pytorch's ``bbreg``)."""
    out = boxes.clone()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, :4] = boxes[:, :4] + offsets * torch.stack([w, h, w, h], dim=1)
    return out


def crop_windows(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The pixel windows ``[x0, y0, x1, y1)`` (N, 4 integer-valued floats) MTCNN reads for
    ``boxes``: truncated to whole pixels and clipped to the image (facenet-pytorch's ``pad``).

    The part of a box outside the image is cut off, not zero-filled, and the rest is stretched
    to the net's input square: that is what facenet-pytorch does (unlike the original MTCNN,
    which zero-pads), and the nets' scores here are compared against it.
    """
    b = boxes[:, :4].trunc()
    x0 = b[:, 0].clamp(min=1) - 1
    y0 = b[:, 1].clamp(min=1) - 1
    x1 = b[:, 2].clamp(max=width)
    y1 = b[:, 3].clamp(max=height)
    return torch.stack([x0, y0, x1, y1], dim=1)


def nms_min(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices kept by greedy NMS on intersection over the *smaller* box's area (MTCNN's last
    step, which torchvision's IoU ``nms`` does not offer), best score first. Areas count whole
    pixels (``x2 - x1 + 1``) as facenet-pytorch's ``nms_numpy`` does."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True)
    b = boxes[order].double()
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:4], b[None, :, 2:4])
    inter = (rb - lt + 1).clamp(min=0).prod(dim=2)
    overlap = (inter / torch.minimum(area[:, None], area[None, :]) > threshold).cpu()
    # The greedy pass is sequential but over the few boxes O-net passed: a Python loop.
    suppressed = torch.zeros(len(b), dtype=torch.bool)
    keep = []
    for i in range(len(b)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlap[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]
