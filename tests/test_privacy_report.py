"""One type for an epsilon with its unit, accountant, delta and relation: the DP plan, the run log and
the audit all produce a PrivacyReport, and the run-folder JSON keeps exactly its fields."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from fedpeft.audit.dp import victim_dp
from fedpeft.audit.empirical import EmpiricalAudit, client_level_audit, sample_level_audit
from fedpeft.validation import load_config
from fedpeft.privacy import PrivacyReport, client_level_epsilon, compute_epsilon
from fedpeft.privacy.plan import DPPlan
from fedpeft.server.privacy_log import run_privacy

REPORT_FIELDS = ["unit", "accountant", "delta", "noise_multiplier", "sample_rate", "steps", "epsilon", "relation"]
SECRET = SimpleNamespace(describe=lambda: "the operating system's CSPRNG")


def sample_plan() -> DPPlan:
    return DPPlan("sample", "pld", 1e-4, 1.3, 0.5, None, {0: 0.2, 1: 0.1, 2: 0.4}, {0: 4, 1: 4, 2: 2}, 3, 2,
                  local_steps=2)


def test_the_plan_reports_each_clients_guarantee():
    plan = sample_plan()
    report = plan.report(1, 4)
    assert isinstance(report, PrivacyReport)
    assert (report.unit, report.accountant, report.delta, report.neighbouring_relation) == ("sample", "pld", 1e-4,
                                                                                            "replace-one")
    assert report.epsilon == compute_epsilon(1.3, 0.1, 4, 1e-4, "pld", "replace-one") == plan.epsilon_after(1, 4)
    assert report.history == ((1.3, 0.1, 4),) and list(report.to_dict()) == REPORT_FIELDS
    client = DPPlan("client", "rdp", 1e-2, 0.8, 1.0, None, {-1: 0.5}, {-1: 3}, 4, 2).report(-1, 3)
    assert client.epsilon == client_level_epsilon(0.8, 4, 2, 3, 1e-2) and client.relation == "replace-one client"


def test_sample_level_summary_block_is_the_reports_fields_plus_the_mechanism():
    plan = sample_plan()
    flower = SimpleNamespace(dp_epsilon={0: 2.5, 1: 1.5, 2: 3.0}, dp_steps={0: 4, 1: 4, 2: 2})
    out = run_privacy(plan, flower, [{"round": 2}], SECRET)
    block = out["dp"]
    # Exactly the fields summary.json has always had.
    assert set(block) == {"randomness", "unit", "accountant", "delta", "noise_multiplier", "max_grad_norm",
                          "target_epsilon", "planned_epsilon", "mechanism", "sample_rate", "steps", "epsilon",
                          "epsilon_per_client", "steps_per_client", "sample_rate_per_client", "relation", "sampling"}
    # The worst client is the one with the most steps at the largest q (client 0); the epsilon the largest reported.
    assert (block["sample_rate"], block["steps"], block["epsilon"], out["epsilon"]) == (0.2, 4, 3.0, 3.0)
    assert block["relation"] == "replace-one example of a client's shard (shard sizes are public)"
    assert {k: block[k] for k in REPORT_FIELDS} == plan.report(0, 4, epsilon=3.0).to_dict()
    json.dumps(out)


def test_client_level_summary_block_is_the_reports_fields_plus_the_mechanism():
    plan = DPPlan("client", "rdp", 1e-2, 0.8, 1.0, None, {-1: 0.5}, {-1: 3}, 4, 2)
    flower = SimpleNamespace(private_keys=lambda: {"lora_B/q", "extra/head"})
    out = run_privacy(plan, flower, [{"round": 1}, {"round": 2}], SECRET)
    block = out["dp"]
    assert set(block) == {"randomness", "unit", "accountant", "delta", "noise_multiplier", "max_grad_norm",
                          "target_epsilon", "planned_epsilon", "mechanism", "sample_rate", "steps", "epsilon",
                          "epsilon_per_client", "relation", "sampling", "noised_arrays"}
    want = client_level_epsilon(0.8, 4, 2, 2, 1e-2)
    assert (block["steps"], block["epsilon"], block["sample_rate"], block["relation"]) == (2, want, 0.5,
                                                                                          "replace-one client")
    assert block["epsilon_per_client"] == {str(c): want for c in range(4)}
    assert {k: block[k] for k in REPORT_FIELDS} == plan.report(-1, 2).to_dict()


def test_the_audit_victims_dp_block_is_its_report_plus_the_mechanism():
    cfg = load_config(None, ["dp.mode=sample", "dp.noise_multiplier=2.0", "dp.delta=1e-3"])
    vdp = victim_dp(cfg.dp, local_steps=3, batch_size=4)
    data = vdp.to_dict()
    assert set(data) == {"noise_multiplier", "max_grad_norm", "sample_rate", "steps", "delta", "accountant",
                         "target_epsilon", "epsilon", "unit", "relation", "describe"}
    assert {k: data[k] for k in REPORT_FIELDS} == vdp.report.to_dict()
    assert vdp.report.epsilon == compute_epsilon(2.0, 1.0, 3, 1e-3, cfg.dp.accountant, "replace-one")
    assert (data["unit"], data["relation"]) == ("sample", "replace-one")


EMPIRICAL_FIELDS = ["unit", "epsilon_lower", "epsilon_accountant", "accountant", "delta", "confidence",
                    "noise_multiplier", "clipping_norm", "trials", "threshold", "false_pos", "false_neg", "max_lower",
                    "details", "test", "relation", "has_power", "adversary"]


def test_the_empirical_audit_states_the_accountants_claim_as_a_report():
    audit = sample_level_audit(1.0, 1.0, trials=8, delta=1e-3, claimed_noise_multiplier=2.0)
    assert isinstance(audit, EmpiricalAudit) and isinstance(audit.claim, PrivacyReport)
    data = audit.to_dict()
    assert list(data) == EMPIRICAL_FIELDS
    # The claim is for the sigma claimed; the mechanism run is recorded apart.
    assert data["epsilon_accountant"] == audit.claim.epsilon == compute_epsilon(2.0, 1.0, 1, 1e-3, "rdp")
    assert (data["noise_multiplier"], audit.claim.noise_multiplier) == (1.0, 2.0)
    assert (data["unit"], data["relation"], data["accountant"]) == ("sample", "add-remove", "rdp")
    client = client_level_audit(1.0, 1.0, num_clients=4, clients_per_round=2, trials=8, dim=16, delta=1e-3)
    assert list(client.to_dict()) == EMPIRICAL_FIELDS
    assert client.claim.unit == "client" and client.relation == "replace-one client"
    assert client.epsilon_accountant == client_level_epsilon(1.0, 4, 2, 1, 1e-3)


def test_a_report_must_name_a_relation_and_a_unit():
    with pytest.raises(ValueError, match="relation"):
        PrivacyReport("sample", "rdp", 1e-5, 1.0, 0.1, 1, 1.0, relation="swap-two")
    with pytest.raises(ValueError, match="unit"):
        PrivacyReport("example", "rdp", 1e-5, 1.0, 0.1, 1, 1.0)
    report = PrivacyReport("client", "pld (replace-one)", 1e-5, 1.0, 0.5, 2, math.inf, relation="replace-one client")
    assert report.neighbouring_relation == "replace-one"
    assert report.describe().startswith("(ε=inf, δ=1e-05)-DP at the client level, PLD (replace-one) accountant")
