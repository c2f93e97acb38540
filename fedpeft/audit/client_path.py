"""Canary audit of sample-level DP through the real client: the ClientApp's train handler, replayed by the server.

The canary audits of :mod:`fedpeft.audit.empirical` check the DP-SGD pieces
on a model built for tightness. This one checks what a ``fedpeft run``
client actually sends: each trial is one train message to the real
``ClientApp`` (:func:`fedpeft.client.app.make_client_app`, through the
in-process grid), holding either the world with the canary or the world
where an ordinary example takes its place (replace-one, the relation
fedpeft's sample-level accountant claims). The model is the tiny random
BERT, so thousands of trials take a minute; the code path is the one every
model takes.

The adversary is the strongest honest-but-curious server: it knows the
code, the config (``federation.seed`` included) and both worlds, and it
replays the client's train handler on each with every public value. If the
client's randomness followed from public values, one replay would equal the
upload bit for bit and the test would be perfect. It also scores the
upload's step against the canary's clipped gradient, and picks the stronger
test on the first half of the trials.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from fedpeft.audit.empirical import EmpiricalAudit, _ceiling, best_test
from fedpeft.config import Config, DataConfig, DPConfig, FederationConfig, ModelConfig, TrainConfig
from fedpeft.data.types import TextClassificationData
from fedpeft.privacy.report import PrivacyReport

__all__ = ["client_path_audit"]

CANARY = "zyzzyva quixotic xylophone"
"""The canary's text: rare word pieces that ordinary reviews do not share."""
ORDINARY = ["a fine film", "dull and far too long", "the cast is superb", "i wanted to leave", "warm and funny",
            "a mess from start to end", "quietly moving", "nothing works here"]


def _world(name: str, texts: list[str], labels: list[int]) -> TextClassificationData:
    return TextClassificationData(name=name, label_names=("rotten", "fresh"), train_texts=tuple(texts),
                                  train_labels=np.asarray(labels), train_groups=np.zeros(len(texts)),
                                  test_texts=("a film",), test_labels=np.asarray([0]))


