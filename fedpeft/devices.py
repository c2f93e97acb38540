"""Where a process's tensors live and in what precision they compute.

``federation.device`` names the device ("auto", "cpu", "cuda", "cuda:N");
:func:`resolve` turns it into a :class:`torch.device` this process can use.
``model.dtype`` names the compute precision: "float32", or "bfloat16" run
under :func:`torch.autocast` (weights, optimizer state and DP clipping stay
float32; only the matmuls drop to bfloat16). :func:`gpu_share` is the
fraction of a GPU each simulated client worker reserves from Ray.

A leaf module: it imports nothing of fedpeft but its errors, so the model,
privacy and training layers can all ask it.
"""

from __future__ import annotations

import contextlib
import re
from typing import ContextManager

import torch

from fedpeft.errors import ConfigError

__all__ = ["DEVICES", "DTYPES", "autocast", "check_name", "client_device", "cuda_count", "fork_rng", "gpu_share", "model_device",
           "resolve"]

DEVICES = '"auto", "cpu", "cuda" or "cuda:N"'
"""The valid values of ``federation.device``, in words (for error messages)."""

DTYPES = ("float32", "bfloat16")
"""The valid values of ``model.dtype``."""

_CUDA = re.compile(r"cuda(?::(\d+))?")


def cuda_count() -> int:
    """CUDA devices this process sees (0 without CUDA; a Ray worker sees only those Ray gave it)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(name: str, key: str = "federation.device") -> torch.device:
    """The :class:`torch.device` that ``name`` means in this process.

    Parameters
    ----------
    name : str
        ``"auto"`` (the first CUDA device when there is one, else the CPU),
        ``"cpu"``, ``"cuda"`` (= ``"cuda:0"``) or ``"cuda:N"``.
    key : str
        The config key ``name`` came from, for the error message.

    Raises
    ------
    ConfigError
        For any other string, for CUDA when this process has none, and for
        ``cuda:N`` beyond the devices it has.
    """
    text = check_name(name, key)
    if text == "auto":
        return torch.device("cuda:0") if cuda_count() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    index = int(_CUDA.fullmatch(text).group(1) or 0)
    count = cuda_count()
    if count == 0:
        raise ConfigError(f"{key} = {name!r}, but torch finds no CUDA device here (torch {torch.__version__}, "
                          f"CUDA build: {torch.version.cuda or 'none'}); use \"cpu\" or \"auto\"")
    if index >= count:
        valid = ", ".join(f"cuda:{i}" for i in range(count))
        raise ConfigError(f"{key} = {name!r} is out of range: this machine has {count} CUDA device(s) ({valid}); "
                          f"choose one of: auto, cpu, cuda, {valid}")
    return torch.device("cuda", index)


def check_name(name: str, key: str = "federation.device") -> str:
    """``name`` normalised, if it is one of :data:`DEVICES` (whether this process has that device or not).

    A simulated client worker checks only this: it sees just the GPUs Ray
    gave it (``cuda:0`` for its share, none without one), so the server's
    ``cuda:N`` is not its to resolve (:func:`client_device` picks its device).
    """
    text = str(name).strip().lower()
    if text not in ("auto", "cpu") and _CUDA.fullmatch(text) is None:
        raise ConfigError(f"{key} = {name!r} is not valid; choose one of: {DEVICES}")
    return text


def client_device(name: str, engine: str, client_gpus: float) -> torch.device:
    """The device a client trains on.

    In the simulation engine a worker sees only the GPUs Ray reserved for it
    (``federation.client_gpus`` of one, through ``CUDA_VISIBLE_DEVICES``), so
    a client worker uses its first visible GPU when it has a share and the
    CPU when it has none, whatever ``name`` says: a worker without a share
    must not crowd a GPU that Ray did not give it. Elsewhere the clients run
    in the server's process and use :func:`resolve`'s device.
    """
    if engine == "simulation":
        return torch.device("cuda:0") if client_gpus > 0 and cuda_count() else torch.device("cpu")
    return resolve(name)


def gpu_share(client_gpus: float, device: torch.device) -> float:
    """``num_gpus`` of each simulated client worker in Ray's ``client_resources``.

    ``client_gpus`` is the fraction of one GPU a worker reserves (0.25: four
    workers per GPU); it is 0 on a CPU device, where Ray must not wait for a
    GPU it will never find.
    """
    if client_gpus < 0:
        raise ConfigError(f"federation.client_gpus = {client_gpus!r} is out of range; it must be >= 0")
    return float(client_gpus) if device.type == "cuda" else 0.0


def autocast(device: torch.device | str, dtype: str) -> ContextManager:
    """The context that runs a forward pass in ``model.dtype``.

    ``"bfloat16"`` is :func:`torch.autocast` to bfloat16 on the device's type
    (CPU and CUDA both support it): matmuls and convolutions compute in
    bfloat16, reductions, softmax and losses stay in float32, and so do the
    weights, their gradients and the optimizer's state. ``"float32"`` is a
    no-op.
    """
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "bfloat16":
        device_type = torch.device(device).type
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    raise ConfigError(f"model.dtype = {dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def fork_rng(device: torch.device | str) -> ContextManager:
    """:func:`torch.random.fork_rng` over the CPU generator and, on CUDA, ``device``'s.

    A seeded block (dropout masks in local training) then leaves the
    process's global generators as it found them on either device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device.index or 0], device_type="cuda")
    return torch.random.fork_rng(devices=[])
