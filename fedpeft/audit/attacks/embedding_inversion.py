"""TAG-style text reconstruction: optimise input embeddings against the PEFT payload, then project.

The attacker holds the frozen BERT-style base (MiniLM) with the global
adapter, the victim's payload gradient (LoRA factors + head), the label from
the head bias gradient, and the sequence length (TAG and LAMP assume it; the
server can read it off ``[CLS] ... [SEP]`` padding conventions or guess it).
It optimises one free vector per inner position in word-embedding space so
that the payload gradient of ``[CLS] z_1 .. z_n [SEP]`` matches the observed
one (cosine distance, as Inverting Gradients; scale-free, so a multi-step
update works as is), then maps each vector to the nearest vocabulary token by
cosine similarity. No language-model prior is used (that is LAMP's addition).

The prior-only baseline guesses, for the same length, the most frequent word
pieces of public text.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedpeft.audit.attacks.base import Attack, AttackResult, Observation, checked_params
from fedpeft.audit.attacks.gradient_matching import (
    as_tensors,
    cosine_distance,
    head_bias_key,
    payload_gradients,
    recover_labels,
    trainable_tensors,
)
from fedpeft.audit.attacks.registry import register_attack
from fedpeft.audit.scoring import (
    LABEL_METRICS,
    TOKEN_METRICS,
    Pair,
    ScoreContext,
    label_scores,
    token_example,
    token_scores,
)


def candidate_token_mask(tokenizer) -> torch.Tensor:
    """True for vocabulary entries a sentence can contain (not ``[CLS]``, ``[PAD]``, ``[unused7]`` ...)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([not (t.startswith("[") and t.endswith("]")) for t in vocab])


