"""Secret randomness for the DP mechanisms.

fedpeft's threat model gives the adversary the code, the config and
``federation.seed`` (it is in ``summary.json``). Randomness that a DP
guarantee rests on must therefore come from somewhere else, or the adversary
regenerates it and subtracts it: the DP-SGD noise and Poisson batch
membership on each client, the server's noise under client-level DP, and the
client sampling whose amplification the client-level accountant claims.
Everything else (initialisation, dropout, shuffling without DP, client
sampling under sample-level DP, where no amplification by it is claimed)
stays seeded, so runs without DP are bit-for-bit repeatable.

Two sources:

* **the operating system's CSPRNG** (default): every draw seeds a fresh
  generator with 128 bits from :mod:`secrets`. Nothing is stored, so a
  resumed run continues with fresh randomness: the same distribution, and
  the same accountant, as a run that never stopped, but not the same bits.
* **a secret the user supplies** (``dp.secret_file``): the file's SHA-256
  and a public key per draw (purpose, round, client) feed
  :class:`numpy.random.SeedSequence`, so a DP run is repeatable and resumes
  bit for bit. Its epsilon then holds only while that file stays secret:
  whoever reads it can replay every noise draw.

The torch generators that opacus draws its Gaussian noise from are seeded
with 63 bits of such a stream. That is computationally, not
information-theoretically, secret (opacus's ``secure_mode`` needs
``torchcsprng``, which does not install with the pinned torch), and like
every floating-point Gaussian sampler it is not hardened against
Mironov-style floating-point attacks.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpeft.errors import ConfigError

__all__ = ["SecretSource", "OS_SECRET", "secret_source"]


def _purpose_code(purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4], "big")


@dataclass(frozen=True)
class SecretSource:
    """Where a DP mechanism's randomness comes from.

    Attributes
    ----------
    entropy : int or None
        The user's secret as an integer; None draws from the OS CSPRNG.
    origin : str
        ``"os"`` or the secret file's path (for reports; never the secret).
    """

    entropy: int | None = None
    origin: str = "os"

    @property
    def user_supplied(self) -> bool:
        return self.entropy is not None

    def generator(self, purpose: str, *key: int) -> np.random.Generator:
        """A numpy generator for one draw of ``purpose`` (e.g. ``"dp-sgd"``) at ``key`` (round, client, ...).

        With the OS source each call is independent of every other; with a
        user secret the same ``(purpose, key)`` gives the same stream.
        """
        if self.entropy is None:
            return np.random.default_rng(secrets.randbits(128))
        spawn = (_purpose_code(purpose), *(int(k) for k in key))
        return np.random.default_rng(np.random.SeedSequence(entropy=self.entropy, spawn_key=spawn))

    def torch_generator(self, purpose: str, *key: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A torch generator on ``device`` seeded from :meth:`generator` (opacus's noise source).

        opacus draws each noise tensor on its parameter's device from the
        generator it is given, so the generator must live on that device
        (torch refuses a CPU generator for a CUDA draw). The seed is the same
        on every device; the streams CPU and CUDA generators make from it
        differ, so a user-secret run repeats on the same kind of device.
        """
        seed = int(self.generator(purpose, *key).integers(0, 2**63 - 1))
        return torch.Generator(device=torch.device(device)).manual_seed(seed)

    def describe(self) -> str:
        """One line for reports: where the protecting randomness came from."""
        if self.entropy is None:
            return "secret: the operating system's CSPRNG, never stored"
        return (f"repeatable from the user's secret in {self.origin}: the epsilon holds only while that file is kept "
                "secret")


OS_SECRET = SecretSource()
"""The default source: fresh OS randomness for every draw."""


def secret_source(dp_cfg) -> SecretSource:
    """The source ``dp.secret_file`` asks for (the OS CSPRNG when it is empty).

    Raises
    ------
    ConfigError
        If the file is missing, unreadable or empty.
    """
    path = str(getattr(dp_cfg, "secret_file", "") or "")
    if not path:
        return OS_SECRET
    return _file_secret(str(Path(path).expanduser().resolve()))


def _file_secret(path: str) -> SecretSource:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"dp.secret_file = {path!r} cannot be read ({exc.strerror or exc}); give a readable file "
                          "holding your secret, or leave dp.secret_file empty for OS randomness") from None
    if not data.strip():
        raise ConfigError(f"dp.secret_file = {path!r} is empty; put a long random secret in it "
                          "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > FILE`)")
    return SecretSource(entropy=int.from_bytes(hashlib.sha256(data).digest(), "big"), origin=path)
