"""Training augmentation on whole uint8 batches: geometry, colour, and the faults of real photos.

Clean, well-lit, colour chips make a model that reads a grey, soft or compressed face as another
age. ``BatchAugment`` adds them in training: grayscale, Gaussian blur, down-scaling (a small face
blown up) and JPEG artefacts, each on a configurable share of images (``train.augment``).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from faceage.config import AugmentConfig
from faceage.inference.preprocess import IMAGENET_MEAN, IMAGENET_STD

LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane, one 3x3 matrix per image.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


class BatchAugment(nn.Module):
    """Training augmentation for a whole uint8 batch (B, 3, S, S) → normalised (B, 3, N, N).

    One affine warp per image does the random resized crop, rotation and mirror; brightness,
    contrast, saturation, hue and grayscale are per-image colour maps; then a share of images
    is down-scaled, blurred and JPEG-compressed. Working on the batch, on
    whatever device it lives on, costs a few milliseconds where per-image torchvision transforms
    (rotation, hue) cost more than the model step on a CPU.
    """

    def __init__(self, input_size: int, aug: AugmentConfig, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        super().__init__()
        self.input_size = input_size
        self.aug = aug
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        yiq = torch.tensor(_RGB_TO_YIQ)
        self.register_buffer("rgb_to_yiq", yiq, persistent=False)
        self.register_buffer("yiq_to_rgb", torch.linalg.inv(yiq), persistent=False)

    def _uniform(self, n: int, lo: float, hi: float, gen) -> torch.Tensor:
        return torch.rand(n, generator=gen, device=self.mean.device) * (hi - lo) + lo

    def affine(self, n: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """Per-image 2x3 maps from output to input coordinates (``F.affine_grid``'s theta)."""
        a = self.aug
        area = self._uniform(n, a.scale[0], a.scale[1], gen)
        log_ratio = self._uniform(n, float(np.log(0.9)), float(np.log(1.1)), gen)
        w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
        h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
        cx = (1 - w) * self._uniform(n, -1.0, 1.0, gen)
        cy = (1 - h) * self._uniform(n, -1.0, 1.0, gen)
        angle = torch.deg2rad(self._uniform(n, -a.rotate, a.rotate, gen))
        if a.flip:
            flip = torch.rand(n, generator=gen, device=w.device) < 0.5
            w = torch.where(flip, -w, w)
        cos, sin = angle.cos(), angle.sin()
        return torch.stack([
            torch.stack([w * cos, -h * sin, cx], dim=1),
            torch.stack([w * sin, h * cos, cy], dim=1),
        ], dim=1)

    def colour(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Brightness, contrast, saturation, hue jitter and random grayscale of x in [0, 1].

        Each of them is linear in RGB, so they compose into one 3x3 matrix and offset per image
        and cost a single batched matmul.
        """
        n, j, dev = x.shape[0], self.aug.color_jitter, x.device
        eye = torch.eye(3, device=dev).expand(n, 3, 3)
        to_gray = self.luma.view(1, 1, 3).expand(n, 3, 3)  # every output channel = luma
        m, offset = eye, torch.zeros(n, 3, 1, device=dev)
        if j:
            def factor() -> torch.Tensor:
                return self._uniform(n, max(0.0, 1 - j), 1 + j, gen).view(n, 1, 1)

            brightness, contrast, saturation = factor(), factor(), factor()
            mean_luma = (x * self.luma).sum(1).mean((1, 2)).view(n, 1, 1)
            m = brightness * contrast * eye
            offset = ((1 - contrast) * brightness * mean_luma).expand(n, 3, 1)
            m_sat = saturation * eye + (1 - saturation) * to_gray
            hue = min(j / 4, 0.5) * 2 * np.pi
            theta = self._uniform(n, -hue, hue, gen)
            rot = torch.zeros(n, 3, 3, device=dev)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2] = theta.cos(), -theta.sin()
            rot[:, 2, 1], rot[:, 2, 2] = theta.sin(), theta.cos()
            m_hue = self.yiq_to_rgb @ rot @ self.rgb_to_yiq
            m, offset = m_hue @ m_sat @ m, m_hue @ m_sat @ offset
        if self.aug.grayscale:
            pick = (torch.rand(n, generator=gen, device=dev) < self.aug.grayscale).view(n, 1, 1)
            m, offset = torch.where(pick, to_gray @ m, m), torch.where(pick, to_gray @ offset,
                                                                       offset)
        h, w = x.shape[2:]
        out = torch.baddbmm(offset, m, x.reshape(n, 3, h * w)).view(n, 3, h, w)
        return out.clamp_(0, 1)

    def _pick(self, n: int, share: float, gen) -> torch.Tensor:
        """Indices of the images (about ``share`` of ``n``) that get a fault."""
        if share <= 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.nonzero(torch.rand(n, generator=gen, device=self.mean.device) < share,
                             as_tuple=True)[0].cpu()

    def downscale(self, x: torch.Tensor, gen=None) -> torch.Tensor:
        """A share of images shrunk (area) to ``downscale_to`` of their side and blown up
        again (bilinear): the detail of a face that filled few pixels of its photo."""
        size = x.shape[-1]
        lo, hi = self.aug.downscale_to
        for i in self._pick(x.shape[0], self.aug.downscale, gen).tolist():
            side = max(8, round(size * float(self._uniform(1, lo, hi, gen))))
            small = F.interpolate(x[i:i + 1], size=(side, side), mode="area")
            x[i:i + 1] = F.interpolate(small, size=(size, size), mode="bilinear",
                                       align_corners=False)
        return x

    def blur(self, x: torch.Tensor, gen=None) -> torch.Tensor:
        """A share of images blurred by a Gaussian of random sigma (one small convolution per
        picked image: a grouped convolution over the whole batch costs ~20x more on a CPU)."""
        pick = self._pick(x.shape[0], self.aug.blur, gen).tolist()
        if not pick:
            return x
        sigmas = self._uniform(len(pick), *self.aug.blur_sigma, gen).tolist()
        for i, sigma in zip(pick, sigmas, strict=True):
            size = 2 * math.ceil(3 * sigma) + 1
            x[i:i + 1] = gaussian_blur(x[i:i + 1], [size, size], [sigma, sigma])
        return x

    def jpeg(self, x: torch.Tensor, gen=None) -> torch.Tensor:
        """A share of images through a JPEG round trip at a random quality (on the CPU)."""
        pick = self._pick(x.shape[0], self.aug.jpeg, gen).tolist()
        if not pick:
            return x
        lo, hi = self.aug.jpeg_quality
        quality = torch.randint(lo, hi + 1, (len(pick),), generator=gen,
                                device=self.mean.device).tolist()
        for i, q in zip(pick, quality, strict=True):
            img = (x[i] * 255).round_().to(torch.uint8).permute(1, 2, 0).contiguous().cpu()
            ok, data = cv2.imencode(".jpg", img.numpy(), [cv2.IMWRITE_JPEG_QUALITY, int(q)])
            back = torch.from_numpy(cv2.imdecode(data, cv2.IMREAD_UNCHANGED)).permute(2, 0, 1)
            x[i] = back.to(x.device, x.dtype) / 255.0
        return x

    def forward(self, batch: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x = batch.float() / 255.0
        n, size = x.shape[0], self.input_size
        grid = F.affine_grid(self.affine(n, gen), [n, 3, size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
        x = self.jpeg(self.blur(self.downscale(self.colour(x, gen), gen), gen), gen)
        return x.sub_(self.mean).div_(self.std)
