"""Reading what clients upload: the accepted content types, a request body with a size limit,
and the parts of a multipart form. Each refusal is an ``ApiError`` with its status."""

from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from faceage.serving.schemas import ApiError

# Content types /predict takes as a raw body: the formats faceage.inference.images decodes.
# Anything else (text, JSON, SVG) is a 415; octet-stream is sniffed like a file.
RAW_IMAGE_TYPES = frozenset({
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/avif",
    "image/heic", "image/heif", "image/bmp", "image/x-ms-bmp", "image/gif", "image/tiff",
    "image/x-portable-pixmap", "application/octet-stream",
})
MULTIPART = "multipart/form-data"


def media_type(content_type: str | None) -> str:
    """``image/jpeg; q=1`` -> ``image/jpeg``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int, advice: str = "send a smaller image") -> bytes:
    """The request body, refused with 413 (and ``advice``) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, f"invalid Content-Length {declared!r}") from None
        if too_big:
            raise ApiError(413, f"the body is {int(declared)} bytes, above the limit of "
                                f"{limit}; {advice}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is over the limit of {limit} bytes; {advice}")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_file_parts(request: Request, body: bytes, max_parts: int) -> list[tuple[str, Any]]:
    """(field name, bytes or text) of a multipart body's parts, in order."""
    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_parts,
                                                         max_fields=max_parts)
    except StarletteHTTPException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.detail}") from None
    except Exception as exc:  # python-multipart's parser errors
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    parts: list[tuple[str, Any]] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                part_type = media_type(value.content_type)
                if part_type and part_type not in RAW_IMAGE_TYPES:
                    raise ApiError(415, f"part {key!r} is {part_type}; send an image "
                                        "(JPEG, PNG, WebP, HEIC, ...)")
                parts.append((key, await value.read()))
            else:
                parts.append((key, value))
    finally:
        await form.close()
    return parts
