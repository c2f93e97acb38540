"""What crosses the wire between server and clients: flat numpy arrays in Flower records.

Bytes are counted as the float32 tensor bytes of the arrays sent (what the
papers and the full fine-tuning comparison count), not Flower's per-array
serialisation header of about a hundred bytes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

ARRAYS = "arrays"
CONFIG = "config"
SCALINGS = "scalings"
METRICS = "metrics"


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def scalings_record(scalings: Mapping[str, float]) -> ConfigRecord:
    return ConfigRecord({k: float(v) for k, v in scalings.items()})
