"""Inference: image loading, face detection and crop, preprocessing, the model file, the age
interval, prediction and drawing. Imports nothing from ``faceage.data`` or ``faceage.training``,
so Serve replicas and ``faceage predict`` load neither pandas nor training code."""