@contextlib.contextmanager
def eager_attention(model):
    """Run attention in plain torch ops for the duration of the block.

    Gradient matching differentiates a gradient; torch's fused CPU attention
    kernels (SDPA) have no double backward, the eager implementation has.
    The model's own choice is restored afterwards.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def invert_text_embeddings(model, tokenizer, observed: Mapping[str, object], label: int, num_tokens: int, *,
                           iterations: int = 100, lr: float = 0.05, restarts: int = 1, seed: int = 0,
                           candidates: int = 5, prior_tokens: Sequence[int] = (), sweeps: int = 1
                           ) -> tuple[list[int], dict[str, float]]:
    """Reconstruct one sequence's token ids from its payload gradient.

    Parameters
    ----------
    model : peft.PeftModel
        BERT-style sequence classifier with the sent adapter, dropout off, eval mode.
    tokenizer : transformers tokenizer
        Its tokenizer (``cls_token_id``, ``sep_token_id``).
    observed : mapping of str to array
        The payload gradient (or update) by wire key.
    label : int
        The sequence's label (from :func:`~fedpeft.audit.attacks.gradient_matching.recover_labels`).
    num_tokens : int
        Sequence length including ``[CLS]`` and ``[SEP]`` (at least 3).
    iterations, lr, restarts, seed
        Adam steps, step size, random starts (the lowest matching loss wins) and their seed.
    candidates : int
        Nearest tokens per position that the discrete refinement tries.
    prior_tokens : sequence of int
        Public side knowledge: tokens tried at every position as well (e.g.
        the most frequent public word pieces, which projection rarely finds).
    sweeps : int
        Coordinate-descent passes of the discrete refinement (0 = plain
        nearest-token projection, TAG's own last step).

    Returns
    -------
    (list of int, dict)
        The ``num_tokens - 2`` inner token ids in order, and diagnostics
        (``match_loss``, ``seconds``).
    """
    if num_tokens < 3:
        raise ValueError("num_tokens counts [CLS] and [SEP]; it must be at least 3")
    start = time.perf_counter()
    table = model.get_input_embeddings().weight.detach()
    device = table.device  # the search runs where the model lives
    target = as_tensors(observed, device)
    allowed = candidate_token_mask(tokenizer).to(device)
    cls = table[tokenizer.cls_token_id][None]
    sep = table[tokenizer.sep_token_id][None]
    mean, std = table[allowed].mean(0), table[allowed].std(0)
    labels = torch.tensor([label], device=device)
    mask = torch.ones(1, num_tokens, dtype=torch.long, device=device)
    # The random starts come from a CPU generator, so they do not depend on the device.
    gen = torch.Generator().manual_seed(seed)

    def match_loss(z: torch.Tensor, create_graph: bool) -> torch.Tensor:
        embeds = torch.cat([cls, z, sep])[None]
        loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        return cosine_distance(payload_gradients(model, loss, create_graph=create_graph), target)

    def token_loss(ids: list[int]) -> float:
        return float(match_loss(table[ids], False).detach())

    best, best_loss = None, float("inf")
    with eager_attention(model):
        for _ in range(restarts):
            z, final = _one_restart(match_loss, mean, std, (num_tokens - 2, table.shape[1]), gen, iterations, lr)
            if final < best_loss:
                best, best_loss = z, final
        options = _candidate_lists(best, table, allowed, candidates, prior_tokens)
        tokens = [opts[0] for opts in options]  # plain nearest-token projection
        projected_loss = token_loss(tokens)
        tokens, refined_loss = _refine(tokens, options, token_loss, projected_loss, sweeps)
    return tokens, {"match_loss": best_loss, "projected_loss": projected_loss, "refined_loss": refined_loss,
                    "seconds": time.perf_counter() - start}


def _candidate_lists(z: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor, k: int,
                     prior_tokens: Sequence[int]) -> list[list[int]]:
    """Per position: the ``k`` nearest allowed tokens by cosine, then the prior tokens."""
    sim = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    sim[:, ~allowed] = -float("inf")
    near = sim.topk(max(k, 1), dim=-1).indices.tolist()
    return [row + [t for t in prior_tokens if t not in row] for row in near]


def _refine(tokens: list[int], options: list[list[int]], token_loss, loss: float, sweeps: int) -> tuple[list[int], float]:
    """Local search in token space on the gradient-matching loss of the discrete sequence.

    The continuous optimum rarely sits on a token embedding. Each sweep tries
    every position's candidates with the others fixed, then every swap of two
    positions (a single substitution cannot repair two words in each other's
    place, and the payload gradient is nearly order-blind); improvements are
    kept. A cheap stand-in for LAMP's discrete steps.
    """
    tokens = list(tokens)
    for _ in range(sweeps):
        changed = False
        for pos, opts in enumerate(options):
            for cand in opts:
                if cand != tokens[pos]:
                    trial = tokens[:pos] + [cand] + tokens[pos + 1:]
                    trial_loss = token_loss(trial)
                    if trial_loss < loss:
                        tokens, loss, changed = trial, trial_loss, True
        for i in range(len(tokens)):
            for j in range(i + 1, len(tokens)):
                if tokens[i] != tokens[j]:
                    trial = list(tokens)
                    trial[i], trial[j] = trial[j], trial[i]
                    trial_loss = token_loss(trial)
                    if trial_loss < loss:
                        tokens, loss, changed = trial, trial_loss, True
        if not changed:
            break
    return tokens, loss


def _one_restart(match_loss, mean, std, shape, gen, iterations, lr) -> tuple[torch.Tensor, float]:
    """One Adam run from a random point near the vocabulary's mean embedding."""
    z = (mean + std * torch.randn(shape, generator=gen).to(mean.device)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    for _ in range(iterations):
        opt.zero_grad()
        (z.grad,) = torch.autograd.grad(match_loss(z, True), [z])
        opt.step()
        sched.step()
    return z.detach(), float(match_loss(z, False).detach())


def estimate_num_tokens(gradients: Mapping[str, object], rank_tol: float = 1e-3) -> tuple[int, bool]:
    """Sequence length read off the first adapted layer's LoRA gradients.

    ``dL/dB = s sum_t g_t (A x_t)^T`` and ``dL/dA = s sum_t B^T g_t x_t^T``
    have rank ``min(tokens, r)`` for one sequence, so the numerical rank of
    the first layer's factor gradients is the token count whenever it is below
    the rank ``r``.

    Returns
    -------
    (int, bool)
        The estimate and whether it is exact (False when the rank is saturated,
        i.e. the sequence has at least ``r`` tokens; the estimate is then ``r``).
    """
    first = [k for k in gradients if k.startswith(("lora_A/", "lora_B/")) and ".layer.0." in k] or \
        [k for k in gradients if k.startswith(("lora_A/", "lora_B/"))]
    if not first:
        raise ValueError("the payload has no LoRA factor gradients to read the length from")
    best, r = 0, 0
    for key in first:
        g = np.asarray(gradients[key], dtype=np.float64).reshape(np.shape(gradients[key])[0], -1)
        r = max(r, min(g.shape))
        sv = np.linalg.svd(g, compute_uv=False)
        if sv.size and sv[0] > 0:
            best = max(best, int((sv > rank_tol * sv[0]).sum()))
    return best, best < r


def prior_guess(token_ranking: Sequence[int], length: int) -> list[int]:
    """Prior-only guess: the ``length`` most frequent public word pieces."""
    return list(token_ranking[:length])


@register_attack("embedding-inversion")
class EmbeddingInversion(Attack):
    """Registered wrapper of :func:`invert_text_embeddings` for one-sequence text payloads.

    The sequence length is ``obs.extra["num_tokens"]`` when the caller grants
    it (TAG's assumption), else read off the rank of the first layer's LoRA
    gradients (:func:`estimate_num_tokens`; exact below the LoRA rank).
    ``prior["token_ranking"]`` (public token ids, most frequent first)
    supplies the ``prior_tokens`` tried at every position.
    """

    modalities = ("text",)
    recovers = "one sentence's tokens and its label"
    observes = "the LoRA and head gradients"
    summary = "TAG-style: optimise input embeddings to match them, project to tokens (batch 1)"
    metrics = LABEL_METRICS + TOKEN_METRICS
    _defaults = {"iterations": 100, "lr": 0.05, "restarts": 1, "seed": 0, "candidates": 5, "sweeps": 1, "prior_tokens": 10}

    def __init__(self, **params: Any) -> None:
        self.params = checked_params(self.name, params, self._defaults, signed=("seed",))

    def applicable(self, obs: Observation) -> str | None:
        reason = super().applicable(obs)
        if reason is None and obs.batch_size != 1:
            reason = f"{self.name} reconstructs one sequence; the batch holds {obs.batch_size}"
        return reason

    def run(self, obs: Observation, prior: Mapping[str, Any] | None = None) -> AttackResult:
        model = obs.model.model if hasattr(obs.model, "tokenizer") else obs.model
        tokenizer = obs.extra.get("tokenizer") or obs.model.tokenizer
        observed = {k: obs.gradients[k] for k in trainable_tensors(model)}
        label = recover_labels(observed[head_bias_key(observed, obs.num_labels)], 1)[0]
        if "num_tokens" in obs.extra:
            num_tokens, exact = int(obs.extra["num_tokens"]), True
        else:
            num_tokens, exact = estimate_num_tokens(observed)
        params = dict(self.params)
        params["prior_tokens"] = prior_guess((prior or {}).get("token_ranking", []), int(params["prior_tokens"]))
        tokens, diagnostics = invert_text_embeddings(model, tokenizer, observed, label, max(num_tokens, 3), **params)
        diagnostics.update(num_tokens=float(num_tokens), length_exact=float(exact))
        reconstruction = {"tokens": tokens, "text": tokenizer.decode(tokens), "labels": [label]}
        return AttackResult(self.name, reconstruction, diagnostics)

    def score(self, result: AttackResult, ctx: ScoreContext) -> dict[str, Pair]:
        rec = result.reconstruction
        return {**label_scores(rec["labels"], ctx), **token_scores(rec["tokens"], ctx)}

    def example(self, result: AttackResult, ctx: ScoreContext, victim: int) -> dict[str, Any]:
        return token_example(result.reconstruction["tokens"], ctx, victim)
