"""Large arguments between deployments travel through Ray's object store, not inside the call.

With ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (what ``faceage up`` runs) Serve sends handle calls
over gRPC, whose messages stop at ``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`` (4 MiB unless
set): a 12-megapixel photo or the crops of 90 faces failed the call. Sent by reference they
pass whatever the transport, and faster: a 12 MB body took 13.7 ms through the object store
against 90 ms inline over gRPC with its limit raised (bench/serve_hop.py, docs/serve.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

# Smaller payloads go inline: below about 1 MiB a put and a get cost more than they save.
INLINE_BYTES = 1 << 20


@dataclass(frozen=True)
class Stored:
    """A payload left in the object store: a reference nested in an argument, which Ray
    passes on unresolved (the receiver borrows it)."""

    ref: ray.ObjectRef
    nbytes: int


def pack(value: Any, inline_bytes: int = INLINE_BYTES) -> Any:
    """``value`` (bytes or an array) as it should cross a handle call: itself when small, a
    ``Stored`` reference when larger than ``inline_bytes``."""
    size = value.nbytes if isinstance(value, np.ndarray) else len(value)
    return value if size <= inline_bytes else Stored(ray.put(value), size)


async def unpack(value: Any) -> Any:
    """What ``pack`` was given."""
    return await value.ref if isinstance(value, Stored) else value
