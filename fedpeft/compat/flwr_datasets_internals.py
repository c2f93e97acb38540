"""flwr-datasets internals fedpeft relies on (flwr-datasets 0.6.1), each behind one fedpeft name.

* ``DirichletPartitioner``'s assignment of rows to partitions. Its public
  ``load_partition(i)`` computes the whole assignment once, then returns
  ``dataset.select(rows_of_i)``: a new Arrow table per call, about 6 ms each,
  so a minute for 10,000 clients and ten for 100,000. fedpeft needs every
  partition's rows at start-up, so it reads the assignment itself
  (:func:`dirichlet_assignment`): the same rows ``load_partition`` would
  select, computed by the same code, in one call.
"""

from __future__ import annotations

__all__ = ["dirichlet_assignment"]


def dirichlet_assignment(partitioner) -> dict[int, list[int]]:
    """Partition id -> row positions of ``partitioner`` (a ``DirichletPartitioner`` with its dataset set).

    Raises
    ------
    RuntimeError
        If the installed flwr-datasets no longer keeps the assignment where
        the pinned version does.
    """
    determine = getattr(partitioner, "_determine_partition_id_to_indices_if_needed", None)
    if determine is None:
        raise RuntimeError("flwr-datasets' DirichletPartitioner has no _determine_partition_id_to_indices_if_needed(): "
                           "fedpeft reads its assignment (fedpeft/compat/flwr_datasets_internals.py); install the "
                           "pinned flwr-datasets version")
    determine()
    assignment = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(assignment, dict):
        raise RuntimeError("flwr-datasets' DirichletPartitioner keeps no _partition_id_to_indices dict: fedpeft reads "
                           "its assignment (fedpeft/compat/flwr_datasets_internals.py); install the pinned "
                           "flwr-datasets version")
    return assignment
