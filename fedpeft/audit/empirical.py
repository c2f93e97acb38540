"""Empirical privacy: an epsilon lower bound from canary membership tests, beside the accountant's epsilon.

(epsilon, delta)-DP bounds every membership test: with false-positive rate
FPR and false-negative rate FNR,
``epsilon >= max(ln((1 - delta - FNR) / FPR), ln((1 - delta - FPR) / FNR))``
(Jagielski et al. 2020; Nasr et al. 2021). Plugging in Clopper-Pearson upper
bounds of both rates, measured over many independent trials, gives a lower
bound that holds with the stated confidence. It can never exceed the true
epsilon, so a lower bound above the accountant's epsilon means a DP bug.

Two audits, each of one release of fedpeft's own mechanism:

* **sample level**: a canary example is inserted into or left out of a
  victim's data (add/remove, as opacus's accountant assumes), the victim runs
  DP-SGD through :func:`fedpeft.audit.dp.dp_upload` (opacus clipping and
  noise via :mod:`fedpeft.privacy.dp_sgd`), and the score is the upload's
  projection on the canary's gradient. The model is a cheap one (frozen
  one-hot token features, a bias-free linear head) built so that the canary's
  gradient has its own coordinates: the test is then the optimal one and the
  audit close to tight.
* **client level** (Andrew et al. 2024): canary clients upload random
  directions; a canary replaces one client of the round or is held out, the
  round's uploads are clipped (Flower's FlatClip) and averaged, the server
  adds its noise with fedpeft's central-DP wrapper
  (:func:`fedpeft.privacy.client_level.wrap_client_dp`), and the score is the
  cosine between the canary and the released aggregate. Accounted with
  :func:`fedpeft.privacy.accountants.client_level_epsilon` (replace-one).

In both, half of the trials choose the score threshold and the other half
measure FPR and FNR, so the interval is not biased by the choice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from scipy.stats import beta

from fedpeft.privacy.report import PrivacyReport

__all__ = ["clopper_pearson_upper", "epsilon_lower_bound", "EmpiricalAudit", "audit_scores", "sample_level_audit",
           "client_level_audit"]


def clopper_pearson_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound (level ``1 - alpha``) on a rate seen as ``errors`` of ``trials``."""
    if trials <= 0:
        return 1.0
    if errors >= trials:
        return 1.0
    return float(beta.ppf(1.0 - alpha, errors + 1, trials - errors))


def epsilon_lower_bound(false_pos: int, negatives: int, false_neg: int, positives: int, delta: float,
                        confidence: float = 0.95) -> float:
    """Epsilon lower bound of one threshold test at ``confidence`` (0 when the test shows nothing).

    The two rates' upper bounds each take half of ``1 - confidence`` (a union
    bound), so the pair holds jointly at ``confidence``.
    """
    alpha = (1.0 - confidence) / 2.0
    fpr = clopper_pearson_upper(false_pos, negatives, alpha)
    fnr = clopper_pearson_upper(false_neg, positives, alpha)
    best = 0.0
    for miss, false in ((fnr, fpr), (fpr, fnr)):
        if 1.0 - delta - miss > 0.0 and false > 0.0:
            best = max(best, math.log((1.0 - delta - miss) / false))
    return best


