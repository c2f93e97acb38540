"""Audit building blocks without a model: metrics, intervals, the registry,
settings validation, and the analytic attacks on a small torch head."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

from fedpeft.audit.attacks import (
    Attack,
    AttackResult,
    Observation,
    available_attacks,
    build_attacks,
    get_attack,
    register_attack,
)
from fedpeft.audit.attacks.label_recovery import largest_remainder
from fedpeft.audit.attacks.linear_inversion import invert_linear
from fedpeft.audit.metrics import bootstrap_ci, exact_recovery, label_accuracy, rouge, token_prf
from fedpeft.config import AuditConfig, field_help
from fedpeft.validation import config_from_dict, load_config
from fedpeft.errors import ConfigError


def parse_audit(table: dict) -> AuditConfig:
    """The ``[audit]`` section of a config with ``table`` as its audit table, its attacks built (as `fedpeft audit` does)."""
    audit = config_from_dict({"audit": table}).audit
    build_attacks(audit)
    return audit


def test_token_prf_counts_multisets_and_ignores_specials():
    p, r, f = token_prf([101, 5, 5, 7, 102], [101, 5, 6, 7, 102], ignore={101, 102})
    assert (p, r) == (2 / 3, 2 / 3)
    assert f == pytest.approx(2 / 3)
    assert token_prf([], [5, 6]) == (0.0, 0.0, 0.0)


def test_rouge_and_exact_recovery():
    assert rouge("a funny film", "a funny film") == (1.0, 1.0)
    r1, r2 = rouge("film funny a", "a funny film")
    assert r1 == 1.0 and r2 == 0.0
    assert exact_recovery([101, 5, 6, 102], [101, 5, 6, 102], ignore={101, 102}) == 1.0
    assert exact_recovery([6, 5], [5, 6]) == 0.0


def test_label_accuracy_is_multiset_overlap():
    assert label_accuracy([1], [1]) == 1.0
    assert label_accuracy([0, 0, 1, 1], [0, 1, 1, 1]) == 0.75


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_victims():
    rng = np.random.default_rng(0)
    small = bootstrap_ci(rng.random(20))
    large = bootstrap_ci(rng.random(2000))
    for ci in (small, large):
        assert ci.lo <= ci.mean <= ci.hi
    assert large.hi - large.lo < small.hi - small.lo
    assert bootstrap_ci([1.0] * 20).to_dict() == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 20}


def test_largest_remainder_sums_to_total():
    counts = largest_remainder(np.array([1.6, 2.2, 0.2]), 4)
    assert counts.tolist() == [2, 2, 0]
    assert largest_remainder(np.array([-1.0, 0.0]), 3).sum() == 3


def _head_observation(x: torch.Tensor, y: torch.Tensor) -> tuple[Observation, torch.nn.Linear]:
    """Gradients of a 3-class linear head on inputs ``x`` (batch, 8), as the server would see them."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    torch.nn.functional.cross_entropy(head(x), y).backward()
    grads = {"extra/classifier.weight": head.weight.grad.numpy().copy(), "extra/classifier.bias": head.bias.grad.numpy().copy()}
    obs = Observation(sent={}, uploaded={}, gradients=grads, exact_gradient=True, lr=0.1, local_steps=1, batch_size=len(y), num_labels=3)
    return obs, head


def test_linear_inversion_is_exact_for_one_example():
    x = torch.randn(1, 8)
    obs, _ = _head_observation(x, torch.tensor([2]))
    attack = get_attack("linear-inversion")()
    assert attack.applicable(obs) is None
    feature = attack.run(obs).reconstruction["features"]["classifier"]
    np.testing.assert_allclose(feature, x[0].numpy(), rtol=1e-4, atol=1e-5)
    assert np.allclose(invert_linear(np.zeros((3, 8)), np.zeros(3)), 0)


@pytest.mark.parametrize("label", [0, 1, 2])
def test_label_recovery_is_exact_for_one_example(label):
    obs, _ = _head_observation(torch.randn(1, 8), torch.tensor([label]))
    assert get_attack("label-recovery")().run(obs).reconstruction["labels"] == [label]


