"""Simulated hostile clients (federation.byzantine_*): what they send, and that the server's checks and rules see it."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.client.byzantine import hostile_clients, hostile_upload
from fedpeft.engine import run_engine
from fedpeft.server.run_folder import RunFolder
from fedpeft.validation import load_config
from strategies import LoRAFactors, Payload


def payloads():
    rng = np.random.default_rng(0)
    received = Payload(factors={"q": LoRAFactors(rng.normal(size=(4, 6)).astype(np.float32),
                                                 rng.normal(size=(5, 4)).astype(np.float32), 2.0)},
                       extras={"head.weight": rng.normal(size=(2, 5)).astype(np.float32)})
    step = {k: (0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in received.arrays().items()}
    local = Payload.from_arrays({k: v + step[k] for k, v in received.arrays().items()}, received.scalings())
    return received, local, step


@pytest.mark.parametrize("attack,sign", [("scale", 1.0), ("sign-flip", -1.0)])
def test_scale_and_sign_flip_send_the_update_times_the_strength(attack, sign):
    received, local, step = payloads()
    sent = hostile_upload(local, received, attack, 100.0, np.random.default_rng(1)).arrays()
    for key, origin in received.arrays().items():
        np.testing.assert_allclose(sent[key] - origin, sign * 100.0 * step[key], rtol=1e-3, atol=1e-5)


def test_noise_replaces_the_update_with_noise_of_the_strength_times_its_rms():
    received, local, step = payloads()
    sent = hostile_upload(local, received, "noise", 50.0, np.random.default_rng(1)).arrays()
    for key, origin in received.arrays().items():
        noise = sent[key] - origin
        rms = np.sqrt(np.mean(step[key].astype(np.float64) ** 2))
        assert 0.5 * 50 * rms < np.sqrt(np.mean(noise.astype(np.float64) ** 2)) < 1.5 * 50 * rms
        assert abs(np.corrcoef(noise.ravel(), step[key].ravel())[0, 1]) < 0.5  # not the honest direction


def test_the_hostile_set_is_seeded_fixed_and_at_least_one():
    assert hostile_clients(10, 0.0, 0) == frozenset()
    assert len(hostile_clients(10, 0.1, 0)) == 1 and len(hostile_clients(10, 0.3, 0)) == 3
    assert len(hostile_clients(3, 0.01, 0)) == 1
    assert hostile_clients(100, 0.1, 4) == hostile_clients(100, 0.1, 4) != hostile_clients(100, 0.1, 5)


def test_a_hostile_client_in_a_federation_is_rejected_by_the_norm_bound(tmp_path, tiny_federation):
    """Through the real client path: the hostile client's scaled upload exceeds federation.max_update_norm and is
    rejected with that reason every round, while the honest clients' replies pass."""
    overrides = [o for o in tiny_federation if not o.startswith(("federation.num_clients", "federation.num_rounds"))]
    cfg = load_config(None, overrides + ["federation.num_clients=3", "federation.num_rounds=2", "train.lr=0.01",
                                         "federation.byzantine_fraction=0.34", 'federation.byzantine_attack="scale"',
                                         "federation.byzantine_strength=1000", "federation.max_update_norm=5.0"])
    (hostile,) = hostile_clients(3, 0.34, cfg.federation.seed)
    run_engine(cfg, tmp_path / "run")
    for line in RunFolder(tmp_path / "run").read_metrics()[1:]:
        assert [f["client"] for f in line["failed"]] == [hostile], line["failed"]
        assert "exceeds federation.max_update_norm = 5" in line["failed"][0]["reason"]
