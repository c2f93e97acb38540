"""Split a dataset's training rows among federated clients.

Each partitioner maps ``(data, num_clients, alpha, seed)`` to one sorted
``int64`` array of training-row indices per client. ``iid`` and ``dirichlet``
follow flwr-datasets' partitioners; ``natural`` keeps whole groups (movies, or
the values of a dataset file's ``data.client_column``) together, through
flwr-datasets' ``NaturalIdPartitioner`` when each group is one client.

Start-up must not grow with the federation: every client's rows are computed
in one vectorised pass (10,000 or 100,000 clients take well under a second),
never one flwr-datasets ``load_partition`` call (one Arrow table, milliseconds)
per client. ``iid`` and ``dirichlet`` accept more clients than rows: the
clients beyond them hold no rows, and a round skips them with a note.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from fedpeft.compat.flwr_datasets_internals import dirichlet_assignment
from fedpeft.data.types import TextClassificationData
from fedpeft.errors import ConfigError

Partitioner = Callable[[TextClassificationData, int, float, int], list[np.ndarray]]

# Smallest client a Dirichlet split may produce (lowered when there are too few rows).
MIN_DIRICHLET_CLIENT_SIZE = 10

# Distinct streams for each random choice made here, so that e.g. the
# subsampling does not shift when the partitioning code draws more numbers.
_STREAM_IID, _STREAM_TOP_UP, _STREAM_NATURAL, _STREAM_SUBSAMPLE = range(4)


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *extra]))


def _hf_dataset(labels: np.ndarray, groups: np.ndarray, order: np.ndarray):
    # flwr-datasets partitioners consume a Hugging Face Dataset; an in-memory one
    # needs no hub access. "idx" maps its rows back to our training rows.
    from datasets import Dataset

    return Dataset.from_dict(
        {"label": labels[order], "group": groups[order], "idx": order.astype(np.int64)}
    )


def _load_all(partitioner, dataset, num_clients: int) -> list[np.ndarray]:
    partitioner.dataset = dataset
    return [
        np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)
        for i in range(num_clients)
    ]


def _iid(
    data: TextClassificationData, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    # flwr-datasets' IidPartitioner cuts contiguous shards of the rows it is given,
    # without shuffling (``Dataset.shard(n, i, contiguous=True)``: the first
    # ``rows % n`` shards one row longer), so shuffle first. That cut is exactly
    # ``np.array_split``, which makes every shard in one call instead of one Arrow
    # table per client (tests/test_scale.py checks the two agree).
    order = _rng(seed, _STREAM_IID).permutation(len(data.train_labels))
    return np.array_split(order.astype(np.int64), num_clients)


def _dirichlet(
    data: TextClassificationData, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    order = np.arange(len(data.train_labels))
    dataset = _hf_dataset(data.train_labels, data.train_groups, order)
    # With only two labels and a small alpha, most draws leave some clients
    # empty; flwr-datasets would redraw and give up with ValueError after 10
    # tries. So accept its first draw (min_partition_size=0) and top up small
    # clients below instead.
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=0,
        self_balancing=True,
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The rows load_partition(i) would select, for every client at once.
        assignment = dirichlet_assignment(partitioner)
    parts = [order[np.asarray(assignment[i], dtype=np.int64)] for i in range(num_clients)]
    floor = min(MIN_DIRICHLET_CLIENT_SIZE, len(order) // num_clients)
    return _top_up(parts, floor, _rng(seed, _STREAM_TOP_UP))


def _top_up(parts: list[np.ndarray], floor: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random rows from the largest clients until every client has ``floor`` rows."""
    parts = [np.asarray(part, dtype=np.int64) for part in parts]
    sizes = np.array([len(p) for p in parts], dtype=np.int64)  # kept in step with parts: argmax is one numpy call
    for client in np.flatnonzero(sizes < floor):
        while sizes[client] < floor:
            donor = int(np.argmax(sizes))
            # The donor is above the floor whenever some client is below it,
            # because the total is at least floor * num_clients.
            take = min(floor - sizes[client], sizes[donor] - floor)
            moved = rng.choice(sizes[donor], size=take, replace=False)
            parts[client] = np.concatenate([parts[client], parts[donor][moved]])
            parts[donor] = np.delete(parts[donor], moved)
            sizes[client], sizes[donor] = len(parts[client]), len(parts[donor])
    return parts


