"""The corrections folder: users' corrections as training data, in the one format the server
writes and ``faceage corrections``, training and evaluation read.

A correction, ``CorrectionFolder.add``, writes the aligned crop of a served face (a
``RememberedFace``: the crop and the model's answer, which the server's ``CorrectionStore`` held,
faceage/serving/corrections.py) as a JPEG next to the manifest and appends one row, under a file
lock. The manifest is a faceage CSV manifest: ``path,age`` plus columns the readers keep and
ignore (``predicted``, ``predicted_low``, ``predicted_high``, ``model_name``, ``model_version``,
``time``, ``id``). The crops are already framed by the served model's crop policy, so the folder
is a ``manifest`` source (images used whole), not a ``csv`` one (photos, detected again):

    data.sources: [{format: manifest, path: DIR/manifest.csv}]      # faceage train
    faceage evaluate --model M --data manifest:DIR/manifest.csv     # the model's error on them
    faceage corrections list DIR | faceage corrections delete DIR ID... | --all

Plumbing, not the data layer: the Serve application writes it, and Serve imports no data module
(pyproject.toml's ``serving`` contract). OpenCV and filelock only: no torch, no pandas.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import re
import secrets
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from faceage.config import MAX_AGE
from faceage.errors import UserError

MANIFEST = "manifest.csv"
COLUMNS = ["path", "age", "predicted", "predicted_low", "predicted_high", "model_name",
           "model_version", "time", "id"]
FACE_ID = re.compile(r"^[0-9a-f]{16}$")
JPEG_QUALITY = 95
LOCK_TIMEOUT_S = 30.0


class CorrectionError(UserError):
    """A correction or a corrections folder that cannot be used; ``status`` is its HTTP status."""

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message)
        self.status = status


def new_face_id() -> str:
    """A random face id: 16 hex digits, also the entry id and crop name once corrected."""
    return secrets.token_hex(8)


def check_age(value) -> float:
    """``value`` as an age in years, 0 to ``MAX_AGE``; anything else is a ``CorrectionError``
    (400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorrectionError(f"age {value!r} is not a number; give the person's age in years "
                              f"(0-{MAX_AGE})")
    if not math.isfinite(value) or not 0 <= value <= MAX_AGE:
        raise CorrectionError(f"age {value!r} is outside 0-{MAX_AGE}; give the person's age "
                              "in years")
    return float(value)


def encode_crop(rgb) -> bytes:
    """JPEG bytes of an aligned RGB crop: what the folder stores and the server's face memory
    holds."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("could not encode the crop as JPEG")
    return buf.tobytes()


@dataclass(frozen=True)
class RememberedFace:
    """One served face: its aligned crop (JPEG) and what the model answered."""

    crop_jpeg: bytes
    predicted: float
    low: float
    high: float
    model_name: str
    model_version: str


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _csv_text(rows: Iterable[dict], header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n", extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class CorrectionFolder:
    """A folder of corrections: ``manifest.csv`` and one ``ID.jpg`` crop per row.

    Every change happens under ``manifest.csv.lock`` (a file lock: threads and processes, the
    server and ``faceage corrections delete``); a crop is written to a temporary file and renamed,
    a row appended (and cut back off if the write fails), a rewrite made in a temporary file and
    renamed, so a full disk or a crash leaves no partial crop or row.
    """

    def __init__(self, folder: str | Path, create: bool = False,
                 lock_timeout: float = LOCK_TIMEOUT_S):
        self.root = Path(folder).expanduser().absolute()
        self.manifest = self.root / MANIFEST
        self.lock_timeout = lock_timeout
        if create:
            self._create()
        elif not self.manifest.is_file():
            raise CorrectionError(f"{self.root} is not a corrections folder (it has no "
                                  f"{MANIFEST}); name the folder the server was started with "
                                  "(--corrections-dir)")

    def _create(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._locked():
                if not self.manifest.exists():
                    self._rewrite([])
        except OSError as exc:
            raise self._os_error(exc, "create") from None

    @contextmanager
    def _locked(self):
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.root / f"{MANIFEST}.lock"), timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise CorrectionError(f"{self.manifest} stayed locked for {self.lock_timeout:.0f} "
                                  "s (another process is changing it); try again",
                                  status=503) from None
        try:
            yield
        finally:
            lock.release()

    def _os_error(self, exc: OSError, doing: str) -> CorrectionError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return CorrectionError(f"the disk of the corrections folder {self.root} is full; "
                                   "nothing was stored. Free some space there and send it "
                                   "again.", status=507)
        return CorrectionError(f"cannot {doing} the corrections folder {self.root}: "
                               f"{exc.strerror or exc}", status=500)

    # -- reading -----------------------------------------------------------------------------

    def rows(self) -> list[dict[str, str]]:
        """Every entry of the manifest, as text, in the order they were stored."""
        try:
            with open(self.manifest, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != COLUMNS:
                    raise CorrectionError(f"{self.manifest} has columns {reader.fieldnames}, "
                                          f"not a corrections manifest's {COLUMNS}", status=500)
                return list(reader)
        except OSError as exc:
            raise self._os_error(exc, "read") from None

    # -- writing -----------------------------------------------------------------------------

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.root / f".{MANIFEST}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, _csv_text(rows, header=True).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.manifest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _write_crop(self, name: str, data: bytes) -> Path:
        final = self.root / name
        tmp = self.root / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final

    def _append(self, row: dict) -> None:
        fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, _csv_text([row], header=False).encode())
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)  # no half row left behind
                raise
        finally:
            os.close(fd)

    def add(self, face_id: str, face: RememberedFace, age, now: datetime | None = None
            ) -> tuple[dict[str, str], bool]:
        """Store the correction ``age`` of ``face``; a second one for the same face replaces
        the first. Returns the row and whether it replaced one."""
        age = check_age(age)
        if not FACE_ID.match(face_id):
            raise CorrectionError(f"face id {face_id!r} is not one this server gives", status=404)
        stamp = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
        row = {"path": f"{face_id}.jpg", "age": f"{age:g}", "predicted": f"{face.predicted:g}",
               "predicted_low": f"{face.low:g}", "predicted_high": f"{face.high:g}",
               "model_name": face.model_name, "model_version": face.model_version,
               "time": stamp.replace("+00:00", "Z"), "id": face_id}
        try:
            with self._locked():
                rows = self.rows()
                if any(r["id"] == face_id for r in rows):
                    self._rewrite([row if r["id"] == face_id else r for r in rows])
                    return row, True
                crop = self._write_crop(row["path"], face.crop_jpeg)
                try:
                    self._append(row)
                except BaseException:
                    crop.unlink(missing_ok=True)
                    raise
        except OSError as exc:
            raise self._os_error(exc, "write to") from None
        return row, False

    def delete(self, ids: Iterable[str] = (), everything: bool = False) -> list[str]:
        """Remove the entries ``ids`` (or all of them): rows first, then their crops. An id
        that is not there deletes nothing and raises ``CorrectionError``."""
        wanted = set(ids)
        try:
            with self._locked():
                rows = self.rows()
                present = {r["id"] for r in rows}
                missing = sorted(wanted - present)
                if missing and not everything:
                    raise CorrectionError(f"no entries {', '.join(missing)} in {self.manifest}; "
                                          "nothing was deleted (`faceage corrections list "
                                          f"{self.root}` shows the ids)")
                gone = rows if everything else [r for r in rows if r["id"] in wanted]
                self._rewrite([] if everything else [r for r in rows if r["id"] not in wanted])
                files = [self.root / r["path"] for r in gone]
                if everything:  # crops a crash left without a row, and temporary files
                    files += [p for p in self.root.iterdir()
                              if FACE_ID.match(p.stem) and p.suffix == ".jpg"
                              or p.name.endswith(".tmp")]
                for path in files:
                    if path.resolve().parent == self.root.resolve():  # never outside the folder
                        path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._os_error(exc, "change") from None
        return [r["id"] for r in gone]
