"""What crosses the wire between server and clients: flat numpy arrays in Flower records.

Bytes are counted as the float32 tensor bytes of the arrays sent (what the
papers and the full fine-tuning comparison count), not Flower's per-array
serialisation header of about a hundred bytes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedpeft.compat.flwr_internals import array_numpy

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Keys inside those records. Flower's own strategies read the first two.
SERVER_ROUND = "server-round"
"""ConfigRecord key: the round a train or evaluate message belongs to."""
NUM_EXAMPLES = "num-examples"
"""MetricRecord key: the examples behind a reply (Flower's default ``weighted_by_key``)."""
PARTITION_ID = "partition-id"
"""``Context.node_config`` key and reply metric: the fedpeft client id (of the node, or of the message's client)."""
CLIENT_ID = "client-id"
"""ConfigRecord key of train and evaluate messages: the fedpeft client the receiving node runs the message as.
Nodes are executors and clients are data, so a few nodes serve any number of clients; a message without it
runs as its node's ``partition-id`` (``flwr run .`` with one SuperNode per client)."""
ATTEMPT = "attempt"
"""ConfigRecord key of train messages: which try of the round this is (0, then 1.. when a round with too few
answers is run again with a fresh sample; ``federation.round_retries``)."""
NUM_CLIENTS = "num-clients"
"""Query reply metric: the clients the node's config partitions the data into (the server checks it is its own)."""
STEPS = "steps"
"""MetricRecord key: the local optimiser steps a client took."""
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
"""ConfigRecord key (sample-level DP): the plan's noise multiplier sigma."""
DP_PRIOR_STEPS = "dp-prior-steps"
"""ConfigRecord key (sample-level DP): the DP-SGD steps the server has on record for the client."""
DP_EPSILON = "dp-epsilon"
"""MetricRecord key (sample-level DP): the client's epsilon after this round."""
DP_STEPS = "dp-steps"
"""MetricRecord key (sample-level DP): the client's DP-SGD steps after this round."""
DP_SAMPLE_RATE = "dp-sample-rate"
"""Train-config key: the client's Poisson rate q from the DP plan (sample-level DP). The plan is
the one source of q: a client that computed its own could disagree and silently break the accounting."""
SCALING_PREFIX = "scaling/"
"""Config keys ``scaling/<module>`` carry each module's LoRA scaling. They share the
one ConfigRecord of a message because Flower's DP client mods require exactly one."""


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: array_numpy(v) for k, v in record.items()}


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def payload_config(config: Mapping, scalings: Mapping[str, float]) -> ConfigRecord:
    """``config`` plus the payload's scalings, as the message's single ConfigRecord."""
    return ConfigRecord({**dict(config), **{SCALING_PREFIX + k: float(v) for k, v in scalings.items()}})


def scalings_of(config: Mapping) -> dict[str, float]:
    """The scalings a :func:`payload_config` record carries."""
    return {k[len(SCALING_PREFIX):]: float(v) for k, v in config.items() if k.startswith(SCALING_PREFIX)}