def _natural(
    data: TextClassificationData, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    # flwr-datasets' GroupedNaturalIdPartitioner is not used: it takes a number
    # of movies per group, so it yields exactly num_clients partitions only for
    # some values (none between 255 and 507 for 508 movies), balances movie
    # counts rather than review counts, and is not seeded. Instead: shuffle the
    # movies, then hand each to the client with the fewest reviews so far.
    movies, rows_per_movie = np.unique(data.train_groups, return_counts=True)
    if num_clients > len(movies):
        source = f" (distinct values of data.client_column = {data.group_column!r})" if data.group_column else ""
        raise ConfigError(
            f"federation.num_clients: natural partitioning needs at most one client per "
            f"group; {data.name} has {len(movies)} groups{source} in its training split, got {num_clients}"
        )
    if data.group_column and num_clients == len(movies):
        return _natural_ids(data, num_clients)
    sizes = np.zeros(num_clients, dtype=np.int64)
    client_of_movie = np.empty(len(movies), dtype=np.int64)
    for position in _rng(seed, _STREAM_NATURAL).permutation(len(movies)):
        client = int(np.argmin(sizes))
        client_of_movie[position] = client
        sizes[client] += rows_per_movie[position]
    client_of_row = client_of_movie[np.searchsorted(movies, data.train_groups)]
    return [np.flatnonzero(client_of_row == client) for client in range(num_clients)]


def _natural_ids(data: TextClassificationData, num_clients: int) -> list[np.ndarray]:
    """One client per value of the dataset's client column: client ``k`` holds the ``k``-th value in sorted order."""
    from flwr_datasets.partitioner import NaturalIdPartitioner

    order = np.arange(len(data.train_labels))
    dataset = _hf_dataset(data.train_labels, data.train_groups, order)
    # Its tqdm bar cannot be turned off and would land on the CLI's stderr.
    with contextlib.redirect_stderr(io.StringIO()):
        return _load_all(NaturalIdPartitioner(partition_by="group"), dataset, num_clients)


PARTITIONERS: dict[str, Partitioner] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "natural": _natural,
}


def available_partitioners() -> list[str]:
    """Return the valid values of ``data.partition``, sorted."""
    return sorted(PARTITIONERS)


def partition_indices(
    data: TextClassificationData,
    method: str,
    num_clients: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    max_examples_per_client: int | None = None,
) -> list[np.ndarray]:
    """Assign the training rows of ``data`` to ``num_clients`` clients.

    Parameters
    ----------
    data : TextClassificationData
        The dataset; only its training rows are partitioned.
    method : str
        ``"iid"`` (uniform random shards), ``"dirichlet"`` (label skew drawn
        from a Dirichlet with concentration ``alpha``; smaller is more skewed,
        every client gets at least ``min(10, rows // num_clients)`` rows) or
        ``"natural"`` (whole groups, e.g. movies, dealt to clients so that no
        group is split and client sizes stay balanced; for a dataset file
        with ``data.client_column`` and as many clients as groups, one client
        per group through flwr-datasets' ``NaturalIdPartitioner``). Config key
        ``data.partition``.
    num_clients : int
        Number of clients, at least 1 (the centralised reference: all rows);
        ``natural``: at most the number of groups. With ``iid`` and
        ``dirichlet``, clients beyond the number of training rows hold none.
    alpha : float, default 0.5
        Dirichlet concentration, > 0; ignored by the other methods.
    seed : int, default 0
        The result is a pure function of the arguments.
    max_examples_per_client : int or None, default None
        If set, each client keeps a random subsample of at most this many of
        its rows. The subsample depends only on the seed, the client's index
        and its rows, not on other clients.

    Returns
    -------
    list of numpy.ndarray
        One sorted ``int64`` array of training-row indices per client. Without
        ``max_examples_per_client`` the arrays are disjoint and cover every row.

    Raises
    ------
    ConfigError
        For an unknown method or an out-of-range argument; the message names
        the config key.
    """
    if method not in PARTITIONERS:
        raise ConfigError(
            f"data.partition: unknown partition method {method!r}; valid choices: "
            f"{', '.join(available_partitioners())}"
        )
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ConfigError(f"federation.num_clients: must be an integer, got {num_clients!r}")
    if num_clients < 1:
        raise ConfigError(f"federation.num_clients: must be an integer >= 1, got {num_clients}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not (
        math.isfinite(alpha) and alpha > 0
    ):
        raise ConfigError(f"data.alpha: must be a finite number > 0, got {alpha!r}")
    if max_examples_per_client is not None and (
        isinstance(max_examples_per_client, bool)
        or not isinstance(max_examples_per_client, (int, np.integer))
        or max_examples_per_client < 1
    ):
        raise ConfigError(
            f"data.max_examples_per_client: must be an integer >= 1 or unset, "
            f"got {max_examples_per_client!r}"
        )

    parts = PARTITIONERS[method](data, int(num_clients), float(alpha), int(seed))
    if max_examples_per_client is not None:
        limit = int(max_examples_per_client)
        # A generator only for the clients that need one: building 100,000 costs seconds.
        parts = [
            _subsample(part, limit, _rng(int(seed), _STREAM_SUBSAMPLE, client)) if len(part) > limit else part
            for client, part in enumerate(parts)
        ]
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def _subsample(part: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(part) <= limit:
        return part
    return rng.choice(np.sort(part), size=limit, replace=False)


def label_histogram(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_labels: int | None = None
) -> np.ndarray:
    """Count each label on each client.

    Parameters
    ----------
    labels : numpy.ndarray
        Label of every training row.
    parts : sequence of numpy.ndarray
        Row indices per client, as returned by :func:`partition_indices`.
    num_labels : int, optional
        Number of label columns; defaults to ``max(labels) + 1``.

    Returns
    -------
    numpy.ndarray
        ``int64`` array of shape ``(num_clients, num_labels)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if num_labels is None:
        num_labels = int(labels.max()) + 1 if labels.size else 0
    counts = [
        np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_labels)
        for part in parts
    ]
    return np.array(counts, dtype=np.int64).reshape(len(parts), num_labels)
