"""Orchestrate an audit: play every experiment's victims through every attack and collect the scores.

The experiments come from :mod:`fedpeft.audit.design`, the server's prior
and its baselines from :mod:`fedpeft.audit.priors`; each attack scores its
own results against the victim's data with the metrics it declares
(:meth:`fedpeft.audit.attacks.base.Attack.score`), and
:mod:`fedpeft.audit.scoring` turns them into means with bootstrap intervals
over victims. Image attacks run on the image experiment
(:mod:`fedpeft.audit.image_audit`), the canary audit on the configured DP
mechanism (:mod:`fedpeft.audit.empirical`). With ``dp.mode = "sample"``
every victim is a DP-SGD client (:mod:`fedpeft.audit.dp`).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable

import numpy as np

from fedpeft.audit.attacks import build_attacks
from fedpeft.audit.attacks.base import Attack
from fedpeft.audit.design import Experiment, experiments, victim_pool
from fedpeft.audit.observe import Truth, UploadFn, honest_upload, observe
from fedpeft.audit.priors import Prior, build_prior
from fedpeft.audit.scoring import Pair, ScoreContext, by_length, metric_table
from fedpeft.config import AuditConfig, Config
from fedpeft.errors import ConfigError

THREAT_MODEL = (
    "An honest-but-curious server sees one client's payload for one round: the gradient of the "
    "trainable tensors after one local step (or the update after several local steps) together with "
    "the global state it sent. It knows the model and the architecture, the label set and a public "
    "prior (the training split's token and label frequencies); it does not see the client's data."
)

Progress = Callable[[str, int, int], None]


def global_state(rt, s: AuditConfig, public: np.ndarray):
    """The payload the server sends in ``audit.round``.

    Round 1 is the seeded initial adapter (B = 0). Later rounds are
    approximated by training it for (round - 1) * ``train.local_steps`` steps
    on public training rows, which gives the B != 0 regime a real run reaches.
    """
    from fedpeft.training import train_steps

    model = rt.model
    model.set_payload(model.initial, trainable=rt.strategy.trainable)
    if s.round == 1:
        return model.initial
    split, _ = rt.splits
    t = rt.cfg.train
    train_steps(model.model, split, public, task="classification", steps=(s.round - 1) * t.local_steps, batch_size=t.batch_size,
                lr=t.lr, weight_decay=t.weight_decay, seed=rt.cfg.federation.seed)
    sent = model.payload()
    model.set_payload(model.initial)  # leave the resident model as loaded
    return sent


def run_audit(cfg: Config, s: AuditConfig | None = None, progress: Progress | None = None,
              upload: UploadFn | None = None) -> dict[str, Any]:
    """Run every experiment and return the audit as a JSON-ready dict.

    Text attacks run on the text experiments (:func:`fedpeft.audit.design.experiments`),
    image-only attacks (``dlg``, ``inverting-gradients``) on the image experiment
    (:mod:`fedpeft.audit.image_audit`); with no text attack the text model is
    never loaded.

    Parameters
    ----------
    cfg : Config
        The run config (model, adapter, strategy, ``train.lr``, ``dp``).
    s : AuditConfig, optional
        The audit settings; default ``cfg.audit``.
    progress : callable, optional
        ``progress(description, done, total)`` after every victim.
    upload : UploadFn, optional
        How a text victim computes its upload. By default it follows
        ``cfg.dp``: a DP-SGD client with ``dp.mode = "sample"`` (its epsilon
        is reported with each experiment), an honest client otherwise. The
        image victims follow ``cfg.dp`` unless ``upload`` is given, when they
        are honest.
    """
    from fedpeft.audit.dp import victim_dp
    from fedpeft.audit.image_audit import check_victims, is_image_attack, run_image_audit

    t0 = time.perf_counter()
    s = cfg.audit if s is None else s
    attacks = build_attacks(s)
    text_attacks = [a for a in attacks if not is_image_attack(a)]
    image_attacks = [a for a in attacks if is_image_attack(a)]
    exps = experiments(cfg, s) if text_attacks else []
    # Calibrate before loading anything: a bad dp.* value fails in a second.
    main_dp = victim_dp(cfg.dp, s.local_steps, s.batch_size)
    dps = {e.name: victim_dp(cfg.dp, e.local_steps, e.batch_size) for e in exps} if upload is None else {}
    if image_attacks:
        check_victims(s)  # before the text experiments' minutes, not after
    total = sum(e.victims for e in exps) + len(image_attacks) * s.victims
    out_exps = run_text_experiments(cfg, s, text_attacks, exps, dps, upload, progress, total) if text_attacks else []
    images = None
    if image_attacks:
        done = sum(e.victims for e in exps)
        order = {a.name: i for i, a in enumerate(image_attacks)}

        def on_image(name: str, v: int) -> None:
            if progress:
                progress(f"images, {name}: victim {v + 1}/{s.victims}", done + order[name] * s.victims + v + 1, total)

        images = run_image_audit(cfg, s, image_attacks, main_dp if upload is None else None, on_image)
    if s.empirical:
        if progress:
            progress("canary audit (empirical epsilon)", total, total)
        empirical = empirical_privacy(cfg, s, main_dp if upload is None else None).to_dict()
    else:
        empirical = None
    return {
        "threat_model": THREAT_MODEL,
        "settings": {**asdict(s), "round": s.round, "lr": cfg.train.lr, "rank": cfg.peft.r, "model": cfg.model.name,
                     "strategy": cfg.strategy_name, "dp": cfg.dp.mode, "regime": "B = 0 (fresh round)" if s.round == 1 else "B != 0",
                     "dp_note": DP_NOTES.get(cfg.dp.mode, "")},
        "experiments": out_exps,
        "images": images,
        "empirical": empirical,
        "wall_s": time.perf_counter() - t0,
        "config": cfg.to_dict(),
    }


def run_text_experiments(cfg: Config, s: AuditConfig, attacks: list[Attack], exps: list[Experiment], dps: dict,
                         upload: UploadFn | None, progress: Progress | None, total: int) -> list[dict[str, Any]]:
    """Load the text model, build the server's prior and play every text experiment (see :func:`run_audit`)."""
    from fedpeft.audit.dp import dp_upload
    from fedpeft.runtime import runtime

    rt = runtime(cfg)
    split, _ = rt.splits
    special = set(rt.model.tokenizer.all_special_ids)
    rng = np.random.default_rng(cfg.federation.seed)
    public = rng.permutation(len(split))[: s.prior_examples]
    sent = global_state(rt, s, public)
    prior = build_prior(rt, sent, public, special)
    ids, labels, texts = victim_pool(rt, s)
    if len(ids) < s.victims * s.batch_size:
        src = f"audit.victim_texts = {s.victim_texts!r}" if s.victim_texts else "the test split"
        raise ConfigError(f"audit.victims = {s.victims} x audit.batch_size = {s.batch_size} needs {s.victims * s.batch_size} sentences; "
                          f"{src} has {len(ids)} that fit (audit.max_victim_tokens = {s.max_victim_tokens})")
    order = rng.permutation(len(ids))
    lengths = np.array([len(x) for x in ids])
    done = 0
    out_exps = []
    saturated: dict[str, str] = {}  # study -> the experiment at which the study attacks recovered nothing
    for exp in exps:
        pool = order[(lengths[order] >= exp.min_tokens) & ((lengths[order] <= exp.max_tokens) if exp.max_tokens else True)]
        reason = ""
        if exp.study in saturated:
            reason = f"saturated: {study_metrics(attacks)} already 0 at {saturated[exp.study]}"
        elif len(pool) == 0:
            reason = f"no victim sentence has {exp.min_tokens or 1}-{exp.max_tokens or 'any'} tokens"
        if reason:
            out_exps.append({**asdict(exp), "victims": 0, "skipped": reason})
            done += exp.victims
            continue
        vdp = dps.get(exp.name)
        exp_upload = upload or (dp_upload(vdp.mechanism, cfg.train.weight_decay) if vdp else honest_upload)
        result = run_experiment(exp, rt, sent, prior, attacks, (ids, labels, texts), pool, exp_upload, cfg,
                                lambda v: progress and progress(f"{exp.name}: victim {v + 1}/{exp.victims}", done + v + 1, total))
        done += exp.victims
        result["dp"] = vdp.to_dict() if vdp else None
        out_exps.append(result)
        if exp.monotone and recovers_nothing(result, attacks):
            saturated[exp.study] = exp.name
    return out_exps


