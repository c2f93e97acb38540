"""Write the global model as an adapter folder in peft's own format.

``PeftModel.from_pretrained(base, folder)`` on the same frozen base must give
the model fedpeft evaluated. For rules whose state is only factors and head
this is peft's own ``save_pretrained``. Rules that fold a dense residual into
the base (FedEx-LoRA, FLoRA) have ``W = W0 + R + s B A``, which no rank-r
adapter holds: each module's whole change ``R + s B A`` is then re-factorised
exactly by SVD at its numerical rank (peft's ``rank_pattern``, scaling 1), so
the export stays exact at the price of a larger adapter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fedpeft.models.lora import PREFIX
from fedpeft.models.resident import ResidentModel
from strategies import Payload

RELATIVE_TOL = 1e-6  # singular values below this fraction of the largest are float noise


def exact_factors(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` with ``B @ A == delta`` up to float error, at the numerical rank."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    k = max(1, int(np.sum(s > s[0] * RELATIVE_TOL))) if s[0] > 0 else 1
    root = np.sqrt(s[:k])
    return (root[:, None] * vt[:k]).astype(np.float32), (u[:, :k] * root).astype(np.float32)


def export_adapter(resident: ResidentModel, payload: Payload, target: Path) -> Path:
    """Write ``payload`` (the global model) to ``target`` as a peft adapter folder."""
    resident.set_payload(payload)
    if not payload.residuals:
        resident.model.save_pretrained(target)
        return target
    config = copy.deepcopy(resident.model.peft_config["default"])
    tensors, ranks = {}, {}
    for module, f in payload.factors.items():
        delta = f.delta(np.float64)
        if module in payload.residuals:
            delta = delta + payload.residuals[module]
        A, B = exact_factors(delta)
        ranks[module] = A.shape[0]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.from_numpy(A)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.from_numpy(B)
    for name, value in payload.extras.items():
        tensors[PREFIX + name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    # Anchored patterns, one per module, with alpha = rank so every scaling is 1.
    config.rank_pattern = {f"^{m}$": r for m, r in ranks.items()}
    config.alpha_pattern = {f"^{m}$": float(r) for m, r in ranks.items()}
    config.use_rslora = False
    target.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(target)
    save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    return target