@dataclass(frozen=True)
class EmpiricalAudit:
    """The result of one canary audit.

    Attributes
    ----------
    claim : fedpeft.privacy.PrivacyReport
        The accountant's guarantee for the same release (its epsilon is inf
        without noise): unit, accountant, delta, relation. Its noise
        multiplier is the one claimed, which a test may set apart from the
        one run.
    epsilon_lower : float
        The empirical lower bound at ``confidence``.
    confidence : float
    noise_multiplier, clipping_norm : float
        The mechanism run.
    trials : int
        Trials per side (canary in / canary out).
    threshold : float
        The score threshold chosen on the first half.
    false_pos, false_neg : int
        Errors on the held-out half (``trials - trials // 2`` per side).
    max_lower : float
        The largest lower bound these many trials can give (no errors at
        all): the ceiling of the audit, however weak the protection.
    details : str
        The release: steps, sample rate, clients.
    test : str
        The membership test the adversary chose on the first half of the
        trials (see :data:`ADVERSARY`).
    """

    claim: PrivacyReport
    epsilon_lower: float
    confidence: float
    noise_multiplier: float
    clipping_norm: float
    trials: int
    threshold: float
    false_pos: int
    false_neg: int
    max_lower: float
    details: str
    test: str = "score"

    @property
    def unit(self) -> str:
        return self.claim.unit

    @property
    def epsilon_accountant(self) -> float:
        """The accountant's epsilon of the release (the claim's)."""
        return self.claim.epsilon

    @property
    def accountant(self) -> str:
        return self.claim.accountant

    @property
    def delta(self) -> float:
        return self.claim.delta

    @property
    def relation(self) -> str:
        """The neighbouring relation of the two worlds and of the accountant's epsilon."""
        return self.claim.relation

    @property
    def has_power(self) -> bool:
        """Whether these many trials could show a bound above the accountant's epsilon at all."""
        return self.max_lower > self.epsilon_accountant

    def to_dict(self) -> dict[str, Any]:
        """``audit.json``'s ``empirical`` block."""
        return {
            "unit": self.unit,
            "epsilon_lower": self.epsilon_lower,
            "epsilon_accountant": self.epsilon_accountant,
            "accountant": self.accountant,
            "delta": self.delta,
            "confidence": self.confidence,
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "trials": self.trials,
            "threshold": self.threshold,
            "false_pos": self.false_pos,
            "false_neg": self.false_neg,
            "max_lower": self.max_lower,
            "details": self.details,
            "test": self.test,
            "relation": self.relation,
            "has_power": self.has_power,
            "adversary": ADVERSARY,
        }


ADVERSARY = ("an honest-but-curious server that knows the code, the config, every trial's public seed and both "
             "candidate data sets: it replays the mechanism with every public value (exact-replay test), and also "
             "scores the release against the canary; it picks the stronger test on the first half of the trials")


def audit_scores(scores_in: np.ndarray, scores_out: np.ndarray, delta: float, confidence: float = 0.95) -> tuple[float, float, int, int]:
    """``(epsilon lower bound, threshold, false positives, false negatives)`` of "in if score > threshold".

    The threshold maximises the bound on the first half of each side's
    trials; the bound is measured on the second half.
    """
    lower, threshold, fp, fn, _ = best_test({"score": (scores_in, scores_out)}, delta, confidence)
    return lower, threshold, fp, fn


