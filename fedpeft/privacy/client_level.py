"""Client-level DP (``dp.mode = "client"``): Flower's central-DP wrappers, accounted by fedpeft.

The mechanism is Flower's: each client's upload is clipped to norm C (on the
server or, with ``fedpeft.client``'s mod, on the client; fixed or adaptive
norm), the strategy aggregates, and the server adds Gaussian noise of std
``sigma * C / m`` to the aggregate of ``m`` sampled clients. fedpeft adds
three things Flower leaves out:

* **Accounting with sampling.** fedpeft samples a fixed number ``m`` of the
  ``N`` clients each round without replacement. The matching neighbouring
  relation is *replace one client*, under which a clipped update moves the
  mean by up to ``2 C / m``: the mechanism is a Gaussian with noise
  multiplier ``sigma / 2`` relative to that sensitivity, amplified by
  sampling without replacement (Wang, Balle and Kasiviswanathan 2019, in
  Google's dp-accounting RDP accountant:
  :class:`fedpeft.privacy.accountants.ClientLevelRDPAccountant`). Flower's
  own accountant covers neither the sampling nor this relation.
* **Which rules it protects.** The noise is only meaningful if the new
  global arrays are the uniform mean of the uploads; rules that build
  anything else from individual updates are refused
  (:attr:`strategies.Strategy.client_dp_unsafe`), and clients are weighted
  equally.
* **Noise only where the data is.** Flower adds noise to every array of the
  aggregate; a factor no client trains (FFA-LoRA's ``A``) carries no data,
  and noising it would destroy the rule's point. The wrappers here add the
  same noise to the private arrays only.
* **Secret noise.** Flower draws from numpy's global generator; fedpeft
  draws each round's noise (and the adaptive clipped-count noise) from
  :mod:`fedpeft.privacy.secret`, never from the public seed, so a reader of
  the run folder cannot regenerate the noise and subtract it.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import compute_stdv

from fedpeft.compat.flwr_internals import DPWrapperHooks, dp_wrapper_class
from fedpeft.privacy.secret import OS_SECRET, SecretSource

__all__ = ["wrap_client_dp", "client_clipping_mod"]


class _NoisePrivateArraysOnly(DPWrapperHooks):
    """Mixin over a Flower DP wrapper: noise on ``private_keys`` only, from the secret
    source, scaled to the clipping norm the round's updates were clipped with.

    Two fixes to Flower 1.41's adaptive wrappers (Andrew et al. 2021):

    * they update the norm between clipping and noising, then scale the noise
      to the *new* norm: when the norm shrinks, that is less noise than the
      clipped updates need. Here the noise follows the norm used for clipping.
    * they feed the fraction of *clipped* updates into Andrew et al.'s rule
      ``C <- C exp(-lr (b - gamma))``, whose ``b`` is the fraction *unclipped*;
      with the sign flipped the norm runs away from the target quantile
      (mostly clipped -> smaller norm -> more clipped). Here ``b`` is the
      unclipped fraction, so ``C`` tracks the ``target_clipped_quantile``
      quantile of the update norms.
    """

    private_keys: frozenset[str] = frozenset()
    secret: SecretSource = OS_SECRET
    round_offset: int = 0
    noise_rng: np.random.Generator

    def aggregate_train(self, server_round: int, replies):
        # One fresh secret stream per round: nothing to store, and with a user secret a resumed run
        # draws the same noise as one that never stopped.
        self.noise_rng = self.secret.generator("server-noise", self.round_offset + server_round)
        screen = getattr(self.strategy, "screen_replies", None)  # fedpeft's adapter: bad replies become zero updates
        return super().aggregate_train(server_round, screen(server_round, replies) if screen else replies)

    def update_clipping_norm(self, clipped_fraction: float) -> None:
        self.round_clipping_norm = self.clipping_norm
        unclipped = 1.0 - clipped_fraction
        self.clipping_norm *= math.exp(-self.clip_norm_lr * (unclipped - self.target_clipped_quantile))

    def noisy_clipped_fraction(self, count: int, total: int) -> float:
        return float(self.noise_rng.normal(count, self.clipped_count_stddev)) / float(total)

    def noise_std(self) -> float:
        """Std of the Gaussian noise added to each private coordinate of this round's aggregate."""
        clip = getattr(self, "round_clipping_norm", self.clipping_norm)
        return compute_stdv(self.noise_multiplier, clip, self.num_sampled_clients)

    def add_noise(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = self.noise_std()
        out = {}
        for key, array in aggregated_arrays.items():
            values = array.numpy()
            if key in self.private_keys:
                values = values + self.noise_rng.normal(0.0, std, values.shape).astype(values.dtype)
            out[key] = Array(np.ascontiguousarray(values))
        self.round_clipping_norm = self.clipping_norm
        return ArrayRecord(out)


_WRAPPERS = {
    ("server", "fixed"): dp_wrapper_class(DifferentialPrivacyServerSideFixedClipping, _NoisePrivateArraysOnly),
    ("server", "adaptive"): dp_wrapper_class(DifferentialPrivacyServerSideAdaptiveClipping, _NoisePrivateArraysOnly),
    ("client", "fixed"): dp_wrapper_class(DifferentialPrivacyClientSideFixedClipping, _NoisePrivateArraysOnly),
    ("client", "adaptive"): dp_wrapper_class(DifferentialPrivacyClientSideAdaptiveClipping, _NoisePrivateArraysOnly),
}


def wrap_client_dp(strategy, dp, noise_multiplier: float, clients_per_round: int, private_keys,
                   secret: SecretSource | None = None, round_offset: int = 0):
    """``strategy`` (a Flower strategy) inside the Flower central-DP wrapper ``dp`` asks for.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The wrapped strategy (fedpeft's adapter).
    dp : fedpeft.config.DPConfig
        ``clip_on`` and ``clipping`` choose the wrapper; ``max_grad_norm`` is
        the (initial) clipping norm.
    noise_multiplier : float
        Sigma (already calibrated if ``dp.target_epsilon`` is set).
    clients_per_round : int
        Clients sampled each round (Flower's ``num_sampled_clients``).
    private_keys : iterable of str
        Array keys that clients train and upload: the only ones noised.
    secret : fedpeft.privacy.secret.SecretSource, optional
        Where the noise comes from (the OS CSPRNG when None); never the public seed.
    round_offset : int
        Rounds done before this start (a resumed run), so noise keys stay absolute.
    """
    cls = _WRAPPERS[(dp.clip_on, dp.clipping)]
    if dp.clipping == "fixed":
        wrapper = cls(strategy, noise_multiplier, dp.max_grad_norm, clients_per_round)
    else:
        wrapper = cls(
            strategy,
            noise_multiplier,
            clients_per_round,
            initial_clipping_norm=dp.max_grad_norm,
            target_clipped_quantile=dp.target_clipped_quantile,
            clip_norm_lr=dp.clip_norm_lr,
            clipped_count_stddev=dp.clipped_count_stddev or None,
        )
    wrapper.private_keys = frozenset(private_keys)
    wrapper.secret = secret or OS_SECRET
    wrapper.round_offset = int(round_offset)
    wrapper.noise_rng = wrapper.secret.generator("server-noise", 0)
    return wrapper


def client_clipping_mod(dp):
    """The Flower client mod that clips train replies for ``dp`` (None if the server clips)."""
    if dp.mode != "client" or dp.clip_on != "client":
        return None
    mod = fixedclipping_mod if dp.clipping == "fixed" else adaptiveclipping_mod

    def train_only(msg: Message, context, call_next):
        # Flower's mod expects a train message; queries and evaluations pass through.
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        return mod(msg, context, call_next)

    return train_only
