"""/stream's tracking policy (``NextFrameSearch``) without Serve: where each frame is searched, how
frames since the last whole-frame detection are counted, and which faces are kept."""

from __future__ import annotations

import numpy as np

from faceage.inference.detection import Face
from faceage.inference.pipeline import face_record
from faceage.inference.stream import NextFrameSearch

BOX = [100.04, 50.0, 180.0, 150.06]


def face(box=BOX, landmarks: bool = True) -> Face:
    points = np.full((5, 2), 120.0, np.float32) if landmarks else np.zeros((0, 2), np.float32)
    return Face(box=np.array(box, np.float32), score=0.99, landmarks=points)


def test_the_first_frame_is_searched_whole_then_near_the_faces_found():
    tracker = NextFrameSearch(3)
    assert tracker.near() is None
    tracker.update([face()], tracked=False)
    assert tracker.near() == [[100.0, 50.0, 180.0, 150.1]]


def test_after_track_frames_near_the_faces_the_next_frame_is_searched_whole():
    tracker = NextFrameSearch(2)
    tracker.update([face()], tracked=False)
    searched = []
    for _ in range(5):
        near = tracker.near()
        searched.append("whole" if near is None else "near")
        tracker.update([face()], tracked=near is not None)
    assert searched == ["near", "near", "whole", "near", "near"]


def test_a_frame_without_faces_sends_the_next_one_to_whole_frame_detection():
    tracker = NextFrameSearch(10)
    tracker.update([face()], tracked=False)
    tracker.update([], tracked=False)  # nothing near the faces, nor in the whole frame
    assert tracker.near() is None
    tracker.update([face()], tracked=False)
    assert tracker.near() is not None and tracker.frames_tracked == 0


def test_zero_track_frames_searches_every_frame_whole():
    tracker = NextFrameSearch(0)
    for _ in range(3):
        assert tracker.near() is None
        tracker.update([face()], tracked=False)


def test_a_whole_image_face_is_not_searched_near():
    """``no_face: whole`` answers with the whole image as a face, without landmarks: the detector
    found nothing, so there is nothing to track."""
    tracker = NextFrameSearch(10)
    tracker.update([face([0, 0, 640, 480], landmarks=False)], tracked=False)
    assert tracker.near() is None
    tracker.update([face([0, 0, 640, 480], landmarks=False), face()], tracked=False)
    assert tracker.near() == [[100.0, 50.0, 180.0, 150.1]]


def test_a_face_and_its_json_record_track_alike():
    """The Ingress tracks the JSON records it answers with, the bench the detector's faces."""
    from_faces, from_records = NextFrameSearch(10), NextFrameSearch(10)
    faces = [face(), face([300.26, 20, 340, 70]), face([0, 0, 640, 480], landmarks=False)]
    from_faces.update(faces, tracked=False)
    from_records.update([face_record(f, 30.0, 25.0, 35.0) for f in faces], tracked=False)
    assert from_faces.near() == from_records.near() == [[100.0, 50.0, 180.0, 150.1],
                                                        [300.3, 20.0, 340.0, 70.0]]