def best_test(candidates: dict[str, tuple[np.ndarray, np.ndarray]], delta: float,
              confidence: float = 0.95) -> tuple[float, float, int, int, str]:
    """The strongest of several membership tests: ``(lower bound, threshold, FP, FN, test name)``.

    ``candidates`` maps a test's name to its ``(scores_in, scores_out)``,
    one score per trial, in trial order. The test and its threshold are
    chosen on the first half of each side's trials (the adversary may try
    every test it knows); the bound is measured on the second half only, so
    the choice does not bias it.
    """
    best: tuple[float, float, str] | None = None
    for name, (scores_in, scores_out) in candidates.items():
        scores_in, scores_out = np.asarray(scores_in, dtype=np.float64), np.asarray(scores_out, dtype=np.float64)
        cal_in, cal_out = scores_in[: len(scores_in) // 2], scores_out[: len(scores_out) // 2]
        candidates_t = np.unique(np.concatenate([cal_in, cal_out]))
        for t in candidates_t if len(candidates_t) else [0.0]:
            fp, fn = int((cal_out > t).sum()), int((cal_in <= t).sum())
            value = epsilon_lower_bound(fp, len(cal_out), fn, len(cal_in), delta, confidence)
            if best is None or value > best[0]:
                best = (value, float(t), name)
    assert best is not None, "best_test needs at least one candidate"
    _, threshold, name = best
    scores_in, scores_out = (np.asarray(a, dtype=np.float64) for a in candidates[name])
    ev_in, ev_out = scores_in[len(scores_in) // 2:], scores_out[len(scores_out) // 2:]
    fp, fn = int((ev_out > threshold).sum()), int((ev_in <= threshold).sum())
    return epsilon_lower_bound(fp, len(ev_out), fn, len(ev_in), delta, confidence), threshold, fp, fn, name


def _ceiling(trials: int, delta: float, confidence: float) -> float:
    held_out = trials - trials // 2
    return epsilon_lower_bound(0, held_out, 0, held_out, delta, confidence)


# --- sample level -----------------------------------------------------------------


class _Output(SimpleNamespace):
    """What a transformers model returns, as far as fedpeft's DP code reads it."""


class CanaryModel(torch.nn.Module):
    """A cheap classifier with the interface of a transformers model.

    Frozen one-hot token features (mean over the attention mask) into a
    bias-free linear head. Token ``vocab - 1`` is the canary's: its feature is
    ``canary_scale`` times a one-hot, so its gradient lives in a column no
    other example touches and its norm exceeds any sensible clipping norm.
    """

    def __init__(self, vocab: int = 16, num_labels: int = 2, canary_scale: float = 100.0):
        super().__init__()
        table = torch.eye(vocab)
        table[-1] *= canary_scale
        self.features = torch.nn.Embedding.from_pretrained(table, freeze=True)
        self.head = torch.nn.Linear(vocab, num_labels, bias=False)
        torch.nn.init.zeros_(self.head.weight)

    def forward(self, input_ids, attention_mask, position_ids=None):
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.features(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return _Output(logits=self.head(pooled))


def sample_level_audit(noise_multiplier: float, max_grad_norm: float, *, steps: int = 1, trials: int = 1000,
                       delta: float = 1e-5, accountant: str = "rdp", confidence: float = 0.95, others: int = 3,
                       lr: float = 1e-3, seed: int = 0, claimed_noise_multiplier: float | None = None) -> EmpiricalAudit:
    """Canary audit of the victim's DP-SGD (one round of ``steps`` steps, every example each step).

    Parameters
    ----------
    noise_multiplier, max_grad_norm : float
        The mechanism the victim runs.
    steps : int
        DP-SGD steps of the round (the canary takes part in each).
    trials : int
        Trials with the canary and as many without.
    delta, accountant, confidence
        Of the reported epsilons.
    others : int
        Ordinary examples the victim holds besides the canary.
    lr : float
        The victim's learning rate (small, so the canary's gradient stays clipped).
    seed : int
        Seeds every trial's noise.
    claimed_noise_multiplier : float, optional
        Account for this sigma instead of the one run: a deliberately wrong
        claim that the audit should catch (for tests).
    """
    from fedpeft.audit.dp import dp_upload
    from fedpeft.privacy.accountants import compute_epsilon
    from fedpeft.privacy.dp_sgd import DPSGD

    model = CanaryModel()
    vocab = model.features.num_embeddings
    # A constant divisor: dividing by the data set's own size would leak the canary by itself.
    upload = dp_upload(DPSGD(noise_multiplier, max_grad_norm, 1.0), expected_batch_size=others + 1)
    rng = np.random.default_rng(seed)
    regular = [torch.as_tensor(rng.integers(0, vocab - 1, size=4)) for _ in range(others)]
    canary = torch.tensor([vocab - 1] * 4)
    # With two labels the canary's gradient column is (p - onehot(y)) * scale: direction (-1, 1) for label 0, always.
    direction = torch.zeros(2, vocab)
    direction[:, -1] = torch.tensor([-1.0, 1.0]) / math.sqrt(2.0)

    def release(batch, trial_seed: int) -> np.ndarray:
        result = upload(model, batch, lr=lr, local_steps=steps, optimizer="sgd", seed=trial_seed)
        return -(result.after["head.weight"] - model.head.weight.detach().numpy()) / lr  # sum of the private gradients

    def scores(with_canary: bool, trial_seed: int) -> tuple[float, float]:
        labels = rng.integers(0, 2, size=len(regular)).tolist()
        worlds = {}
        for present in (True, False):
            rows = regular + ([canary] if present else [])
            worlds[present] = {"input_ids": torch.stack(rows), "attention_mask": torch.ones(len(rows), 4, dtype=torch.int64),
                               "labels": torch.as_tensor(labels + ([0] if present else []))}
        moved = release(worlds[with_canary], trial_seed)
        # The replaying server: the same code, the same public seed, both worlds.
        replay_in, replay_out = release(worlds[True], trial_seed), release(worlds[False], trial_seed)
        replay = float(((moved - replay_out) ** 2).sum() - ((moved - replay_in) ** 2).sum())
        return float((torch.as_tensor(moved) * direction).sum()), replay

    with torch.random.fork_rng(devices=[]):
        t_in = np.array([scores(True, seed * 1_000_003 + 2 * i) for i in range(trials)])
        t_out = np.array([scores(False, seed * 1_000_003 + 2 * i + 1) for i in range(trials)])
    candidates = {"canary projection": (t_in[:, 0], t_out[:, 0]), "exact replay": (t_in[:, 1], t_out[:, 1])}
    lower, threshold, fp, fn, test = best_test(candidates, delta, confidence)
    ceiling = _ceiling(trials, delta, confidence)
    claimed = noise_multiplier if claimed_noise_multiplier is None else claimed_noise_multiplier
    eps = compute_epsilon(claimed, 1.0, steps, delta, accountant) if claimed > 0 else math.inf
    claim = PrivacyReport("sample", accountant, delta, float(claimed), 1.0, steps, float(eps),
                          ((float(claimed), 1.0, steps),), relation="add-remove")
    return EmpiricalAudit(claim, lower, confidence, noise_multiplier, max_grad_norm, trials, threshold, fp, fn, ceiling,
                          f"one victim round: {steps} DP-SGD step(s), q = 1, {others} other examples, "
                          "canary inserted / left out (add-remove; the divisor is a constant)", test=test)


# --- client level -----------------------------------------------------------------


def client_level_audit(noise_multiplier: float, clipping_norm: float, *, num_clients: int = 10, clients_per_round: int = 10,
                       trials: int = 1000, dim: int = 2048, delta: float = 1e-5, confidence: float = 0.95, seed: int = 0,
                       claimed_noise_multiplier: float | None = None) -> EmpiricalAudit:
    """Canary-client audit of one round of central DP (Andrew et al.'s random-direction canaries).

    Each trial is one round ``r`` of fedpeft's server: ``num_clients``
    uploads of dimension ``dim`` (random directions of random norm around
    ``clipping_norm``); in a canary trial the last client's upload is a
    canary, a random direction of norm ``10 * clipping_norm`` (replace-one).
    The server draws the round's clients as fedpeft's does under client-level
    DP (:func:`fedpeft.sampling.secret_sample_clients`), and the
    replies go through the real server-side wrapper
    (:func:`fedpeft.privacy.client_level.wrap_client_dp` around Flower's
    FedAvg: clipping, mean, secret noise). The adversary knows the code and
    every public value: it scores the cosine of the released aggregate with
    the canary, and also replays the server with the public values (its
    sampling and its noise, on an all-zero round) to subtract that noise and
    to skip rounds it believes the canary missed. In a held-out trial the
    canary it scores never took part. Parameters as in :func:`sample_level_audit`.
    """
    from flwr.serverapp.strategy import FedAvg

    from fedpeft.compat.flwr_internals import set_server_task_identity
    from fedpeft.privacy.accountants import client_level_epsilon
    from fedpeft.privacy.client_level import wrap_client_dp
    from fedpeft.privacy.secret import OS_SECRET
    from fedpeft.sampling import secret_sample_clients

    dp = SimpleNamespace(clip_on="server", clipping="fixed", max_grad_norm=clipping_norm)
    rng = np.random.default_rng([seed, 4242])
    start = np.zeros(dim, dtype=np.float32)

    def server_round(uploads: np.ndarray, r: int) -> tuple[list[int], np.ndarray]:
        """One round of the real server path: who was sampled, and the released aggregate."""
        server = wrap_client_dp(FedAvg(), dp, noise_multiplier, clients_per_round, ["update"], OS_SECRET)
        chosen = secret_sample_clients(num_clients, clients_per_round, OS_SECRET, r)
        return chosen, _wrapper_release(server, r, start, [uploads[i].astype(np.float32) for i in chosen])

    def unit(n: int) -> np.ndarray:
        v = rng.normal(size=(n, dim))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))

    def scores(with_canary: bool, r: int) -> tuple[float, float, float]:
        without = unit(num_clients) * clipping_norm * rng.uniform(0.5, 2.0, size=(num_clients, 1))
        canary = unit(1)[0]
        uploads = without.copy()
        if with_canary:
            uploads[-1] = 10.0 * clipping_norm * canary  # replace-one: the canary takes a client's place
        _, released = server_round(uploads, r)
        # The replaying adversary: the same server code and public values, in the world without the canary.
        believed, replay = server_round(without, r)
        difference = cosine(released - replay, canary)
        return cosine(released, canary), difference, difference if num_clients - 1 in believed else -2.0

    set_server_task_identity()
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # Flower logs every clipping and aggregation at INFO
    try:
        t_in = np.array([scores(True, 2 * i + 1) for i in range(trials)])
        t_out = np.array([scores(False, 2 * i + 2) for i in range(trials)])
    finally:
        flwr_log.setLevel(level)
    candidates = {"canary cosine": (t_in[:, 0], t_out[:, 0]), "replay difference": (t_in[:, 1], t_out[:, 1]),
                  "replay difference and sampling": (t_in[:, 2], t_out[:, 2])}
    lower, threshold, fp, fn, test = best_test(candidates, delta, confidence)
    ceiling = _ceiling(trials, delta, confidence)
    claimed = noise_multiplier if claimed_noise_multiplier is None else claimed_noise_multiplier
    eps = client_level_epsilon(float(claimed), num_clients, clients_per_round, 1, delta)
    rate = clients_per_round / num_clients
    claim = PrivacyReport("client", "rdp (replace-one, sampled without replacement)", delta, float(claimed), rate, 1,
                          float(eps), ((float(claimed), rate, 1),), relation="replace-one client")
    return EmpiricalAudit(claim, lower, confidence, noise_multiplier, clipping_norm, trials, threshold, fp, fn, ceiling,
                          f"one round: {clients_per_round} of {num_clients} clients, uploads of dimension {dim}, "
                          "canary replaces a client / held out", test=test)


def _wrapper_release(server, server_round: int, current: np.ndarray, uploads: list[np.ndarray]) -> np.ndarray:
    """What ``server`` (a client-level DP wrapper) releases for ``uploads`` at ``server_round``, through
    Flower's own ``aggregate_train``: replies clipped against ``current``, averaged, noised."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    server.current_arrays = ArrayRecord({"update": Array(current)})
    replies = []
    for node, upload in enumerate(uploads, start=1):
        sent = Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
        content = RecordDict({"arrays": ArrayRecord({"update": Array(upload)}),
                              "metrics": MetricRecord({"num-examples": 1})})
        replies.append(Message(content, reply_to=sent))
    arrays, _ = server.aggregate_train(server_round, replies)
    return arrays["update"].numpy().astype(np.float64)
