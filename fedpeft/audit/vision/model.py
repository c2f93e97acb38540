"""A small CNN trained from scratch on public digits, then LoRA-adapted with peft.

The base network is what a federation would start from: trained once on the
public part of the image set (never on the victims), with a fixed seed, and
cached as safetensors under ``$FEDPEFT_CACHE`` (default ``~/.cache/fedpeft``)
so every later process loads it in milliseconds. peft then wraps its
convolutions and hidden linear layer in LoRA and trains the head in full
(``modules_to_save``), exactly as the text models are adapted: only LoRA
factors and the head are trainable, and only they ever leave a client.

Activations are ``tanh``: smooth, so the gradient-of-gradient that gradient
matching differentiates is informative everywhere (ReLU's is piecewise zero
in its second derivative, which stalls L-BFGS in DLG).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpeft.audit.vision.data import ImageData, load_images
from fedpeft.models.lora import assert_only_adapter_trainable

LORA_TARGETS = ("conv1", "conv2", "fc")
HEAD = "head"
_VERSION = 1  # bump when the architecture or its training recipe changes: it names the cache file


class DigitCNN(nn.Module):
    """conv 3x3 -> tanh -> conv 3x3 stride 2 -> tanh -> linear -> tanh -> head.

    Parameters
    ----------
    shape : tuple of int
        ``(C, H, W)`` of the input images (H and W even).
    num_classes : int
        Outputs of the head.
    width : int
        Channels of the first convolution (the second has twice as many).
    hidden : int
        Width of the hidden linear layer.
    """

    def __init__(self, shape: tuple[int, int, int], num_classes: int, width: int = 16, hidden: int = 64):
        super().__init__()
        c, h, w = shape
        self.conv1 = nn.Conv2d(c, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width * ((h + 1) // 2) * ((w + 1) // 2), hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = torch.tanh(self.fc(x.flatten(1)))
        return self.head(x)


def cache_root() -> Path:
    return Path(os.environ.get("FEDPEFT_CACHE", Path.home() / ".cache" / "fedpeft"))


def _train(model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def pretrained_base(dataset: str = "digits", seed: int = 0, width: int = 16, hidden: int = 64,
                    epochs: int = 15) -> tuple[DigitCNN, ImageData]:
    """The base CNN trained on the public part of ``dataset`` (cached after the first call).

    Returns
    -------
    (DigitCNN, ImageData)
        The frozen model in eval mode, and the data whose public part trained it.
    """
    data = load_images(dataset)
    model_args = dict(shape=data.shape, num_classes=data.num_classes, width=width, hidden=hidden)
    path = cache_root() / "vision" / f"{dataset}-cnn-w{width}-h{hidden}-e{epochs}-s{seed}-v{_VERSION}.safetensors"
    from safetensors.torch import load_file, save_file

    if path.is_file():
        model = DigitCNN(**model_args)
        model.load_state_dict(load_file(path))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitCNN(**model_args)
            _train(model, data.public_images, data.public_labels, epochs, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a parallel process never reads half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp.name)
        os.replace(tmp.name, path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, data


@dataclass
class VisionLoRA:
    """A LoRA-adapted image classifier and the image set it belongs to."""

    model: nn.Module  # peft.PeftModel over DigitCNN
    data: ImageData
    r: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape


def lora_cnn(dataset: str = "digits", r: int = 4, alpha: float = 8.0, seed: int = 0,
             targets: tuple[str, ...] = LORA_TARGETS) -> VisionLoRA:
    """The pretrained base wrapped in a fresh peft LoRA adapter plus a trainable head.

    The adapter starts as peft initialises it (``B = 0``: the first round of a
    federation); :func:`advance_global_state` moves it to a later round.
    """
    from peft import LoraConfig, get_peft_model

    base, data = pretrained_base(dataset)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), modules_to_save=[HEAD])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
    assert_only_adapter_trainable(model)
    model.eval()
    return VisionLoRA(model=model, data=data, r=r)


def advance_global_state(vlora: VisionLoRA, steps: int = 50, lr: float = 0.05, seed: int = 0) -> None:
    """Train the adapter a few SGD steps on public images: a global state from a later round.

    After this ``B != 0``, so every LoRA factor (not only ``B``) carries a
    gradient, as in any round after the first.
    """
    params = [p for p in vlora.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(np.array(vlora.data.public_images)), torch.from_numpy(np.array(vlora.data.public_labels))
    for _ in range(steps):
        idx = torch.randint(len(x), (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(vlora.model(x[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