def recovers_nothing(result: dict[str, Any], attacks: list[Attack]) -> bool:
    """Whether every study attack (one with a ``study_metric``) that scored ``result`` has a mean of 0 on it."""
    means = [result["attacks"][a.name]["metrics"][a.study_metric]["attack"]["mean"]
             for a in attacks if a.study_metric and a.study_metric in result["attacks"].get(a.name, {}).get("metrics", {})]
    return bool(means) and all(m == 0.0 for m in means)


def study_metrics(attacks: list[Attack]) -> str:
    """The study attacks' metrics that decide saturation, for the skip reason (e.g. ``lora-span token recall``)."""
    return " and ".join(f"{a.name} {a.study_metric}" for a in attacks if a.study_metric)


DP_NOTES = {
    "sample": "each victim runs DP-SGD on its batch (its whole shard, so q = 1) and uploads the clipped, noised result; "
              "the epsilon beside each experiment is the accountant's for that one observed round",
    "client": "client-level DP adds its noise to the aggregate on the server: a curious server sees each upload "
              "before the noise, so the victims' uploads are not noised here (only the released model is protected)",
}


def empirical_privacy(cfg: Config, s: AuditConfig, main_dp):
    """The canary audit of the configured mechanism (:mod:`fedpeft.audit.empirical`).

    Sample level: the main experiment's DP-SGD (sigma, C, steps) through
    the real ClientApp (:func:`fedpeft.audit.client_path.client_path_audit`).
    Client level: one round of the run's central DP (sigma calibrated for
    the run, fixed clipping at ``dp.max_grad_norm``) through the server's
    wrapper. Both are played by a server that replays the code with every
    public value. Without DP: the victim's clipping with no noise, which
    shows what the canary test reaches when nothing protects the sample.
    """
    from fedpeft.audit.client_path import client_path_audit
    from fedpeft.audit.empirical import client_level_audit, sample_level_audit

    dp, fed = cfg.dp, cfg.federation
    common = dict(trials=s.canary_trials, delta=dp.delta, confidence=s.confidence, seed=fed.seed)
    if dp.mode == "client":
        from fedpeft.privacy.calibration import calibrate_client_noise

        m = cfg.clients_per_round
        sigma = (calibrate_client_noise(dp.target_epsilon, dp.delta, fed.num_clients, m, fed.num_rounds)
                 if dp.target_epsilon else dp.noise_multiplier)
        return client_level_audit(sigma, dp.max_grad_norm, num_clients=fed.num_clients, clients_per_round=m, **common)
    if main_dp is not None:
        return client_path_audit(main_dp.noise_multiplier, main_dp.max_grad_norm, steps=main_dp.steps,
                                 device=fed.device, **common)
    return sample_level_audit(0.0, dp.max_grad_norm or 1.0, steps=s.local_steps, accountant="rdp", **common)


