"""The object codec for control messages: JSON with numpy arrays as base64, never pickle, so a peer's bytes are
only ever parsed, never executed."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

_NDARRAY = "__ndarray__"  # the one key of the JSON object that stands for an array: [dtype, shape, base64 bytes]


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):  # tobytes: C order whatever the layout (ascontiguousarray would make 0-d 1-d)
        return {_NDARRAY: [obj.dtype.str, list(obj.shape), base64.b64encode(obj.tobytes()).decode("ascii")]}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send an object of type {type(obj).__name__} (JSON values and numpy arrays only)")


def _hook(d: dict) -> Any:
    if len(d) == 1 and _NDARRAY in d:
        dtype, shape, data = d[_NDARRAY]
        return np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype)).reshape(shape).copy()
    return d


def encode_object(obj: Any) -> bytes:
    """JSON values and numpy arrays (any dtype and shape, NaN and infinities included) as UTF-8 bytes; anything
    else raises TypeError."""
    return json.dumps(obj, default=_default, allow_nan=True).encode("utf-8")


def decode_object(data: bytes | bytearray) -> Any:
    """The object :func:`encode_object` encoded (arrays come back writable, with their dtype and shape)."""
    return json.loads(data.decode("utf-8"), object_hook=_hook)
