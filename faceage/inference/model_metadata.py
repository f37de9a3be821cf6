"""A model file's metadata read without torch (``faceage --version``, tools that only look).

``faceage.inference.modelfile`` loads the weights with torch; this reads only the JSON that
``save_model_file`` stores beside them, so a command that just names the model stays quick."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path


def model_file_metadata(path: Path) -> dict:
    """A model file's metadata without torch: the JSON string inside ``torch.save``'s zip.

    The pickle is read with every class it names replaced by an inert stand-in, so nothing the
    file names is imported or run (the tensors are skipped, not rebuilt)."""
    class Inert(dict):
        def __setstate__(self, state):
            pass

    def inert(*_args, **_kwargs):
        return Inert()

    class MetadataOnly(pickle.Unpickler):
        def find_class(self, module, name):
            return inert

        def persistent_load(self, pid):
            return None

    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        blob = MetadataOnly(io.BytesIO(archive.read(min(pickles, key=len)))).load()
    return json.loads(blob["metadata_json"])
