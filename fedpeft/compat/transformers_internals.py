"""The transformers internals fedpeft uses (transformers 5.23): the attention-function registry's local
mapping and a model module's own eager attention.

Batched clients draw each client's attention-dropout mask from its own
random stream (:mod:`fedpeft.training.client_dropout`), which needs the
attention function a model calls to be replaced for a block and then put
back exactly as it was. transformers models look the function up by
``config._attn_implementation`` in ``ALL_ATTENTION_FUNCTIONS`` (its local
mapping first) and fall back to their own module's
``eager_attention_forward`` for ``"eager"``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["attention_function_replaced", "attention_implementation", "eager_attention_function"]


def attention_implementation(net) -> str | None:
    """The attention implementation ``net``'s layers dispatch on (``"sdpa"``, ``"eager"``, ...), None without a config."""
    config = getattr(net, "config", None)
    return None if config is None else getattr(config, "_attn_implementation", None)


def eager_attention_function(module) -> Callable:
    """The ``eager_attention_forward`` of the modeling file attention layer ``module`` comes from."""
    return sys.modules[type(module).__module__].eager_attention_forward


@contextmanager
def attention_function_replaced(impl: str, function: Callable) -> Iterator[Callable | None]:
    """Within the block every model dispatching on ``impl`` calls ``function`` (same signature) instead.

    Yields what those models called before (None for ``"eager"`` when
    nothing registered it: each model's own :func:`eager_attention_function`).
    """
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    missing = object()
    before = local.get(impl, missing)
    previous = ALL_ATTENTION_FUNCTIONS.get(impl)
    local[impl] = function
    try:
        yield previous
    finally:
        if before is missing:
            local.pop(impl, None)
        else:
            local[impl] = before
