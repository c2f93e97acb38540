"""Each client's own dropout masks inside one batched forward pass.

A client training alone seeds the global generator with its seed
(:func:`fedpeft.training.loop.train_steps`), and every dropout of its forward
passes then draws, in module order, a mask the shape of its own batch. In a
stacked batch the K clients' blocks share one tensor: one draw over it would
give each client masks that depend on the other clients. Inside
:meth:`ClientDropout.applied` every dropout runs once per client instead, on
that client's region of the tensor (its real rows and its own padded length:
exactly the tensor it would see alone), under that client's own generator
state, which is carried from draw to draw. Each client therefore draws the
masks it would draw alone, in the same order, and training with dropout on
equals training the clients one after another (tested on the CPU).

Covered: every ``torch.nn.Dropout`` module (the base model's hidden and
classifier dropout, peft's LoRA dropout) on ``(rows, length, ...)`` or
``(rows, features)`` tensors, and attention dropout through transformers'
``sdpa`` and ``eager`` attention functions. Positions outside every
client's region (filler rows, padding past a client's own length) pass
through a dropout unchanged and leave attention as zeros: no real position
reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedpeft.compat.transformers_internals import (attention_function_replaced, attention_implementation,
                                                   eager_attention_function)
from fedpeft.devices import fork_rng


@dataclass(frozen=True)
class BlockLayout:
    """Where each client's micro-batch sits in a stacked batch (:func:`~fedpeft.training.batched.stacked_batch`).

    ``rows`` per client block and ``width`` tokens per row; ``sizes[k]`` is
    client k's (real rows, own padded length), ``(0, 0)`` for a client that
    takes no step.
    """

    rows: int
    width: int
    sizes: tuple[tuple[int, int], ...]

    def regions(self) -> list[tuple[int, slice, int]]:
        """(client, its rows, its length) for every client with rows."""
        return [(k, slice(k * self.rows, k * self.rows + n), t) for k, (n, t) in enumerate(self.sizes) if n > 0]

    @property
    def total_rows(self) -> int:
        return self.rows * len(self.sizes)


class ClientRandomStreams:
    """One global-generator state per client on ``device``, each as ``torch.manual_seed(seed)`` leaves it."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.device = torch.device(device)
        self._states = []
        with fork_rng(self.device):
            for seed in seeds:
                torch.manual_seed(seed)
                self._states.append(self._get())

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextmanager
    def client(self, k: int) -> Iterator[None]:
        """Within the block the device's global generator is client k's; its state moves on with the draws."""
        outer = self._get()
        self._set(self._states[k])
        try:
            yield
        finally:
            self._states[k] = self._get()
            self._set(outer)


class ClientDropout:
    """Per-client dropout streams for batched clients over ``net``, client k seeded with ``seeds[k]``.

    Set :attr:`layout` before each forward pass; run the passes inside
    :meth:`applied`.
    """

    def __init__(self, net: torch.nn.Module, seeds: Sequence[int], device: torch.device | str):
        self.net = net
        self.streams = ClientRandomStreams(seeds, device)
        self.layout: BlockLayout | None = None
        self.dropouts = [m for m in net.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        self._previous_attention: Callable | None = None  # what the model's attention called before applied()

    @contextmanager
    def applied(self) -> Iterator[None]:
        with ExitStack() as stack:
            for module in self.dropouts:
                module.forward = self._dropout_forward(module)
                stack.callback(delattr, module, "forward")  # back to the class's forward
            impl = attention_implementation(self.net)
            if impl is not None:
                self._previous_attention = stack.enter_context(attention_function_replaced(impl, self._attention(impl)))
            yield

    def _current(self) -> BlockLayout:
        if self.layout is None:
            raise RuntimeError("ClientDropout.layout must be set before a forward pass")
        return self.layout

    def _dropout_forward(self, module: torch.nn.Dropout) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not module.training:
                return x
            layout = self._current()
            out = x.clone()
            for k, rows, length in layout.regions():
                index = _region(x, layout, rows, length)
                with self.streams.client(k):
                    out[index] = F.dropout(x[index].contiguous(), module.p, training=True)
            return out

        return forward

    def _attention(self, impl: str) -> Callable:
        def attention(module, query, key, value, attention_mask, dropout: float = 0.0, **kwargs):
            original = self._previous_attention or eager_attention_function(module)
            if dropout == 0:
                return original(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
            if impl not in ("sdpa", "eager"):
                raise ValueError(f"batched clients draw attention dropout per client only with the sdpa or eager "
                                 f"attention implementation; this model uses {impl!r}")
            layout = self._current()
            width = layout.width
            if query.shape[0] != layout.total_rows or query.shape[2] != width:
                raise ValueError(f"attention on queries of shape {tuple(query.shape)} does not match the stacked "
                                 f"batch ({layout.total_rows} rows of {width} tokens)")
            parts = []
            for k, rows, length in layout.regions():
                # (rows, heads, tokens, head_dim) per client, as it would be alone.
                q, kk, v = (t[rows, :, :length] for t in (query, key, value))
                with self.streams.client(k):
                    out, weights = original(module, q, kk, v, _region_mask(attention_mask, rows, length, width),
                                            dropout=dropout, **kwargs)
                parts.append((rows, length, out, weights))
            first_out, first_weights = parts[0][2], parts[0][3]
            # transformers returns (rows, tokens, heads, head_dim) and, when it computes them, weights
            # (rows, heads, tokens, tokens).
            out = first_out.new_zeros((layout.total_rows, width, *first_out.shape[2:]))
            weights = None if first_weights is None else first_weights.new_zeros(
                (layout.total_rows, first_weights.shape[1], width, width))
            for rows, length, o, w in parts:
                out[rows, :length] = o
                if weights is not None:
                    weights[rows, :, :length, :length] = w
            return out, weights

        return attention


def _region(x: torch.Tensor, layout: BlockLayout, rows: slice, length: int) -> tuple[slice, ...]:
    if x.shape[0] != layout.total_rows:
        raise ValueError(f"dropout on a tensor of shape {tuple(x.shape)} does not match the stacked batch "
                         f"({layout.total_rows} rows)")
    if x.dim() >= 3 and x.shape[1] == layout.width:
        return rows, slice(0, length)
    if x.dim() == 2:
        return (rows,)
    raise ValueError(f"dropout on a tensor of shape {tuple(x.shape)}: batched clients draw dropout per client "
                     f"only on (rows, features) or (rows, {layout.width} tokens, ...) tensors")


def _region_mask(mask: torch.Tensor | None, rows: slice, length: int, width: int) -> torch.Tensor | None:
    """A client's part of an attention mask of shape (rows or 1, heads or 1, queries or 1, keys)."""
    if mask is None:
        return None
    if mask.shape[0] > 1:
        mask = mask[rows]
    if mask.shape[-1] == width:
        mask = mask[..., :length]
    if mask.dim() >= 2 and mask.shape[-2] == width:
        mask = mask[..., :length, :]
    return mask
