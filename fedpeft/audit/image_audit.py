"""The image part of an audit: the configured image attacks on public digits victims.

Text models have no pixels, so the image attacks (``dlg``,
``inverting-gradients``) audit a stand-in federation under the same threat
model: the small CNN of :mod:`fedpeft.audit.vision` trained on the public
part of scikit-learn's 8x8 digits, wrapped in LoRA at the config's rank and
alpha, attacked at a fresh round (``B = 0``). The config decides what the
victim does: ``audit.victims`` victims, each holding ``audit.batch_size``
private images and running ``audit.local_steps`` SGD steps at
``train.lr``, as DP-SGD clients under ``dp.mode = "sample"``. Every attack
sees the same victims, so one image grid shows all of them.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from fedpeft.audit.attacks.base import Attack
from fedpeft.audit.metrics import bootstrap_ci
from fedpeft.audit.priors import prior_labels
from fedpeft.config import AuditConfig, Config
from fedpeft.errors import ConfigError

IMAGE_DATASET = "digits"
GRID_VICTIMS = 8  # victims shown in the image grid
GRID_IMAGES = 16  # ... and at most this many images (batches of more than two)
GLOBAL_STATE = "fresh"


def is_image_attack(attack: Attack) -> bool:
    """Whether ``attack`` runs on the image experiment (image-only attacks; text ones run on text victims)."""
    return attack.modalities == ("image",)


def check_victims(s: AuditConfig) -> None:
    """Raise a :class:`ConfigError` if ``audit.victims x audit.batch_size`` exceeds the private digits.

    Cheap (the digits ship with scikit-learn), so the audit calls it before
    any text experiment runs.
    """
    from fedpeft.audit.vision.data import load_images

    need, have = s.victims * s.batch_size, len(load_images(IMAGE_DATASET).private_images)
    if need > have:
        raise ConfigError(f"audit.victims x audit.batch_size = {need} images; the image attacks' {IMAGE_DATASET} "
                          f"victims are {have} private images")


def run_image_audit(cfg: Config, s: AuditConfig, attacks: list[Attack], vdp=None,
                    on_victim: Callable[[str, int], Any] | None = None) -> dict[str, Any]:
    """Run every image attack on the same digits victims and summarise them for the report.

    Parameters
    ----------
    cfg : Config
        ``peft.r``, ``peft.alpha``, ``train.lr`` and ``federation.seed`` are used.
    s : AuditConfig
        ``victims``, ``batch_size``, ``local_steps``.
    attacks : list of Attack
        Image attacks (:func:`is_image_attack`); their validated parameters
        (``attack.params``) go to the attack function, ``seed`` offsets the
        restarts only.
    vdp : fedpeft.audit.dp.VictimDP, optional
        The victims' DP-SGD mechanism (``dp.mode = "sample"``); None = honest victims.
    on_victim : callable, optional
        ``on_victim(attack_name, victim_index)`` after each victim.

    Returns
    -------
    dict
        JSON-ready: the setting, one table per attack (PSNR, SSIM and label
        accuracy, each beside the prior-only baseline with a bootstrap 95%
        interval over images) and the grid's pixels (``grid``).
    """
    from fedpeft.audit.dp import dp_image_upload
    from fedpeft.audit.vision.experiment import honest_image_upload
    from fedpeft.audit.vision.model import lora_cnn

    check_victims(s)
    vlora = lora_cnn(IMAGE_DATASET, r=cfg.peft.r, alpha=cfg.peft.alpha, seed=cfg.federation.seed)
    upload = dp_image_upload(vdp.mechanism) if vdp is not None else honest_image_upload
    threads = torch.get_num_threads()
    # The 8x8 model's ops are far too small to split across threads: with two
    # threads on a busy 2-core machine the attacks ran 7-17x slower than with one.
    torch.set_num_threads(1)
    try:
        tables, grid = _attack_all(cfg, s, attacks, vlora, upload, on_victim)
    finally:
        torch.set_num_threads(threads)
    return {
        "dataset": IMAGE_DATASET,
        "description": (f"small CNN trained on the public part of {IMAGE_DATASET} (8x8), LoRA r = {cfg.peft.r}, "
                        f"alpha = {cfg.peft.alpha:g} on its convolutions and hidden layer, head trained in full; "
                        f"fresh round (B = 0); {s.victims} victims of {s.batch_size} private image(s), "
                        f"{s.local_steps} local SGD step(s) at lr {cfg.train.lr:g}"),
        "victims": s.victims,
        "batch_size": s.batch_size,
        "local_steps": s.local_steps,
        "rank": cfg.peft.r,
        "dp": vdp.to_dict() if vdp is not None else None,
        "attacks": tables,
        "grid": grid,
    }


def _attack_all(cfg: Config, s: AuditConfig, attacks: list[Attack], vlora, upload, on_victim) -> tuple[dict, dict]:
    """Every attack on the same victims: ``(tables by attack, grid rows)``."""
    from fedpeft.audit.vision.experiment import run_image_attack

    seed = cfg.federation.seed
    label_prior = np.bincount(vlora.data.public_labels, minlength=vlora.data.num_classes) / len(vlora.data.public_labels)
    tables: dict[str, Any] = {}
    grid: dict[str, list] = {}
    for attack in attacks:
        params = dict(attack.params)
        attack_seed = int(params.pop("seed", 0))
        summary = run_image_attack(attack.name, IMAGE_DATASET, victims=s.victims, batch_size=s.batch_size,
                                   local_steps=s.local_steps, client_lr=cfg.train.lr, global_state=GLOBAL_STATE, seed=seed,
                                   vlora=vlora, upload=upload, attack_seed=attack_seed,
                                   on_victim=(lambda v, name=attack.name: on_victim(name, v)) if on_victim else None, **params)
        tables[attack.name] = _table(attack, summary, label_prior, seed)
        if "originals" not in grid:
            grid["originals"] = _grid_images(summary.originals)
        grid[attack.name] = _grid_images(summary.reconstructions)
    return tables, grid


def _table(attack: Attack, summary, label_prior: np.ndarray, seed: int) -> dict[str, Any]:
    """The metrics ``attack`` declares beside the prior-only baseline, with intervals over images.

    The image experiment measures PSNR, SSIM and label accuracy against the
    original pixels and labels; an image attack that declares anything else
    cannot be scored here.
    """
    hits, base_hits = [], []
    guess = prior_labels(label_prior, summary.batch_size)
    for true, recovered in zip(summary.labels, summary.recovered_labels):
        hits += _hits(recovered, true)
        base_hits += _hits(guess, true)
    measured = {"PSNR (dB)": (summary.psnr, summary.baseline_psnr), "SSIM": (summary.ssim, summary.baseline_ssim),
                "label accuracy": (hits, base_hits)}
    unknown = [m.name for m in attack.metrics if m.name not in measured]
    if unknown:
        raise TypeError(f"image attack {attack.name!r} declares {unknown}; the image experiment measures {list(measured)}")
    return {
        "seconds_per_victim": summary.seconds_per_victim,
        "metrics": {m.name: {"attack": bootstrap_ci(measured[m.name][0], seed=seed).to_dict(),
                             "baseline": bootstrap_ci(measured[m.name][1], seed=seed).to_dict()} for m in attack.metrics},
    }


def _hits(predicted: list[int], true: list[int]) -> list[float]:
    """One 0/1 per true label: whether the predicted multiset covers it (order-free, as batches are)."""
    left = list(predicted)
    out = []
    for t in true:
        if t in left:
            left.remove(t)
            out.append(1.0)
        else:
            out.append(0.0)
    return out


def _grid_images(batches: list[np.ndarray]) -> list:
    """The first victims' images as ``(N, H, W)`` nested lists (first channel), for the grid and audit.json."""
    images = np.concatenate(batches[:GRID_VICTIMS])[:GRID_IMAGES]
    return np.round(images[:, 0], 4).tolist()
