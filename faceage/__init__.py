"""faceage: face age regression trained on Ray."""
__version__ = "0.1.0"