def client_path_audit(noise_multiplier: float, max_grad_norm: float, *, steps: int = 1, trials: int = 400,
                      delta: float = 1e-5, confidence: float = 0.95, others: int = 3, lr: float = 0.05,
                      seed: int = 0, claimed_noise_multiplier: float | None = None,
                      device: str = "auto") -> EmpiricalAudit:
    """Canary audit of one client round of ``fedpeft run`` under ``dp.mode = "sample"``.

    Parameters
    ----------
    noise_multiplier, max_grad_norm : float
        The client's DP-SGD (sigma and per-example clipping norm C).
    steps : int
        ``train.local_steps`` of the round.
    trials : int
        Trials with the canary, and as many with its replacement.
    delta, confidence
        Of the reported epsilons.
    others : int
        Ordinary examples the client holds besides the canary's slot. The
        batch size is ``others + 1`` (q = 1), so every step sees the slot.
    lr : float
        ``train.lr`` (AdamW).
    seed : int
        ``federation.seed``: public, and known to the adversary.
    claimed_noise_multiplier : float, optional
        Account for this sigma instead (a deliberately wrong claim, for tests).
    device : str
        ``federation.device`` of the client (its model, batches and noise).
    """
    from flwr.app import ConfigRecord, Context, MessageType, RecordDict

    from fedpeft.client.app import make_client_app
    from fedpeft.privacy.accountants import compute_epsilon
    from fedpeft.runtime import install_runtime
    from fedpeft.server.flower_strategy import payload_message
    from fedpeft.server.inprocess_grid import InProcessGrid
    from fedpeft.wire import ARRAYS, DP_SAMPLE_RATE, from_array_record

    labels = [i % 2 for i in range(others)] + [0]
    base = Config(
        federation=FederationConfig(num_clients=1, seed=seed, engine="inprocess", name="client-path-audit",
                                    device=device),
        data=DataConfig(partition="iid"),
        model=ModelConfig(name="tiny-bert", max_length=16, dropout=0.0),
        train=TrainConfig(local_steps=steps, batch_size=others + 1, lr=lr),
        dp=DPConfig(mode="sample", accountant="pld", noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                    delta=delta),
    )
    worlds = {}
    for present, last in ((True, CANARY), (False, ORDINARY[-1])):
        name = f"client-path-audit-{'canary' if present else 'replacement'}-{others}"
        cfg = replace(base, data=replace(base.data, dataset=name))
        rt = install_runtime(cfg, _world(name, ORDINARY[:others] + [last], labels))
        worlds[present] = (cfg, rt)
    _, rt = worlds[True]
    initial = rt.model.initial
    apps = {present: InProcessGrid(make_client_app(cfg), 1).client_app for present, (cfg, _) in worlds.items()}

    def upload(present: bool, server_round: int) -> dict[str, np.ndarray]:
        """One train message to a fresh client node holding ``present``'s world."""
        # The batch is the whole shard: q = 1, as a DP plan for this one client would send.
        config = ConfigRecord({"server-round": server_round, "dp-noise-multiplier": float(noise_multiplier),
                               DP_SAMPLE_RATE: 1.0, "dp-prior-steps": 0})
        msg = payload_message(initial, config, MessageType.TRAIN, 1)
        context = Context(run_id=0, node_id=1, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                          run_config={})
        return from_array_record(apps[present](msg, context).content[ARRAYS])

    sent = initial.arrays()
    direction = _canary_direction(worlds, sent, max_grad_norm)

    def scores(present: bool, server_round: int) -> tuple[float, float]:
        got = upload(present, server_round)
        replay_in, replay_out = upload(True, server_round), upload(False, server_round)
        dist = {k: 0.0 for k in ("in", "out")}
        step = 0.0
        for key, value in got.items():
            dist["in"] += float(((value - replay_in[key]) ** 2).sum())
            dist["out"] += float(((value - replay_out[key]) ** 2).sum())
            if key in direction:
                step += float(((sent[key] - value) * direction[key]).sum())  # a step down the canary's gradient
        return step, dist["out"] - dist["in"]

    with torch.random.fork_rng(devices=[]):
        t_in = np.array([scores(True, 2 * i + 1) for i in range(trials)])
        t_out = np.array([scores(False, 2 * i + 2) for i in range(trials)])
    candidates = {"canary gradient step": (t_in[:, 0], t_out[:, 0]), "exact replay": (t_in[:, 1], t_out[:, 1])}
    lower, threshold, fp, fn, test = best_test(candidates, delta, confidence)
    claimed = noise_multiplier if claimed_noise_multiplier is None else claimed_noise_multiplier
    eps = compute_epsilon(claimed, 1.0, steps, delta, "pld", "replace-one") if claimed > 0 else math.inf
    claim = PrivacyReport("sample", "pld (replace-one)", delta, float(claimed), 1.0, steps, float(eps),
                          ((float(claimed), 1.0, steps),), relation="replace-one")
    return EmpiricalAudit(claim, lower, confidence, noise_multiplier, max_grad_norm, trials, threshold, fp, fn,
                          _ceiling(trials, delta, confidence),
                          f"one client round of the real ClientApp (tiny BERT, LoRA + head): {steps} DP-SGD step(s), "
                          f"q = 1, {others} other examples; canary / ordinary example in its slot (replace-one)",
                          test=test)


def _canary_direction(worlds, sent: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    """Clipped gradient of the canary minus that of its replacement, at the sent weights, per array key."""
    from fedpeft.privacy.dp_sgd import per_sample_loss
    from strategies import Payload

    grads = {}
    for present, (_, rt) in worlds.items():
        model = rt.model
        model.set_payload(Payload.from_arrays(sent, model.initial.scalings()))
        split, _ = rt.splits
        batch = split.batch([len(split) - 1], "classification", model.device)
        params = {n: p for n, p in model.model.named_parameters() if p.requires_grad}
        model.model.zero_grad(set_to_none=True)
        logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_sample_loss(logits, batch, "classification").sum().backward()
        norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params.values() if p.grad is not None))
        scale = min(1.0, clip / max(norm, 1e-12))
        for p in params.values():
            if p.grad is not None:
                p.grad.mul_(scale)
        # The gradients as payload arrays: read them through the model's own payload view.
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
        grads[present] = model.payload().arrays()
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
                p.grad = None
    return {k: grads[True][k] - grads[False][k] for k in grads[True] if k in sent}
