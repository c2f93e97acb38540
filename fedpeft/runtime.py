"""Everything a process builds once from the config: data, shards, model, strategy.

Clients (one Ray worker each) and the server each hold one ``Runtime`` per
config for the whole run; Flower messages then only move adapter arrays.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from fedpeft.config import Config, max_rank
from fedpeft.devices import resolve
from fedpeft.validation import build_strategy, data_columns
from fedpeft.data import TextClassificationData, load_dataset, partition_indices
from fedpeft.privacy.dp_sgd import check_private_model
from fedpeft.privacy.plan import DPPlan, make_dp_plan
from fedpeft.models.registry import get_model_spec
from fedpeft.models.resident import ResidentModel, ResidentSpec, resident_model
from fedpeft.training import EncodedSplit, encoded_splits


@dataclass
class Runtime:
    cfg: Config
    data: TextClassificationData
    model: ResidentModel

    @cached_property
    def strategy(self):
        return build_strategy(self.cfg)

    @cached_property
    def splits(self) -> tuple[EncodedSplit, EncodedSplit]:
        key = (self.cfg.data.dataset, self.cfg.data.test_fraction, data_columns(self.cfg), self.model.task,
               self.cfg.model.name, self.cfg.model.max_length)
        return encoded_splits(self.data, self.model.tokenizer, self.cfg.model.max_length, key)

    @cached_property
    def shards(self) -> list[np.ndarray]:
        d = self.cfg.data
        return partition_indices(
            self.data,
            d.partition,
            self.cfg.federation.num_clients,
            alpha=d.alpha,
            seed=self.cfg.federation.seed,
            max_examples_per_client=d.max_examples_per_client or None,
        )

    @cached_property
    def dp_plan(self) -> DPPlan | None:
        """The run's DP plan (noise calibrated here, once per process); None without DP."""
        plan = make_dp_plan(self.cfg, [len(s) for s in self.shards])
        if plan is not None and plan.unit == "sample":
            check_private_model(self.model.model)
        return plan


_RUNTIMES: dict[str, Runtime] = {}
_LOCK = threading.Lock()


def resident_spec(cfg: Config, num_labels: int, device: torch.device | str | None = None) -> ResidentSpec:
    """The resident model ``cfg`` asks for: the model layer takes this, not the whole config.

    ``device`` defaults to ``federation.device`` resolved in this process.
    """
    p, m = cfg.peft, cfg.model
    device = resolve(cfg.federation.device) if device is None else torch.device(device)
    return ResidentSpec(model=m.name, task=m.task, num_labels=num_labels, dropout=m.dropout, pooling=m.pooling,
                        rank=max_rank(cfg), alpha=p.alpha, target_modules=tuple(p.target_modules),
                        lora_dropout=p.dropout, rslora=p.rslora, modules_to_save=tuple(p.modules_to_save),
                        seed=cfg.federation.seed, device=str(device))


def runtime(cfg: Config, threads: int | None = None, device: torch.device | str | None = None) -> Runtime:
    """This process's runtime for ``cfg`` (built on first call), its model on ``device``.

    ``device`` defaults to ``federation.device`` resolved here; a simulated
    client worker passes the device Ray gave it
    (:func:`fedpeft.devices.client_device`).
    """
    device = resolve(cfg.federation.device) if device is None else torch.device(device)
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str) + f"@{device}"
    with _LOCK:
        if key not in _RUNTIMES:
            if threads:
                torch.set_num_threads(threads)
            data = load_dataset(cfg.data.dataset, test_fraction=cfg.data.test_fraction, columns=data_columns(cfg),
                                task=get_model_spec(cfg.model.name, cfg.model.task).task)
            spec = resident_spec(cfg, data.num_labels, device)
            _RUNTIMES[key] = Runtime(cfg=cfg, data=data, model=resident_model(spec))
        return _RUNTIMES[key]


def install_runtime(cfg: Config, data: TextClassificationData) -> Runtime:
    """Make ``data`` (held in memory, not registered) this process's data for ``cfg``.

    For callers that run the real client code on data sets they build
    themselves, such as the empirical audit's canary-in and canary-out
    shards. ``cfg.data.dataset`` must name ``data`` uniquely: it keys the
    per-process token cache.
    """
    device = resolve(cfg.federation.device)
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str) + f"@{device}"
    with _LOCK:
        _RUNTIMES[key] = Runtime(cfg=cfg, data=data, model=resident_model(resident_spec(cfg, data.num_labels)))
        return _RUNTIMES[key]
