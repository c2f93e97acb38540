"""LoRA adapters on a frozen base model, and the bridge to the strategies' arrays.

peft owns the adapter: creation, its state dict and its on-disk format. This
module translates between peft's state-dict names and the strategies'
vocabulary (per module ``A``/``B`` factors plus "extras" such as the
classifier head), and guards the rule that only adapter tensors train.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedpeft.errors import ConfigError
from strategies import LoRAFactors, Payload

PREFIX = "base_model.model."
_FACTOR_SUFFIX = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_TASK_TYPES = {"classification": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM}


def attach_lora(model, task: str, r: int, alpha: float, target_modules, dropout: float, rslora: bool, seed: int,
                head_modules=()):
    """Wrap ``model`` in a peft LoRA adapter; the initial factors depend only on ``seed``.

    ``head_modules`` train in full (peft's ``modules_to_save``) and travel with
    the adapter, as a task head must.
    """
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        use_rslora=rslora,
        modules_to_save=list(head_modules) or None,
        task_type=_TASK_TYPES[task],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:  # peft: "Target modules ... not found in the base model"
            raise ConfigError(f"peft.target_modules = {list(target_modules)!r}: {exc}") from None
    embedded = sorted({n.split(".lora_embedding_")[0].removeprefix(PREFIX) for n, _ in peft_model.named_parameters()
                       if ".lora_embedding_" in n})
    if embedded:
        # peft's embedding LoRA has other factor shapes (and, under DP, per-sample
        # gradients of a shared lookup): the strategies' A/B arrays cover Linear layers.
        raise ConfigError(
            f"peft.target_modules = {list(target_modules)!r} adapts the embedding layer {embedded[0]}; "
            "fedpeft's LoRA adapters cover Linear layers only (e.g. query, key, value, dense)"
        )
    assert_only_adapter_trainable(peft_model)
    return peft_model


def assert_only_adapter_trainable(peft_model: PeftModel) -> None:
    """Refuse to train if anything but LoRA factors or the task head needs grad."""
    allowed = ("lora_A", "lora_B", "modules_to_save")
    bad = [n for n, p in peft_model.named_parameters() if p.requires_grad and not any(a in n for a in allowed)]
    if bad:
        raise RuntimeError(f"base-model parameters would train, refusing to run: {bad[:5]}")


def trainable_state(peft_model: PeftModel) -> dict[str, np.ndarray]:
    """peft's own state dict of the trainable tensors, as float32 numpy arrays."""
    return {k: v.detach().cpu().float().numpy().copy() for k, v in get_peft_model_state_dict(peft_model).items()}


def module_scalings(peft_model: PeftModel) -> dict[str, float]:
    """``module -> scaling`` (alpha / r, or alpha / sqrt(r)) of each LoRA layer."""
    out = {}
    for name, module in peft_model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            out[name.removeprefix(PREFIX)] = float(scaling["default"])
    return out


def to_payload(state: Mapping[str, np.ndarray], scalings: Mapping[str, float]) -> Payload:
    """Split peft state-dict arrays into per-module factors and extras."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    extras: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name = key.removeprefix(PREFIX)
        for suffix, part in _FACTOR_SUFFIX.items():
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[part] = value
                break
        else:
            extras[name] = value
    factors = {m: LoRAFactors(A=p["A"], B=p["B"], scaling=scalings[m]) for m, p in parts.items()}
    return Payload(factors=factors, extras=extras)


def to_peft_state(payload: Payload) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_payload` (residuals are not adapter tensors and are left out)."""
    state = {}
    for m, f in payload.factors.items():
        state[f"{PREFIX}{m}.lora_A.weight"] = f.A
        state[f"{PREFIX}{m}.lora_B.weight"] = f.B
    for name, value in payload.extras.items():
        state[PREFIX + name] = value
    return state


def adapter_tensors(peft_model: PeftModel) -> dict[str, torch.nn.Parameter] | None:
    """peft's adapter state dict as the model's own parameters (writing into one writes the model),
    or None where peft hands out copies instead.

    The parameters, not their current tensors: ``model.to(device)`` or
    ``model.double()`` give a parameter new storage, and a tensor found
    before would then write nowhere the model reads.
    """
    live = get_peft_model_state_dict(peft_model)
    by_storage = {p.data_ptr(): p for p in peft_model.parameters()}
    params = {}
    for key, tensor in live.items():
        param = by_storage.get(tensor.data_ptr())
        if param is None or param.shape != tensor.shape:
            return None
        params[key] = param
    return params


def copy_trainable_state(live: Mapping[str, torch.Tensor], state: Mapping[str, np.ndarray]) -> None:
    """Copy arrays into the tensors of :func:`adapter_tensors` in place; every trainable tensor must be given.

    What :func:`load_trainable_state` does, without peft's walk over every
    module and parameter of the base model on each call: the resident model
    swaps a payload in per message, and that walk was most of the swap.
    """
    _check_keys(set(live), state)
    with torch.no_grad():
        for key, value in state.items():
            live[key].copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


def _check_keys(expected: set[str], state: Mapping[str, np.ndarray]) -> None:
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"adapter arrays do not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )


def load_trainable_state(peft_model: PeftModel, state: Mapping[str, np.ndarray]) -> None:
    """Copy arrays into the adapter in place; every trainable tensor must be given."""
    _check_keys(set(get_peft_model_state_dict(peft_model)), state)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    result = set_peft_model_state_dict(peft_model, tensors)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"peft did not place {result.unexpected_keys[:3]}")
