"""Checks of privacy inputs: each bad value is one ConfigError that names its key.

The ``check_*`` helpers validate one number (a delta, a sampling rate, a
noise multiplier, ...) wherever it comes from: the accountants and the noise
calibration call them on their arguments, the config on ``dp.*``.
:func:`validate_dp` refuses ``[dp]`` settings that a DP claim cannot honour.
Nothing here accounts; :mod:`fedpeft.privacy.accountants` does.
"""

from __future__ import annotations

import math
from typing import Any

from fedpeft.errors import ConfigError

__all__ = [
    "check_delta",
    "check_sample_rate",
    "check_noise_multiplier",
    "check_target_epsilon",
    "check_steps",
    "validate_dp",
]


def _number(value: Any, key: str) -> float:
    """``value`` as a finite float, or a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def check_delta(delta: Any, num_records: int | None = None, key: str = "dp.delta") -> float:
    """Validate delta: set, in (0, 1), and below ``1 / num_records``.

    Parameters
    ----------
    delta : float or None
        The delta of the (epsilon, delta) guarantee.
    num_records : int, optional
        How many records the unit protects: a client's examples for
        sample-level DP (pass the smallest shard), the number of clients for
        client-level DP. A delta of ``1/n`` or more allows leaking a whole
        record outright, so it is refused.
    key : str
        Config key named in the error.

    Returns
    -------
    float
        ``delta`` as a float.

    Raises
    ------
    ConfigError
        If delta is missing, not in (0, 1), or ``>= 1 / num_records``.
    """
    if delta is None:
        raise ConfigError(f"{key} is required for a DP guarantee; set it below 1/n, e.g. {key}=1e-5")
    delta = _number(delta, key)
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"{key} = {delta!r} is out of range; it must be in (0, 1) and below 1/n, e.g. 1e-5")
    if num_records is not None:
        if isinstance(num_records, bool) or not isinstance(num_records, int) or num_records < 1:
            raise ValueError(f"num_records must be a positive integer, got {num_records!r}")
        if delta >= 1.0 / num_records:
            raise ConfigError(
                f"{key} = {delta!r} is too large for {num_records} records; it must be < 1/n = "
                f"{1.0 / num_records:.3g} (1/n or more lets a whole record leak), "
                f"e.g. {_suggest_delta(num_records):g}"
            )
    return delta


def _suggest_delta(n: int) -> float:
    """A power of ten at or below ``1 / n**1.1`` (a common choice of delta)."""
    return 10.0 ** math.floor(math.log10(n ** -1.1))


def check_sample_rate(sample_rate: Any, key: str = "sample_rate") -> float:
    """Validate a Poisson sampling rate in (0, 1]; return it as a float."""
    q = _number(sample_rate, key)
    if not 0.0 < q <= 1.0:
        raise ConfigError(
            f"{key} = {sample_rate!r} is out of range; it must be in (0, 1] "
            "(batch size / examples, or clients_per_round / num_clients)"
        )
    return q


def check_noise_multiplier(noise_multiplier: Any, key: str = "dp.noise_multiplier") -> float:
    """Validate a noise multiplier >= 0 (0 means no noise: epsilon is infinite)."""
    sigma = _number(noise_multiplier, key)
    if sigma < 0.0:
        raise ConfigError(f"{key} = {noise_multiplier!r} is out of range; it must be >= 0")
    return sigma


def check_target_epsilon(target_epsilon: Any, key: str = "dp.target_epsilon") -> float:
    """Validate a target epsilon > 0; return it as a float."""
    eps = _number(target_epsilon, key)
    if eps <= 0.0:
        raise ConfigError(f"{key} = {target_epsilon!r} is out of range; it must be > 0")
    return eps


def check_steps(steps: Any, key: str = "steps", minimum: int = 0) -> int:
    """Validate a whole number of steps (or rounds) >= ``minimum``."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ConfigError(f"{key} must be an integer, got {steps!r} ({type(steps).__name__})")
    if steps < minimum:
        raise ConfigError(f"{key} = {steps!r} is out of range; it must be >= {minimum}")
    return steps


def validate_dp(cfg, strategy) -> None:
    """Settings a DP claim cannot honour are errors, never a silently wrong epsilon.

    Also resolves ``dp.accountant = "auto"`` in place, so ``summary.json``
    names the accountant used.

    Parameters
    ----------
    cfg : fedpeft.config.Config
        The whole config: DP interacts with ``federation.client_eval`` and
        ``train.batch_sampling``.
    strategy : strategies.Strategy
        The configured rule (client-level DP refuses rules that are not a
        uniform mean of the uploads).

    Raises
    ------
    ConfigError
        Naming the key that makes the DP claim false, and what would be valid.
    """
    dp = cfg.dp
    if dp.accountant == "auto":  # resolved here so summary.json names the accountant used
        dp.accountant = "rdp" if dp.mode == "client" else "pld"
    if dp.mode == "none":
        return
    from fedpeft.privacy.secret import secret_source  # here, so that importing the config never loads torch

    secret_source(dp)  # a missing or empty secret file stops here, before anything is written
    if dp.mode == "sample" and dp.accountant != "pld":
        raise ConfigError(
            f"dp.accountant = {dp.accountant!r} with dp.mode = 'sample': shard sizes are public in fedpeft (they set "
            "the aggregation weights and each client's q = batch_size / n), so the guarantee is for replacing one "
            "example, which only 'pld' accounts (rdp and prv cover add/remove only); use dp.accountant = 'pld' or 'auto'"
        )
    if dp.delta <= 0.0:
        raise ConfigError(f"dp.delta = {dp.delta!r}: a DP guarantee needs a delta in (0, 1 / records), e.g. 1e-5")
    if dp.max_grad_norm <= 0.0:
        raise ConfigError(f"dp.max_grad_norm = {dp.max_grad_norm!r}: the clipping norm must be > 0")
    if dp.target_epsilon == 0.0 and dp.noise_multiplier <= 0.0:
        raise ConfigError("dp.noise_multiplier = 0 adds no noise (epsilon = inf); set it > 0 or set dp.target_epsilon")
    if cfg.federation.client_eval:
        raise ConfigError(
            f"federation.client_eval = true with dp.mode = {dp.mode!r}: each client's accuracy on its own shard would "
            "be released without noise; turn client_eval off (the global test set is still evaluated)"
        )
    if dp.mode == "sample" and cfg.train.batch_sampling == "shuffle":
        raise ConfigError(
            "train.batch_sampling = 'shuffle' with dp.mode = 'sample': the sample-level accounting assumes Poisson "
            "batches; use train.batch_sampling = 'poisson' or 'auto'"
        )
    if dp.mode == "client":
        if strategy.client_dp_unsafe:
            import strategies

            safe = [n for n in strategies.available() if not strategies.get(n).client_dp_unsafe]
            raise ConfigError(
                f"dp.mode = 'client' with strategy {cfg.strategy_name!r} would not be DP: {strategy.client_dp_unsafe}; "
                f"use one of: {', '.join(safe)} (or dp.mode = 'sample', which any strategy keeps)"
            )
        if dp.accountant != "rdp":
            raise ConfigError(
                f"dp.accountant = {dp.accountant!r} with dp.mode = 'client': clients are sampled without replacement, "
                "which only 'rdp' accounts for (dp-accounting's sampled-without-replacement RDP)"
            )
