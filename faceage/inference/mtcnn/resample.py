"""Area resampling for MTCNN from one summed-area table: the pyramid levels and every candidate's
crop, each in one vectorised gather.

facenet-pytorch resamples with ``interpolate(mode="area")``, i.e. ``adaptive_avg_pool2d``: output
pixel ``i`` of ``n`` averages input pixels ``floor(i * L / n)`` to ``ceil((i + 1) * L / n)``. A
summed-area table gives each such window's sum from four lookups, so the same numbers come out
without a float copy of the image per level or a pooling call per candidate box. (OpenCV's
INTER_AREA weighs pixels by fractional overlap instead: a different filter, and at the pyramid's
non-integer scales no faster; the candidate boxes MTCNN keeps, and so its faces, follow these
inputs closely enough that a different filter moves small faces' boxes by pixels.)
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

# Image values → net input: (x - 127.5) / 128, MTCNN's normalisation.
MEAN, SCALE = 127.5, 0.0078125


def integral_image(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """The summed-area table (H + 1, W + 1, 3) of an HxWx3 uint8 image: entry ``[y, x, c]`` is
    the sum of channel ``c`` over rows ``< y`` and columns ``< x``."""
    h, w = image.shape[:2]
    # int32 is exact while the whole image's sum fits; larger images take float64 (exact to 2^53).
    depth = cv2.CV_32S if 255 * h * w < 2**31 else cv2.CV_64F
    return torch.from_numpy(cv2.integral(np.ascontiguousarray(image), sdepth=depth)).to(device)


def pool_bounds(length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``adaptive_avg_pool``'s input windows ``[start, end)`` for ``size`` outputs from inputs of
    ``length`` (a tensor; its shape + (size,) comes back)."""
    i = torch.arange(size, device=length.device)
    length = length.unsqueeze(-1)
    return (i * length) // size, ((i + 1) * length + size - 1) // size


def _normalised(total: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Window sums (..., C, h, w; any strides) → window means, normalised for the nets, as a new
    contiguous float tensor. In place after one copy: fewer large allocations (each a round of
    page faults) matter as much as the arithmetic here."""
    out = torch.empty(total.shape, dtype=torch.float32, device=total.device)
    out.copy_(total)
    # Divided by the window's height, then its width, as torch's pooling kernel does.
    out.div_(rows.unsqueeze(-1)).div_(cols.unsqueeze(-2))
    return out.sub_(MEAN).mul_(SCALE)


def resize_level(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The whole image area-resampled to ``height`` x ``width`` and normalised: (1, 3, h, w)."""
    full_h, full_w = table.shape[0] - 1, table.shape[1] - 1
    y0, y1 = pool_bounds(torch.tensor(full_h, device=table.device), height)
    x0, x1 = pool_bounds(torch.tensor(full_w, device=table.device), width)
    # Rows first (whole rows: contiguous copies), then columns (3 values each) of their sums.
    rows = table.index_select(0, y1).sub_(table.index_select(0, y0))
    total = rows.index_select(1, x1).sub_(rows.index_select(1, x0))  # (h, w, 3)
    return _normalised(total.permute(2, 0, 1), y1 - y0, x1 - x0).unsqueeze(0)


def crop_resize(table: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """Every pixel window ``[x0, y0, x1, y1)`` (N, 4, whole numbers inside the image)
    area-resampled to ``size`` x ``size`` and normalised, in one gather: (N, 3, size, size)."""
    n = len(windows)
    if n == 0:
        return torch.zeros((0, 3, size, size), device=table.device)
    win = windows.long()
    y0, y1 = pool_bounds(win[:, 3] - win[:, 1], size)
    x0, x1 = pool_bounds(win[:, 2] - win[:, 0], size)
    y0, y1 = y0 + win[:, 1:2], y1 + win[:, 1:2]
    x0, x1 = x0 + win[:, 0:1], x1 + win[:, 0:1]
    stride = table.shape[1]
    pixels = table.reshape(-1, 3)

    def corner(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        index = (ys[:, :, None] * stride + xs[:, None, :]).reshape(-1)
        return pixels.index_select(0, index).reshape(n, size, size, 3)

    total = corner(y1, x1).sub_(corner(y1, x0)).sub_(corner(y0, x1)).add_(corner(y0, x0))
    return _normalised(total.permute(0, 3, 1, 2), (y1 - y0)[:, None, :], (x1 - x0)[:, None, :])
