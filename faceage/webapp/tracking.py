"""Keep one smoothed age per face across frames: greedy box-overlap (IoU) tracking with an EMA."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from faceage.inference.overlap import iou


@dataclass
class Track:
    """One face followed across frames."""

    id: int
    face: dict[str, Any]
    age: float
    hits: int = 1
    misses: int = 0
    ages: list[float] = field(default_factory=list)
    best: dict[str, Any] | None = None  # the surest detection Serve named (has a face_id)



def smoothed(face: dict[str, Any], track: Track) -> dict[str, Any]:
    """``face`` with its track's smoothed age; its interval (if Serve sent one) moves with the
    age, keeping the frame's own distances below and above it."""
    age = round(track.age, 2)
    out = {**face, "age": age, "raw_age": face["age"], "track": track.id}
    interval = face.get("age_interval")
    if interval and len(interval) == 2:
        shift = track.age - float(face["age"])
        out["age_interval"] = [round(max(0.0, min(float(interval[0]) + shift, age)), 2),
                               round(max(float(interval[1]) + shift, age), 2)]
    return out

class AgeSmoother:
    """Matches each frame's faces to the previous ones by box overlap and smooths their ages.

    ``alpha`` is the weight of a new measurement in the exponential moving average; a track that
    is not seen for more than ``max_misses`` updates is dropped.
    """

    def __init__(self, iou_threshold: float = 0.3, alpha: float = 0.3, max_misses: int = 5):
        self.iou_threshold = iou_threshold
        self.alpha = alpha
        self.max_misses = max_misses
        self.tracks: list[Track] = []
        self.finished: list[Track] = []
        self._next_id = 1

    def update(self, faces: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Feed one frame's face records; returns them with smoothed ``age``, ``raw_age`` and
        ``track`` (the id), in the order given."""
        pairs = sorted(((iou(t.face["box"], f["box"]), ti, fi)
                        for ti, t in enumerate(self.tracks) for fi, f in enumerate(faces)),
                       reverse=True)
        track_of: dict[int, Track] = {}
        used_tracks: set[int] = set()
        for overlap, ti, fi in pairs:
            if overlap < self.iou_threshold:
                break
            if ti in used_tracks or fi in track_of:
                continue
            used_tracks.add(ti)
            track = self.tracks[ti]
            track.age = self.alpha * float(faces[fi]["age"]) + (1 - self.alpha) * track.age
            track.hits += 1
            track.misses = 0
            track_of[fi] = track
        for ti, track in enumerate(self.tracks):
            if ti not in used_tracks:
                track.misses += 1
        self.finished += [t for t in self.tracks if t.misses > self.max_misses]
        self.tracks = [t for t in self.tracks if t.misses <= self.max_misses]
        out = []
        for fi, face in enumerate(faces):
            track = track_of.get(fi)
            if track is None:
                track = Track(self._next_id, dict(face), float(face["age"]))
                self._next_id += 1
                self.tracks.append(track)
            track.face = dict(face)
            track.ages.append(float(face["age"]))
            if face.get("face_id") and (track.best is None
                                        or face["score"] > track.best["score"]):
                track.best = dict(face)
            out.append(smoothed(face, track))
        return out

    def best(self, track_id: int) -> dict[str, Any] | None:
        """The face record of ``track_id`` detected most surely that has a ``face_id``."""
        for t in self.finished + self.tracks:
            if t.id == track_id:
                return t.best
        return None

    def visible(self) -> list[dict[str, Any]]:
        """The faces matched in the latest update, with their smoothed ages."""
        return [smoothed(t.face, t) for t in self.tracks if t.misses == 0]

    def summary(self) -> list[dict[str, Any]]:
        """One row per track seen so far: id, smoothed age, frames seen, age range."""
        rows = []
        for t in sorted(self.finished + self.tracks, key=lambda t: t.id):
            rows.append({"face": t.id, "age": round(t.age, 1), "frames": t.hits,
                         "min age": round(min(t.ages), 1), "max age": round(max(t.ages), 1)})
        return rows