def test_label_recovery_counts_a_batch_with_the_true_mean_prediction():
    torch.manual_seed(1)
    x, y = torch.randn(6, 8), torch.tensor([0, 0, 1, 2, 2, 2])
    obs, head = _head_observation(x, y)
    mean_pred = torch.softmax(head(x), -1).mean(0).detach().numpy()  # the server's estimate, here exact
    labels = get_attack("label-recovery")().run(obs, {"mean_prediction": mean_pred}).reconstruction["labels"]
    assert sorted(labels) == y.tolist()


def test_attacks_say_why_they_do_not_apply():
    obs = Observation(sent={}, uploaded={}, gradients={}, exact_gradient=True, lr=0.1, local_steps=1, batch_size=1, modality="image")
    assert "text" in get_attack("lora-span")().applicable(obs)
    assert "no classifier bias" in get_attack("label-recovery")().applicable(obs)


def test_registry_registers_and_names_valid_attacks(monkeypatch):
    assert {"label-recovery", "linear-inversion", "lora-span"} <= set(available_attacks())
    # The registration below must not outlive this test (other tests list the attacks).
    registry = sys.modules[register_attack.__module__]
    monkeypatch.setattr(registry, "_ATTACKS", dict(registry._ATTACKS))

    @register_attack("test-constant")
    class Constant(Attack):
        def run(self, obs, prior=None):
            return AttackResult(self.name, {"labels": [0]})

    assert get_attack("test-constant") is Constant and Constant.name == "test-constant"
    with pytest.raises(ValueError, match="already registered"):
        register_attack("test-constant")(type("Other", (Attack,), {}))
    with pytest.raises(ConfigError, match="audit.attacks: 'nope' is not an attack; choose from: .*lora-span"):
        get_attack("nope")
    monkeypatch.undo()
    assert "test-constant" not in available_attacks()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"victims": 0}, "audit.victims must be an integer >= 1"),
        ({"round": "2"}, "audit.round must be an integer >= 1"),
        ({"optimizer": "adam"}, "audit.optimizer = 'adam' is not valid; choose one of: sgd, adamw"),
        ({"attacks": []}, "audit.attacks must be a non-empty list"),
        ({"victim_texts": "/no/such/file.txt"}, "audit.victim_texts = '/no/such/file.txt': no such file"),
        ({"colour": 1}, "unknown key audit.colour; valid keys:"),
        ({"lora-span": 3}, "audit.lora-span must be a table"),
        ({"studies": 1}, "audit.studies must be true or false, got 1"),
        ({"confidence": 1.0}, "audit.confidence must be a number in [0.5, 1)"),
        ({"attacks": ["lora-span", 3]}, "audit.attacks must be a non-empty list of attack names"),
        ({"nope": {"x": 1}}, "unknown table [audit.nope]: 'nope' is neither a registered attack"),
        ({"dlg": {"restarts": -1}}, "audit.dlg.restarts = -1 must be a non-negative number"),
    ],
)
def test_settings_errors_name_the_key(table, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_audit(table)


def test_settings_defaults_and_attack_params():
    s = parse_audit({"lora-span": {"tol": 0.01}, "victims": 25})
    assert s.victims == 25 and s.attacks == ["label-recovery", "linear-inversion", "lora-span"]
    assert get_attack("lora-span")(**s.params["lora-span"]).tol == 0.01
    with pytest.raises(ConfigError, match="audit.lora-span.tol must be a number"):
        get_attack("lora-span")(tol=2.0)
    with pytest.raises(ConfigError, match="unknown parameters"):
        get_attack("linear-inversion")(colour=1)


def test_audit_defaults_live_in_the_config_section(tmp_path):
    # A file without [audit] gets the dataclass defaults: the same as the default config's table.
    f = tmp_path / "no_audit.toml"
    f.write_text("[federation]\nnum_clients = 10\n")
    assert load_config(f).audit == AuditConfig() == load_config().audit
    assert "audit.canary_trials" in field_help() and "audit.attacks" in field_help()


def test_attack_sub_tables_are_gathered_and_round_trip():
    cfg = load_config(None, ["audit.dlg={iterations=5}", "audit.attacks=lora-span"])
    assert cfg.audit.params == {"dlg": {"iterations": 5}} and cfg.audit.attacks == ["lora-span"]
    assert config_from_dict(cfg.to_dict()) == cfg  # summary.json's config loads back
    with pytest.raises(ConfigError, match="unknown key audit.colour"):
        load_config(None, ["audit.colour=1"])  # every command, not only `fedpeft audit`
