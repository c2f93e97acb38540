"""Flower internals fedpeft relies on (Flower 1.41), each behind one fedpeft name.

* The central-DP wrappers' private hooks. fedpeft changes three steps of
  Flower's ``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``
  (where the noise goes and where it comes from, and the adaptive norm
  update): Flower calls ``_add_noise_to_aggregated_arrays(arrays)`` after
  aggregating, and the adaptive wrappers ``_noisy_fraction(count, total)``
  and ``_geometric_update(clipped_fraction)`` to move the clipping norm.
  :class:`DPWrapperHooks` routes those calls to public fedpeft methods, and
  :func:`dp_wrapper_class` checks the upstream class still has the hooks
  with the signatures relied on (at import time, so a changed Flower stops
  fedpeft instead of leaving a wrapper whose overrides nobody calls).
* ``Metadata._message_id``: Flower's grids give a message its id as they send
  it (the SuperLink its object id, the in-memory grid a UUID), by writing the
  read-only property's slot; fedpeft's in-process grid does the same with
  :func:`set_message_id`, so replies refer to what they answer.
* ``flwr.supercore.task_identity.TaskIdentity``: Flower stamps every new
  ``Message`` from the process's task identity, which its runtimes set;
  fedpeft's in-process grid and the canary audit play the runtime and set
  it with :func:`set_server_task_identity`.
* ``Array.data`` is the ``np.save`` bytes of the array: :func:`array_numpy`
  reads the values after the header without ``np.load``'s parse of it.
"""

from __future__ import annotations

import inspect

import numpy as np

from flwr.app import ArrayRecord

__all__ = ["DP_WRAPPER_HOOKS", "DPWrapperHooks", "check_dp_wrapper_hooks", "dp_wrapper_class",
           "set_message_id", "set_server_task_identity"]

DP_WRAPPER_HOOKS: dict[str, int] = {
    "_add_noise_to_aggregated_arrays": 1,
    "_noisy_fraction": 2,
    "_geometric_update": 1,
}
"""Each private hook of Flower's DP wrappers and how many arguments (besides self) Flower passes it."""

ADAPTIVE_ONLY = frozenset({"_noisy_fraction", "_geometric_update"})
"""Hooks that only the adaptive-clipping wrappers have."""


class DPWrapperHooks:
    """Mixin placed before a Flower DP wrapper in the MRO: Flower's private hooks call public methods.

    A subclass implements ``add_noise(aggregated_arrays) -> ArrayRecord``
    (the released aggregate: the mean of the clipped uploads plus noise) and,
    for adaptive clipping, ``noisy_clipped_fraction(count, total) -> float``
    and ``update_clipping_norm(clipped_fraction) -> None``.
    """

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        return self.add_noise(aggregated_arrays)

    def _noisy_fraction(self, count: int, total: int) -> float:
        return self.noisy_clipped_fraction(count, total)

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.update_clipping_norm(clipped_fraction)


def check_dp_wrapper_hooks(flower_wrapper: type) -> None:
    """Raise if ``flower_wrapper`` lacks a hook of :data:`DP_WRAPPER_HOOKS` or takes other arguments.

    Raises
    ------
    RuntimeError
        Naming the hook and the Flower class, if the installed Flower
        differs from the pinned one.
    """
    # Flower's public class names say which clipping a wrapper (or a class it extends) does.
    adaptive = any("Adaptive" in cls.__name__ for cls in flower_wrapper.__mro__)
    for name, arity in DP_WRAPPER_HOOKS.items():
        if name in ADAPTIVE_ONLY and not adaptive:
            continue
        method = getattr(flower_wrapper, name, None)
        if method is None:
            raise RuntimeError(f"Flower's {flower_wrapper.__qualname__} has no {name}(): fedpeft's client-level DP "
                               "overrides it (fedpeft/compat/flwr_internals.py); install the pinned flwr version")
        params = [p for p in inspect.signature(method).parameters.values() if p.name != "self"]
        if len(params) != arity or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
            raise RuntimeError(f"Flower's {flower_wrapper.__qualname__}.{name}{inspect.signature(method)} no longer "
                               f"takes {arity} positional argument(s): fedpeft's override would not match "
                               "(fedpeft/compat/flwr_internals.py); install the pinned flwr version")


def dp_wrapper_class(flower_wrapper: type, behaviour: type) -> type:
    """``behaviour`` (a :class:`DPWrapperHooks` subclass) over ``flower_wrapper``, after checking its hooks."""
    if not issubclass(behaviour, DPWrapperHooks):
        raise TypeError(f"{behaviour.__qualname__} must subclass DPWrapperHooks")
    check_dp_wrapper_hooks(flower_wrapper)
    return type(f"Private{flower_wrapper.__name__}", (behaviour, flower_wrapper), {})


def set_server_task_identity() -> None:
    """Stamp new messages as the ServerApp's (task 1, run 0, the SuperLink's node), as Flower's runtimes do."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 0
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def set_message_id(message, message_id: str) -> None:
    """Give ``message`` (a ``flwr.app.Message``) its id, as Flower's grids do when they send it."""
    if "_message_id" not in message.metadata.__dict__:
        raise RuntimeError("Flower's Message metadata keeps no _message_id: fedpeft's in-process grid sets it "
                           "(fedpeft/compat/flwr_internals.py); install the pinned flwr version")
    message.metadata.__dict__["_message_id"] = message_id


_NPY_C_ORDER = b"'fortran_order': False"


def array_numpy(array) -> np.ndarray:
    """``flwr.app.Array.numpy()`` without its ``np.load`` of the whole ``.npy`` buffer.

    Flower stores an array as the bytes ``np.save`` writes: a header, then the
    values. ``np.load`` re-parses that header with ``ast.literal_eval`` for
    every array, which is most of a message's decode time for an adapter of a
    few hundred small tensors. The values are the buffer's last
    ``prod(shape) * itemsize`` bytes in C order when the header says so; the
    array's own ``dtype`` and ``shape`` fields, checked against the header's
    length, say how many. Anything else (Fortran order, an object dtype, a
    buffer of the wrong size) goes through Flower's own decode and its errors.
    """
    data = array.data
    try:
        dtype = np.dtype(array.dtype)
        count = int(np.prod(array.shape, dtype=np.int64))
    except TypeError:
        return array.numpy()
    size = count * dtype.itemsize
    header = data[: len(data) - size]
    if dtype.hasobject or len(data) < size or not header.startswith(b"\x93NUMPY") or _NPY_C_ORDER not in header \
            or not header.endswith(b"\n"):
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(array.shape).copy()
