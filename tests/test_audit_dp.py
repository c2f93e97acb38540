"""The audit under sample-level DP, on the real MiniLM in the positive-control setting
(batch 1, LoRA r=16, dropout off, sentences within the rank): with epsilon <= 1 every
attack falls to its prior-only baseline within the intervals; with clipping alone
(sigma = 0) every attack still succeeds, so the DP result is the noise's doing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.audit.dp import dp_upload, victim_dp
from fedpeft.audit.observe import honest_upload, victim_batch
from fedpeft.audit.runner import run_audit
from fedpeft.validation import load_config
from fedpeft.privacy.dp_sgd import DPSGD

BASE = ["model.dropout=0", "peft.r=16", "dp.mode=sample", "audit.max_victim_tokens=15", "audit.studies=false",
        "audit.empirical=false", "audit.prior_examples=500"]


def main_table(overrides: list[str], upload=None) -> tuple[dict, dict]:
    cfg = load_config(None, BASE + overrides)
    result = run_audit(cfg, upload=upload)
    main = result["experiments"][0]
    assert main["name"] == "main"
    return main["attacks"], main["dp"]


def pick(table: dict, attack: str, metric: str) -> tuple[dict, dict]:
    m = table[attack]["metrics"][metric]
    return m["attack"], m["baseline"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_strong_dp_brings_every_attack_to_its_baseline():
    table, dp = main_table(["dp.target_epsilon=1.0", "audit.victims=20"])
    assert dp["epsilon"] <= 1.0 and dp["noise_multiplier"] > 1.0
    for attack, metric in (("lora-span", "token recall"), ("linear-inversion", "cosine classifier input"),
                           ("label-recovery", "label accuracy")):
        att, base = pick(table, attack, metric)
        assert att["n"] >= 20
        # "Falls to the baseline": the attack's interval reaches no higher than the baseline's.
        assert att["lo"] <= base["hi"], (attack, metric, att, base)
        assert att["mean"] <= base["hi"] + 1e-9, (attack, metric, att, base)


def test_clipping_without_noise_leaves_the_attacks_working():
    # The config refuses sigma = 0 under DP, so the victim's DP-SGD is plugged in directly.
    table, _ = main_table(["dp.mode=none", "audit.victims=8"], upload=dp_upload(DPSGD(0.0, 0.1, 1.0)))
    assert pick(table, "lora-span", "token recall")[0]["mean"] >= 0.9
    assert pick(table, "linear-inversion", "cosine classifier input")[0]["mean"] >= 0.99
    assert pick(table, "label-recovery", "label accuracy")[0]["mean"] == 1.0


def test_dp_upload_of_one_example_is_its_clipped_gradient():
    from fedpeft.runtime import runtime

    cfg = load_config(None, BASE)
    rt = runtime(cfg)
    model = rt.model
    model.set_payload(model.initial, trainable=rt.strategy.trainable)
    ids = [np.asarray(model.tokenizer("a gentle, funny film")["input_ids"])]
    batch = victim_batch(ids, np.array([1]), model.tokenizer.pad_token_id)
    honest = honest_upload(model.model, batch, lr=0.01, local_steps=1, optimizer="sgd", seed=0).gradients
    norm = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in honest.values())))
    clip = norm / 4  # clipping is active
    private = dp_upload(DPSGD(0.0, clip, 1.0))(model.model, batch, lr=0.01, local_steps=1, optimizer="sgd", seed=0).gradients
    assert private.keys() == honest.keys()
    for name, g in honest.items():
        np.testing.assert_allclose(private[name], g * clip / norm, rtol=1e-3, atol=1e-7 * norm)
    # The server's copy is back at the global state.
    after = dp_upload(DPSGD(1.0, clip, 1.0))(model.model, batch, lr=0.01, local_steps=2, optimizer="adamw", seed=0)
    assert after.gradients is None
    for n, p in model.model.named_parameters():
        if p.requires_grad:
            assert not np.allclose(after.after[n], p.detach().numpy())


def test_victim_dp_calibrates_to_the_target_and_refuses_a_bad_delta():
    from fedpeft.errors import ConfigError

    cfg = load_config(None, ["dp.mode=sample", "dp.target_epsilon=1.0"])
    vdp = victim_dp(cfg.dp, local_steps=5, batch_size=4)
    assert 0.95 <= vdp.epsilon <= 1.0 and vdp.steps == 5 and vdp.sample_rate == 1.0
    assert victim_dp(load_config(None, []).dp, 1, 1) is None
    with pytest.raises(ConfigError, match="dp.delta"):
        victim_dp(load_config(None, ["dp.mode=sample", "dp.delta=0.3"]).dp, 1, 4)
