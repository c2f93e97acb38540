"""LoRA span attack: recover a batch's tokens from first-layer LoRA gradients.

For an adapted layer ``y = W x + s B A x`` the gradients are
``dL/dB = s sum_t g_t (A x_t)^T`` and ``dL/dA = s sum_t B^T g_t x_t^T``.

* ``B = 0`` (a fresh round): ``dL/dA = 0`` and the rows of ``dL/dB`` span
  ``{A x_t}`` in R^r; a candidate ``x`` passes if ``A x`` lies in that span.
  The test has ``r - n`` free dimensions per module for ``n`` distinct token
  inputs, so it works while ``n < r`` and sharpens with every module tested.
* ``B != 0``: the rows of ``dL/dA`` span ``{x_t}`` itself (rank <= min(r, n)),
  a test in the full hidden space that holds while ``n <= r``.

In BERT the input of layer 0 is ``LayerNorm(word[v] + pos[p] + type[0])`` and
does not depend on anything trained, so every (token, position) pair is a
candidate whose input the server computes exactly (DAGER, Petrov et al.
2024, made exact for LoRA). The relative residual ``||x - P x|| / ||x||``
against the span's projector ``P`` is ~1e-7 for the batch's own pairs and
~0.1 for others. A pair must pass every first-layer module; each position
keeps its best ``batch_size`` tokens, which also orders the reconstruction.

The candidates are evaluated in closed form: LayerNorm of ``w + c`` needs
only ``w``'s centred norms and its dot products with ``c``, so the costly
vocabulary-by-hidden product happens once per module, not once per position.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from fedpeft.audit.attacks.base import Attack, AttackResult, Observation
from fedpeft.audit.attacks.registry import register_attack
from fedpeft.audit.scoring import TOKEN_METRICS, Pair, ScoreContext, token_example, token_scores
from fedpeft.errors import ConfigError
from fedpeft.models.lora import PREFIX

FIRST_LAYER = re.compile(r"(^|\.)layer\.0\.attention\.self\.(query|key|value)$")


@dataclass
class EmbeddingCandidates:
    """First-layer inputs ``LayerNorm(word[v] + pos[p] + type[0])`` of a BERT, in closed form (float64)."""

    word_c: np.ndarray  # (V, d) centred word embeddings
    ctx_c: np.ndarray  # (P, d) centred pos[p] + type[0]
    gamma: np.ndarray
    beta: np.ndarray
    eps: float

    @classmethod
    def from_model(cls, model, positions: int) -> "EmbeddingCandidates":
        emb = find_embeddings(model)
        with torch.no_grad():
            w = emb.word_embeddings.weight.double().cpu().numpy()
            c = (emb.position_embeddings.weight[:positions] + emb.token_type_embeddings.weight[0]).double().cpu().numpy()
        ln = emb.LayerNorm
        return cls(
            word_c=w - w.mean(1, keepdims=True),
            ctx_c=c - c.mean(1, keepdims=True),
            gamma=ln.weight.detach().double().cpu().numpy(),
            beta=ln.bias.detach().double().cpu().numpy(),
            eps=float(ln.eps),
        )

    @property
    def vocab(self) -> int:
        return self.word_c.shape[0]

    def sigma(self, pos: slice) -> np.ndarray:
        """LayerNorm's std of every (token, position): shape (V, P)."""
        d = self.word_c.shape[1]
        wc2 = np.einsum("vd,vd->v", self.word_c, self.word_c)
        cc = self.ctx_c[pos]
        var = (wc2[:, None] + 2 * self.word_c @ cc.T + np.einsum("pd,pd->p", cc, cc)[None]) / d
        return np.sqrt(var + self.eps)

    def mapped(self, L: np.ndarray, pos: slice, sigma: np.ndarray, wl: np.ndarray) -> np.ndarray:
        """``L x(v, p)`` for every token and position in ``pos``: shape (V, P, k).

        ``wl`` is ``word_c @ (L * gamma).T``, computed once per map by the caller.
        """
        Lg = L * self.gamma[None]  # (k, d)
        cl = self.ctx_c[pos] @ Lg.T  # (P, k)
        return (wl[:, None, :] + cl[None]) / sigma[..., None] + (L @ self.beta)[None, None]

    def sq_norm(self, pos: slice, sigma: np.ndarray) -> np.ndarray:
        """``||x(v, p)||^2``: shape (V, P)."""
        g2, gb = self.gamma**2, self.gamma * self.beta
        cc = self.ctx_c[pos]
        quad = (np.einsum("vd,d,vd->v", self.word_c, g2, self.word_c)[:, None] + 2 * self.word_c @ (cc * g2).T
                + np.einsum("pd,d,pd->p", cc, g2, cc)[None])
        lin = (self.word_c @ gb)[:, None] + (cc @ gb)[None]
        return quad / sigma**2 + 2 * lin / sigma + float(self.beta @ self.beta)