def run_experiment(exp: Experiment, rt, sent, prior: Prior, attacks: list[Attack], data, pool: np.ndarray,
                   upload: UploadFn, cfg: Config, on_victim: Callable[[int], Any]) -> dict[str, Any]:
    """Play ``exp.victims`` victims drawn from ``pool`` through every attack; scores with intervals."""
    ids, labels, texts = data
    tok = rt.model.tokenizer
    per_attack: dict[str, dict[str, list[Pair]]] = {a.name: {} for a in attacks}
    skipped: dict[str, str] = {}
    seconds: dict[str, float] = {a.name: 0.0 for a in attacks}
    rows, examples = [], []
    for v in range(exp.victims):
        # Victims wrap around the pool when a study's batches need more rows than it has.
        pick = [pool[(v * exp.batch_size + j) % len(pool)] for j in range(exp.batch_size)]
        truth = Truth(ids=[ids[i] for i in pick], labels=labels[pick], texts=[texts[i] for i in pick])
        obs = observe(rt.model, rt.strategy, sent, truth, lr=cfg.train.lr, local_steps=exp.local_steps, optimizer=exp.optimizer,
                      seed=cfg.federation.seed + v, num_labels=rt.data.num_labels, dropout=exp.dropout, upload=upload)
        obs.extra["max_length"] = cfg.model.max_length
        ctx = ScoreContext.of(truth, prior, tok)
        row = {"victim": v, "tokens": int(sum(len(x) for x in truth.ids)), "metrics": {}}
        for attack in attacks:
            reason = attack.applicable(obs)
            if reason:
                skipped[attack.name] = reason
                continue
            t = time.perf_counter()
            result = attack.run(obs, prior.for_attacks())
            seconds[attack.name] += time.perf_counter() - t
            for metric, pair in declared_scores(attack, attack.score(result, ctx)).items():
                per_attack[attack.name].setdefault(metric, []).append(pair)
                row["metrics"][f"{attack.name}: {metric}"] = pair[0]
            example = attack.example(result, ctx, v) if len(examples) < 5 else None
            if example is not None:
                examples.append(example)
        rows.append(row)
        on_victim(v)
    table = {}
    for name, metrics in per_attack.items():
        if name in skipped and not metrics:
            table[name] = {"skipped": skipped[name]}
            continue
        table[name] = {"seconds_per_victim": seconds[name] / exp.victims, "metrics": metric_table(metrics, cfg.federation.seed)}
    study = next((a for a in attacks if a.study_metric), None)
    lengths = by_length(rows, f"{study.name}: {study.study_metric}") if study else []
    return {**asdict(exp), "attacks": table, "by_length": lengths, "victim_rows": rows, "examples": examples}


def declared_scores(attack: Attack, scores: dict[str, Pair]) -> dict[str, Pair]:
    """``scores`` checked against the metrics ``attack`` declares, values as floats.

    An undeclared name is a bug in the attack (its unit and baseline would be
    unknown), so it fails loudly rather than landing in the report.
    """
    out = {}
    for metric, (value, baseline) in scores.items():
        if attack.metric(metric) is None:
            declared = ", ".join(m.name for m in attack.metrics) or "none"
            raise TypeError(f"attack {attack.name!r} scored {metric!r}, which it does not declare (declared: {declared})")
        out[metric] = (float(value), float(baseline))
    return out
