"""Experiment design: which victims an audit plays, in which settings, and the studies that vary them.

An *experiment* fixes the victim's training (batch size, local steps,
optimiser, dropout, sentence lengths): the main experiment uses the config
as given, the positive control the setting where the exact span test must
succeed, and the studies vary one thing each away from the control (batch
size, sentence length beyond the rank, training-mode dropout, several local
steps). The victims' sentences come from ``audit.victim_texts`` or the
unseen test split. Nothing here loads a model or runs an attack
(:mod:`fedpeft.audit.runner` plays the experiments).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedpeft.config import AuditConfig, Config
from fedpeft.errors import ConfigError

# Study grid: small enough that the default audit runs in a few minutes on 2 cores.
STUDY_BATCH_SIZES = (2, 4, 8)
STUDY_DROPOUT = 0.1
STUDY_STEPS = 5


@dataclass(frozen=True)
class Experiment:
    """One victim setting: how the victim trains, which sentences it holds, what it is called in the report.

    ``study`` groups the experiments that vary one thing away from the
    positive control; within a group with ``monotone`` set they are ordered
    from easy to hard, so once the study attacks (those that declare a
    ``study_metric``, the span attack) recover nothing the harder ones are
    skipped as saturated.
    """

    name: str
    description: str
    batch_size: int
    local_steps: int
    optimizer: str
    dropout: float
    max_tokens: int = 0  # victims' sentences of at most this many tokens (0 = audit.max_victim_tokens)
    min_tokens: int = 0  # ... and of at least this many
    victims: int = 20
    study: str = ""
    monotone: bool = False



def rank_limit(cfg: Config, s: AuditConfig) -> int:
    """Longest sentence (specials included) the exact span test recovers at batch 1.

    Fewer tokens than the rank at B = 0 (a span of rank r rules nothing
    out), at most the rank once B != 0.
    """
    return cfg.peft.r - 1 if s.round == 1 else cfg.peft.r


def experiments(cfg: Config, s: AuditConfig) -> list[Experiment]:
    """The main experiment, the positive control, then (with ``audit.studies``) the studies.

    The main experiment and the positive control get ``audit.victims``
    victims each. Every study starts from the positive control (batch 1,
    sentences within the rank, dropout off, one step), where the span attack
    succeeds, and varies one thing with ``audit.study_victims`` victims, so
    the report shows how recovery degrades: with batch size, with sentence
    length beyond the rank, with training-mode dropout, with local steps.
    (Varied from the main setting instead, most studies would only confirm a
    recall that is already 0.)
    """
    main = Experiment("main", "the config as given", s.batch_size, s.local_steps, s.optimizer, cfg.model.dropout,
                      victims=s.victims)
    out = [main]
    if not s.studies:
        return out
    short = rank_limit(cfg, s)
    control = replace(main, name="positive control", batch_size=1, local_steps=1, optimizer="sgd", dropout=0.0, max_tokens=short,
                      description=f"positive control: batch 1, one step, dropout off, sentences of at most {short} tokens "
                                  "(specials included)")
    same = (main.batch_size, main.local_steps, main.dropout) == (1, 1, 0.0) and 0 < s.max_victim_tokens <= short
    if not same:
        out.append(control)
    study = replace(control, victims=s.study_victims)
    for b in STUDY_BATCH_SIZES:
        out.append(replace(study, name=f"batch {b}", study="batch size", monotone=True, batch_size=b,
                           description=f"the positive control with batch {b} ({b} sentences of at most {short} tokens)"))
    r, longest = cfg.peft.r, cfg.model.max_length
    for lo, hi in ((short + 1, r + 3), (r + 4, 2 * r), (2 * r + 1, longest)):
        if lo <= min(hi, longest):
            hi = min(hi, longest)
            out.append(replace(study, name=f"{lo}-{hi} tokens", study="sentence length", monotone=True, min_tokens=lo, max_tokens=hi,
                               description=f"the positive control with sentences of {lo}-{hi} tokens (rank {r})"))
    out.append(replace(study, name=f"dropout {STUDY_DROPOUT:g}", study="dropout", dropout=STUDY_DROPOUT,
                       description=f"the positive control with base-model dropout {STUDY_DROPOUT:g} in training mode"))
    for opt in ("sgd", "adamw"):
        out.append(replace(study, name=f"{STUDY_STEPS} steps {opt}", study="local steps", local_steps=STUDY_STEPS, optimizer=opt,
                           description=f"the positive control with {STUDY_STEPS} local {opt} steps; the update read as a scaled gradient"))
    return out


def victim_pool(rt, s: AuditConfig) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Candidate victim examples: ``audit.victim_texts`` or the unseen test split, length-filtered."""
    tok, max_len = rt.model.tokenizer, rt.cfg.model.max_length
    if s.victim_texts:
        texts, labels = read_victim_texts(Path(s.victim_texts), rt.data.num_labels, rt.cfg.federation.seed)
    else:
        texts, labels = list(rt.data.test_texts), np.asarray(rt.data.test_labels)
    ids = [np.asarray(x, dtype=np.int64) for x in tok(list(texts), truncation=True, max_length=max_len)["input_ids"]]
    keep = [i for i, x in enumerate(ids) if not s.max_victim_tokens or len(x) <= s.max_victim_tokens]
    return [ids[i] for i in keep], np.asarray(labels)[keep], [texts[i] for i in keep]


def read_victim_texts(path: Path, num_labels: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Lines of ``path``: ``text`` or ``<label><TAB><text>``; unlabelled lines get a seeded random label."""
    try:
        lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"audit.victim_texts = {str(path)!r}: cannot read it as UTF-8 text ({exc})") from None
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for n, line in enumerate(lines, 1):
        head, tab, rest = line.partition("\t")
        if tab:
            if not head.strip().isdigit() or int(head) >= num_labels:
                raise ConfigError(f"audit.victim_texts line {n}: label {head!r} is not one of 0..{num_labels - 1}")
            texts.append(rest)
            labels.append(int(head))
        else:
            texts.append(line)
            labels.append(int(rng.integers(num_labels)))
    return texts, np.asarray(labels, dtype=np.int64)
