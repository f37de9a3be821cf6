"""Which training images an epoch draws: every image once (the default), or weighted draws that
give each source, age band, or source x band a set share of the epoch (``data.balance``).

Sources of photos are rarely balanced by age: UTKFace has few teenagers and old people, a family
collection many children. Without balance, the model learns the ages the sources are rich in and
reads everyone towards them (children older, older adults younger). ``data.balance`` draws the
groups closer to equal shares; ``strength`` says how close (0: as the data is, 1: every group the
same share).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from faceage.config import BalanceConfig
from faceage.inference.interval import band_index as age_band

__all__ = ["age_band", "band_labels", "draw_probabilities", "draw_shares", "train_sampler",
           "WeightedDrawSampler"]


def band_labels(edges: Sequence[float]) -> list[str]:
    """Readable names of the bands: ``0-6``, ``7-12``, ..., ``67+`` for KFAD-like edges."""
    e = [float(x) for x in edges]
    names = [f"{lo:g}-{hi - 1:g}" if float(hi - 1).is_integer() and float(lo).is_integer()
             else f"{lo:g}-{hi:g}" for lo, hi in zip(e, e[1:], strict=False)]
    return names + [f"{e[-1]:g}+"]


def _tempered_shares(groups: np.ndarray, strength: float) -> dict:
    """Each group's share of draws: proportional to ``count ** (1 - strength)``."""
    keys, counts = np.unique(groups, return_counts=True)
    mass = counts.astype(np.float64) ** (1.0 - strength)
    return dict(zip(keys.tolist(), (mass / mass.sum()).tolist(), strict=True))


def draw_probabilities(sources: Sequence[str], ages: Sequence[float],
                       weights: dict[str, float], balance: BalanceConfig) -> np.ndarray:
    """The probability of each training image per draw.

    Without balance: proportional to its source's weight. ``by: band``: each age band gets a
    share proportional to ``count ** (1 - strength)`` over all sources, and within a band images
    are drawn by their source's weight. ``by: source_band``: each source keeps its share
    (images x weight, as without balance), and within each source its bands are balanced.
    """
    src = np.asarray(sources)
    w = np.array([weights[s] for s in src], dtype=np.float64)
    if balance.by == "none":
        return w / w.sum()
    band = age_band(ages, balance.bands)
    p = np.zeros(len(src), np.float64)
    if balance.by == "band":
        for b, share in _tempered_shares(band, balance.strength).items():
            mine = band == b
            p[mine] = share * w[mine] / w[mine].sum()
        return p
    source_mass = {s: w[src == s].sum() for s in np.unique(src)}
    total = sum(source_mass.values())
    for s, mass in source_mass.items():
        own = src == s
        for b, share in _tempered_shares(band[own], balance.strength).items():
            mine = own & (band == b)
            p[mine] = (mass / total) * share / mine.sum()
    return p


class WeightedDrawSampler(torch.utils.data.Sampler):
    """Draws training images with replacement by the probabilities ``p``; ``len(p)`` draws per
    epoch in all, seeded by (seed, epoch) and dealt to the workers round-robin (every worker
    draws the same sequence and takes its share)."""

    def __init__(self, p: np.ndarray, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        p = np.asarray(p, dtype=np.float64)
        self.p = p / p.sum()
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = len(p) // num_replicas  # as DistributedSampler's drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        draws = rng.choice(len(self.p), size=self.num_samples * self.num_replicas, p=self.p)
        return iter(draws[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def train_sampler(dataset, sources: Sequence[str], weights: dict[str, float], num_replicas: int,
                  rank: int, seed: int, ages: Sequence[float] | None = None,
                  balance: BalanceConfig | None = None):
    """Equal weights and no balance: every training image once per epoch, shuffled
    (``DistributedSampler``, as with one source). Otherwise ``WeightedDrawSampler``."""
    balance = balance or BalanceConfig()
    if balance.by == "none" and len({weights[s] for s in set(sources)}) <= 1:
        return torch.utils.data.DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                                   shuffle=True, seed=seed, drop_last=True)
    if balance.by != "none" and ages is None:
        raise ValueError("balanced sampling needs the training images' ages")
    p = draw_probabilities(sources, np.zeros(len(sources)) if ages is None else ages, weights,
                           balance)
    return WeightedDrawSampler(p, num_replicas, rank, seed)


def draw_shares(p: np.ndarray, sources: Sequence[str], ages: Sequence[float],
                edges: Sequence[float]) -> dict[str, dict[str, float]]:
    """The expected share of an epoch's draws per source and band (for the run's log)."""
    src, band = np.asarray(sources), age_band(ages, edges)
    labels = band_labels(edges)
    return {s: {labels[b]: round(float(p[(src == s) & (band == b)].sum()), 4)
                for b in range(len(labels)) if ((src == s) & (band == b)).any()}
            for s in dict.fromkeys(src.tolist())}
