"""Where to look for faces in the next frame of a live stream: ``NextFrameSearch``.

Written once for the Serve Ingress's /stream and for bench/stream_profile.py, so the bench
measures what /stream does. Torch-free: the Ingress uses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from faceage.inference.detection import Face


class NextFrameSearch:
    """After a whole-frame detection, search the next frames only around the faces found there.

    Up to ``track_frames`` frames in a row are searched near the previous frame's faces
    (``FaceFinder.find_tracked(image, near)``), while faces keep being found there; then, or when
    the last frame had no face, the whole frame again (where new faces show up). 0: every frame
    whole.
    """

    def __init__(self, track_frames: int):
        self.track_frames = track_frames
        self.boxes: list[list[float]] = []  # the faces of the last frame, where to search next
        self.frames_tracked = 0  # frames searched near faces since the last whole-frame one

    def near(self) -> list[list[float]] | None:
        """The boxes to search the next frame around, or None for a whole-frame detection."""
        if self.boxes and self.frames_tracked < self.track_frames:
            return self.boxes
        return None

    def update(self, faces: Sequence[Face | Mapping[str, Any]], tracked: bool) -> None:
        """Take a frame's answer: its faces (``Face``s or their JSON records, ``face_record``)
        and whether they were found near the previous ones (False: the whole frame)."""
        boxes = []
        for face in faces:
            box, landmarks = ((face["box"], face["landmarks"]) if isinstance(face, Mapping)
                              else (face.box, face.landmarks))
            # A whole-image face (no_face: whole) has no landmarks: the detector found nothing,
            # so there is nothing to search near.
            if len(landmarks):
                # Rounded as the JSON record rounds it, so a Face and its record track alike.
                boxes.append([round(float(v), 1) for v in box])
        self.boxes = boxes
        self.frames_tracked = self.frames_tracked + 1 if tracked else 0
