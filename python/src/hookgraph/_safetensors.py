"""A small safetensors reader into numpy (the format: an 8-byte little-endian header
length, a JSON header of name -> dtype, shape, offsets, and `__metadata__`, then the raw
little-endian data). Reading it here saves a dependency on the `safetensors` package.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def read(
    path: Path, names: Optional[Iterable[str]] = None
) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Every tensor (or those in `names`) as an in-memory numpy array, and the metadata."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    wanted = None if names is None else set(names)
    out: Dict[str, np.ndarray] = {}
    for name, info in header.items():
        if wanted is not None and name not in wanted:
            continue
        start, end = info["data_offsets"]
        dt = np.dtype(DTYPES[info["dtype"]])
        arr = np.frombuffer(data, dtype=dt, count=(end - start) // dt.itemsize, offset=base + start)
        out[name] = arr.reshape(info["shape"]).copy()
    return out, meta
