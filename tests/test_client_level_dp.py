"""Client-level DP mechanism pieces: which arrays get noise, and how much."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedpeft.config import DPConfig
from fedpeft.privacy.accountants import client_level_epsilon
from fedpeft.privacy.calibration import calibrate_client_noise
from fedpeft.privacy.client_level import wrap_client_dp
from fedpeft.privacy.secret import secret_source

N = 200_000


def record():
    return ArrayRecord({"lora_A/q": Array(np.zeros(N, np.float32)), "lora_B/q": Array(np.zeros(N, np.float32))})


@pytest.mark.parametrize("clip_on", ["server", "client"])
def test_fixed_clipping_noise_is_sigma_c_over_m_on_private_arrays_only(clip_on):
    dp = DPConfig(mode="client", clipping="fixed", clip_on=clip_on, max_grad_norm=0.5)
    wrapper = wrap_client_dp(object(), dp, noise_multiplier=2.0, clients_per_round=4, private_keys={"lora_B/q"})
    out = wrapper._add_noise_to_aggregated_arrays(record())
    assert np.all(out["lora_A/q"].numpy() == 0.0), "an array no client trains got noise"
    assert out["lora_B/q"].numpy().std() == pytest.approx(2.0 * 0.5 / 4, rel=0.01)


@pytest.mark.parametrize("clip_on", ["server", "client"])
def test_adaptive_noise_follows_the_norm_the_round_clipped_with(clip_on):
    """Flower 1.41 updates the norm between clipping and noising, then noises at the new norm;
    when the norm shrinks that is too little noise for the updates actually clipped."""
    dp = DPConfig(mode="client", clipping="adaptive", clip_on=clip_on, max_grad_norm=1.0, clipped_count_stddev=2.0,
                  clip_norm_lr=0.2, target_clipped_quantile=0.5)
    wrapper = wrap_client_dp(object(), dp, noise_multiplier=1.0, clients_per_round=4, private_keys={"lora_B/q"})
    sigma_update = wrapper.noise_multiplier  # Flower's split: the part left for the update
    assert sigma_update > 1.0
    wrapper._geometric_update(0.0)  # nothing clipped: the norm shrinks for the next round
    assert wrapper.clipping_norm < 0.95
    std = wrapper._add_noise_to_aggregated_arrays(record())["lora_B/q"].numpy().std()
    assert std == pytest.approx(sigma_update * 1.0 / 4, rel=0.01)
    # The next round clips (and is noised) at the new norm.
    std_next = wrapper._add_noise_to_aggregated_arrays(record())["lora_B/q"].numpy().std()
    assert std_next == pytest.approx(sigma_update * wrapper.clipping_norm / 4, rel=0.01)


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_adaptive_norm_converges_to_the_target_quantile_of_update_norms(quantile):
    dp = DPConfig(mode="client", clipping="adaptive", max_grad_norm=0.05, target_clipped_quantile=quantile,
                  clip_norm_lr=0.2, clipped_count_stddev=2.0)
    wrapper = wrap_client_dp(object(), dp, 1.0, 100, {"lora_B/q"})
    rng = np.random.default_rng(0)
    for _ in range(400):
        norms = rng.lognormal(0.0, 0.5, size=100)
        wrapper._geometric_update(float(np.mean(norms > wrapper.clipping_norm)))
    want = float(np.exp(0.5 * np.sqrt(2) * __import__("scipy").special.erfinv(2 * quantile - 1)))
    assert wrapper.clipping_norm == pytest.approx(want, rel=0.1)


def test_server_noise_is_secret_and_repeatable_only_from_a_user_secret(tmp_path):
    dp = DPConfig(mode="client")
    # The OS source: two servers with the same config and seed draw independent noise.
    a, b = (wrap_client_dp(object(), dp, 1.0, 2, {"lora_B/q"})._add_noise_to_aggregated_arrays(record())["lora_B/q"].numpy()
            for _ in range(2))
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    # A user's secret: the same round's noise again (exact resume), another round's is independent.
    (tmp_path / "secret").write_text("correct horse battery staple")
    source = secret_source(DPConfig(mode="client", secret_file=str(tmp_path / "secret")))

    def round_noise(r: int) -> np.ndarray:
        wrapper = wrap_client_dp(object(), dp, 1.0, 2, {"lora_B/q"}, source)
        wrapper.noise_rng = wrapper.secret.generator("server-noise", r)
        return wrapper._add_noise_to_aggregated_arrays(record())["lora_B/q"].numpy()

    np.testing.assert_array_equal(round_noise(3), round_noise(3))
    assert abs(np.corrcoef(round_noise(3), round_noise(4))[0, 1]) < 0.02


def test_client_level_calibration_meets_the_target_closely():
    sigma = calibrate_client_noise(4.0, 1e-3, num_clients=100, clients_per_round=10, rounds=20)
    eps = client_level_epsilon(sigma, 100, 10, 20, 1e-3)
    assert 0.99 * 4.0 <= eps <= 4.0
    assert client_level_epsilon(sigma * 0.98, 100, 10, 20, 1e-3) > 4.0