def find_embeddings(model):
    """The BERT-style embedding block (word, position, token-type embeddings and LayerNorm), or None."""
    for _, mod in model.named_modules():
        if all(hasattr(mod, a) for a in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")):
            return mod
    return None


def row_space(grad: np.ndarray, rank_tol: float) -> np.ndarray:
    """Orthonormal basis (columns) of the row space of ``grad``, numerical rank by ``rank_tol``."""
    _, s, vh = np.linalg.svd(np.asarray(grad, dtype=np.float64), full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return np.zeros((grad.shape[1], 0))
    k = int((s > rank_tol * s[0]).sum())
    return vh[:k].T


@register_attack("lora-span")
class LoRASpan(Attack):
    """Token recovery from the span of first-layer LoRA gradients (text, BERT-style inputs)."""

    modalities = ("text",)
    recovers = "the batch's tokens"
    observes = "the first layer's LoRA factor gradients"
    summary = "DAGER-style: tokens whose first-layer input lies in their span (exact for LoRA)"
    metrics = TOKEN_METRICS
    study_metric = "token recall"

    def __init__(self, tol: float = 1e-3, rank_tol: float = 1e-5, chunk: int = 8, **params: Any) -> None:
        super().__init__(**params)
        for key, value, lo, hi in (("tol", tol, 0.0, 1.0), ("rank_tol", rank_tol, 0.0, 1.0)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo < value < hi:
                raise ConfigError(f"audit.lora-span.{key} must be a number in ({lo}, {hi}), got {value!r}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ConfigError(f"audit.lora-span.chunk must be an integer >= 1, got {chunk!r}")
        self.tol, self.rank_tol, self.chunk = float(tol), float(rank_tol), chunk
        self._cache: tuple[int, int, EmbeddingCandidates] | None = None

    def modules(self, obs: Observation) -> list[str]:
        return sorted(m for m in obs.scalings if FIRST_LAYER.search(m))

    def applicable(self, obs: Observation) -> str | None:
        reason = super().applicable(obs)
        if reason:
            return reason
        if obs.model is None or find_embeddings(obs.model.model) is None:
            return "the model has no BERT-style embedding block (word + position + token type, LayerNorm)"
        if not self.modules(obs):
            return "no LoRA module on the first layer's attention (query/key/value of layer 0)"
        if not any(obs.gradient(p, m) is not None for m in self.modules(obs) for p in ("lora_A", "lora_B")):
            return "the payload holds no gradient of a first-layer LoRA factor"
        return None

    def tests(self, obs: Observation) -> list[tuple[str, str, np.ndarray, np.ndarray | None]]:
        """One span test per first-layer module: (module, regime, basis, map).

        Regime ``"A"`` (sent B != 0, A's gradient uploaded) tests ``x`` against
        the row space of dL/dA; regime ``"B"`` tests ``A x`` against the row
        space of dL/dB (``map`` = A, the global factor the server sent).
        """
        out = []
        for m in self.modules(obs):
            ga, gb = obs.gradient("lora_A", m), obs.gradient("lora_B", m)
            b_sent = obs.sent.get(f"lora_B/{m}")
            if ga is not None and b_sent is not None and np.any(b_sent != 0):
                out.append((m, "A", row_space(ga, self.rank_tol), None))
            elif gb is not None:
                A = np.asarray(obs.sent[f"lora_A/{m}"], dtype=np.float64)
                out.append((m, "B", row_space(gb, self.rank_tol), A))
        return out

    def _candidates(self, model, positions: int) -> EmbeddingCandidates:
        key = (id(model), positions)
        if self._cache is None or self._cache[:2] != key:
            self._cache = (*key, EmbeddingCandidates.from_model(model, positions))
        return self._cache[2]

    def residuals(self, obs: Observation, positions: int, tests: list) -> np.ndarray:
        """Largest relative residual over the modules' tests for every (position, token): (P, V)."""
        cand = self._candidates(obs.model.model, positions)
        worst = np.zeros((positions, cand.vocab))
        maps = [(regime, basis, basis.T if regime == "A" else A) for _, regime, basis, A in tests]
        # L @ word part of every map: the one vocabulary-sized product, done once.
        word_parts = [cand.word_c @ (L * cand.gamma[None]).T for _, _, L in maps]
        for start in range(0, positions, self.chunk):
            pos = slice(start, min(positions, start + self.chunk))
            sigma = cand.sigma(pos)
            norm2 = None
            for (regime, basis, L), wl in zip(maps, word_parts):
                z = cand.mapped(L, pos, sigma, wl)
                if regime == "A":
                    if norm2 is None:
                        norm2 = cand.sq_norm(pos, sigma)
                    total, proj = norm2, z
                else:
                    total, proj = np.einsum("vpk,vpk->vp", z, z), z @ basis
                res = np.sqrt(np.clip(total - np.einsum("vpk,vpk->vp", proj, proj), 0, None) / np.maximum(total, 1e-300))
                worst[pos] = np.maximum(worst[pos], res.T)
        return worst

    def run(self, obs: Observation, prior: Mapping[str, Any] | None = None) -> AttackResult:
        t0 = time.perf_counter()
        max_positions = int(obs.extra.get("max_length", 0)) or find_embeddings(obs.model.model).position_embeddings.num_embeddings
        tests = self.tests(obs)
        rank = {m: obs.sent[f"lora_A/{m}"].shape[0] for m, *_ in tests}  # each module's LoRA rank r
        # A span of rank k < r counts the batch's distinct (token, position)
        # inputs exactly; at k = r it is saturated (tokens >= r). A saturated
        # "B" test fills R^r and rules nothing out, so it is dropped.
        informative = [t for t in tests if t[1] == "A" or t[2].shape[1] < rank[t[0]]]
        diagnostics = {"span_rank": float(np.mean([t[2].shape[1] for t in tests])) if tests else 0.0,
                       "regime_A": float(np.mean([t[1] == "A" for t in tests])) if tests else 0.0}
        if not informative:
            diagnostics.update(positions=0.0, passing_pairs=0.0, seconds=time.perf_counter() - t0)
            return AttackResult(self.name, {"tokens": [], "positions": [], "residuals": []}, diagnostics)
        # Unsaturated, no sequence is longer than the number of inputs: test only those positions.
        if all(t[2].shape[1] < rank[t[0]] for t in informative):
            positions = min(max_positions, max(t[2].shape[1] for t in informative))
        else:
            positions = max_positions
        res = self.residuals(obs, positions, informative)
        pad = obs.extra["tokenizer"].pad_token_id
        if pad is not None:
            res[:, pad] = np.inf  # padding never reaches the loss, so it never enters the span
        keep = max(1, obs.batch_size)
        tokens, where, scores = [], [], []
        for p in range(positions):
            best = np.argsort(res[p])[:keep]
            for v in best[res[p, best] < self.tol]:
                tokens.append(int(v))
                where.append(p)
                scores.append(float(res[p, v]))
        diagnostics.update(positions=float(positions), passing_pairs=float((res < self.tol).sum()), seconds=time.perf_counter() - t0)
        return AttackResult(self.name, {"tokens": tokens, "positions": where, "residuals": scores}, diagnostics)

    def score(self, result: AttackResult, ctx: ScoreContext) -> dict[str, Pair]:
        rec = result.reconstruction
        return token_scores(rec["tokens"], ctx, rec.get("positions"))

    def example(self, result: AttackResult, ctx: ScoreContext, victim: int) -> dict[str, Any]:
        return token_example(result.reconstruction["tokens"], ctx, victim)
