"""Inference: image loading (images), face detection (detection) and /stream's tracking (stream),
alignment and crop (alignment), the two composed (pipeline), preprocessing, the model file, the
age interval, prediction and drawing. Imports nothing from ``faceage.data`` or ``faceage.training``,
so Serve replicas and ``faceage predict`` load neither pandas nor training code."""
