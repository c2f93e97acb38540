"""Run an audit: victims, their payloads, every attack, scores with baselines and intervals.

An *experiment* fixes the victim's training (batch size, local steps,
optimiser, dropout, sentence lengths) and plays its victims through it: the
main experiment uses the config as given, the positive control the setting
where the exact span test must succeed, and the studies vary one thing each
away from the control (batch size, sentence length beyond the rank,
training-mode dropout, several local steps). Every attack metric is paired
with a prior-only baseline, i.e. what the server would guess from its public
prior without looking at the payload. With ``dp.mode = "sample"`` every
victim is a DP-SGD client (:mod:`fedpeft.audit.dp`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fedpeft.audit.attacks import get_attack
from fedpeft.audit.attacks.base import Attack, AttackResult
from fedpeft.audit.attacks.label_recovery import largest_remainder
from fedpeft.audit.metrics import best_cosine, bootstrap_ci, exact_recovery, label_accuracy, rouge, token_prf
from fedpeft.audit.observe import Truth, UploadFn, honest_upload, observe
from fedpeft.audit.settings import AuditSettings
from fedpeft.config import Config
from fedpeft.errors import ConfigError

THREAT_MODEL = (
    "An honest-but-curious server sees one client's payload for one round: the gradient of the "
    "trainable tensors after one local step (or the update after several local steps) together with "
    "the global state it sent. It knows the model and the architecture, the label set and a public "
    "prior (the training split's token and label frequencies); it does not see the client's data."
)

# Study grid: small enough that the default audit runs in a few minutes on 2 cores.
STUDY_BATCH_SIZES = (2, 4, 8)
STUDY_DROPOUT = 0.1
STUDY_STEPS = 5
LENGTH_BUCKETS = (8, 16, 24, 32, 48, 512)
SPAN_RECALL = ("lora-span", "token recall")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Experiment:
    """One victim setting: how the victim trains, which sentences it holds, what it is called in the report.

    ``study`` groups the experiments that vary one thing away from the
    positive control; within a group with ``monotone`` set they are ordered
    from easy to hard, so once the span attack recovers nothing the harder
    ones are skipped as saturated.
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


@dataclass
class Prior:
    """What the server knows without the payload (from public data)."""

    token_ranking: list[int]  # content tokens, most frequent first
    label_freq: np.ndarray
    mean_prediction: np.ndarray  # the global model's mean softmax on public rows
    mean_features: dict[str, np.ndarray]  # mean head inputs on public rows

    def for_attacks(self) -> dict[str, Any]:
        return {"token_ranking": self.token_ranking, "label_freq": self.label_freq, "mean_prediction": self.mean_prediction}


def rank_limit(cfg: Config, s: AuditSettings) -> int:
    """Longest sentence (specials included) the exact span test recovers at batch 1.

    Fewer tokens than the rank at B = 0 (a span of rank r rules nothing
    out), at most the rank once B != 0.
    """
    return cfg.peft.r - 1 if s.round == 1 else cfg.peft.r


def experiments(cfg: Config, s: AuditSettings) -> list[Experiment]:
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


def victim_pool(rt, s: AuditSettings) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
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


def global_state(rt, s: AuditSettings, public: np.ndarray):
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


@torch.no_grad()
def build_prior(rt, sent, public: np.ndarray, special: set[int]) -> Prior:
    """Token ranking and label frequencies of the public rows, and the global model's mean outputs on them."""
    from fedpeft.audit.observe import capture_head_inputs

    split, _ = rt.splits
    counts = Counter(int(t) for i in public for t in split.ids[i] if int(t) not in special)
    label_freq = np.bincount(split.labels[public], minlength=rt.data.num_labels) / len(public)
    model = rt.model
    model.set_payload(sent)
    rows = public[:64]  # the model-based parts need a forward pass: a sample is enough for a mean
    feats: dict[str, list[np.ndarray]] = {}
    preds = []
    for start in range(0, len(rows), 64):
        idx = rows[start : start + 64]
        seen: dict[str, np.ndarray] = {}
        batch = split.subset(idx).batch(np.arange(len(idx)), "classification")
        with capture_head_inputs(model, seen):
            logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        preds.append(torch.softmax(logits, -1).numpy())
        for k, v in seen.items():
            feats.setdefault(k, []).append(v)
    return Prior(
        token_ranking=[t for t, _ in counts.most_common()],
        label_freq=label_freq,
        mean_prediction=np.concatenate(preds).mean(0),
        mean_features={k: np.concatenate(v).mean(0) for k, v in feats.items()},
    )


def score(result: AttackResult, truth: Truth, prior: Prior, tokenizer, special: set[int]) -> dict[str, tuple[float, float]]:
    """``metric -> (attack value, prior-only baseline value)`` for one victim."""
    rec = result.reconstruction
    out: dict[str, tuple[float, float]] = {}
    if "labels" in rec:
        n = len(truth.labels)
        if n == 1:
            base = [int(np.argmax(prior.label_freq))]
        else:
            counts = largest_remainder(n * prior.label_freq, n)
            base = [c for c, k in enumerate(counts) for _ in range(k)]
        out["label accuracy"] = (label_accuracy(rec["labels"], truth.labels.tolist()), label_accuracy(base, truth.labels.tolist()))
    if "features" in rec:
        for layer, guess in rec["features"].items():
            if layer in truth.head_inputs:
                base = prior.mean_features.get(layer, np.zeros_like(guess))
                out[f"cosine {layer} input"] = (best_cosine(guess, truth.head_inputs[layer]), best_cosine(base, truth.head_inputs[layer]))
    if "tokens" in rec:
        true_ids = [int(t) for x in truth.ids for t in x]
        content = [t for t in true_ids if t not in special]
        guess = rec["tokens"]
        base = prior.token_ranking[: len(content)]  # the n most frequent public tokens (told the length, generous)
        reference = " ".join(truth.texts)
        for key, (value, b) in zip(("token precision", "token recall", "token F1"),
                                   zip(token_prf(guess, true_ids, special), token_prf(base, true_ids, special))):
            out[key] = (value, b)
        r_att = rouge(tokenizer.decode([t for t in guess if t not in special]), reference)
        r_base = rouge(tokenizer.decode(base), reference)
        out["ROUGE-1"] = (r_att[0], r_base[0])
        out["ROUGE-2"] = (r_att[1], r_base[1])
        ordered = [t for _, t in sorted(zip(rec.get("positions", range(len(guess))), guess), key=lambda x: x[0])]
        out["exact recovery"] = (exact_recovery(ordered, true_ids, special) if len(truth.ids) == 1 else
                                 float(Counter(t for t in guess if t not in special) == Counter(content)),
                                 exact_recovery(base, true_ids, special))
    return out


def marked_text(truth: Truth, result: AttackResult, tokenizer, special: set[int]) -> str:
    """The victim's wordpieces with the recovered ones in **bold** (markdown)."""
    left = Counter(t for t in result.reconstruction.get("tokens", []) if t not in special)
    words = []
    for x in truth.ids:
        for t in (int(v) for v in x):
            if t in special:
                continue
            piece = tokenizer.convert_ids_to_tokens([t])[0].replace("*", "\\*")
            if left[t] > 0:
                left[t] -= 1
                words.append(f"**{piece}**")
            else:
                words.append(piece)
    return " ".join(words)


def run_audit(cfg: Config, s: AuditSettings, progress: Progress | None = None, upload: UploadFn | None = None) -> dict[str, Any]:
    """Run every experiment and return the audit as a JSON-ready dict.

    Text attacks run on the text experiments (:func:`experiments`), image
    attacks (``dlg``, ``inverting-gradients``) on the image experiment
    (:mod:`fedpeft.audit.image_audit`); with no text attack the text model is
    never loaded.

    Parameters
    ----------
    cfg : Config
        The run config (model, adapter, strategy, ``train.lr``, ``dp``).
    s : AuditSettings
        The parsed ``[audit]`` table.
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
    attacks: list[Attack] = [get_attack(n)(**s.params.get(n, {})) for n in s.attacks]
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


def run_text_experiments(cfg: Config, s: AuditSettings, attacks: list[Attack], exps: list[Experiment], dps: dict,
                         upload: UploadFn | None, progress: Progress | None, total: int) -> list[dict[str, Any]]:
    """Load the text model, build the server's prior and play every text experiment (see :func:`run_audit`)."""
    from fedpeft.audit.dp import dp_upload
    from fedpeft.runtime import runtime

    rt = runtime(cfg)
    split, _ = rt.splits
    tok = rt.model.tokenizer
    special = set(tok.all_special_ids)
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
    saturated: dict[str, str] = {}  # study -> the experiment at which span recall reached 0
    for exp in exps:
        pool = order[(lengths[order] >= exp.min_tokens) & ((lengths[order] <= exp.max_tokens) if exp.max_tokens else True)]
        reason = ""
        if exp.study in saturated:
            reason = f"saturated: the span attack already recovers nothing at {saturated[exp.study]}"
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
        recall = result["attacks"].get(SPAN_RECALL[0], {}).get("metrics", {}).get(SPAN_RECALL[1])
        if exp.monotone and recall is not None and recall["attack"]["mean"] == 0.0:
            saturated[exp.study] = exp.name
    return out_exps


DP_NOTES = {
    "sample": "each victim runs DP-SGD on its batch (its whole shard, so q = 1) and uploads the clipped, noised result; "
              "the epsilon beside each experiment is the accountant's for that one observed round",
    "client": "client-level DP adds its noise to the aggregate on the server: a curious server sees each upload "
              "before the noise, so the victims' uploads are not noised here (only the released model is protected)",
}


def empirical_privacy(cfg: Config, s: AuditSettings, main_dp):
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
        return client_path_audit(main_dp.noise_multiplier, main_dp.max_grad_norm, steps=main_dp.steps, **common)
    return sample_level_audit(0.0, dp.max_grad_norm or 1.0, steps=s.local_steps, accountant="rdp", **common)


def run_experiment(exp: Experiment, rt, sent, prior: Prior, attacks: list[Attack], data, pool: np.ndarray,
                   upload: UploadFn, cfg: Config, on_victim: Callable[[int], Any]) -> dict[str, Any]:
    """Play ``exp.victims`` victims drawn from ``pool`` through every attack; scores with intervals."""
    ids, labels, texts = data
    tok = rt.model.tokenizer
    special = set(tok.all_special_ids)
    per_attack: dict[str, dict[str, list[tuple[float, float]]]] = {a.name: {} for a in attacks}
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
        row = {"victim": v, "tokens": int(sum(len(x) for x in truth.ids)), "metrics": {}}
        for attack in attacks:
            reason = attack.applicable(obs)
            if reason:
                skipped[attack.name] = reason
                continue
            t = time.perf_counter()
            result = attack.run(obs, prior.for_attacks())
            seconds[attack.name] += time.perf_counter() - t
            for metric, pair in score(result, truth, prior, tok, special).items():
                per_attack[attack.name].setdefault(metric, []).append(pair)
                row["metrics"][f"{attack.name}: {metric}"] = pair[0]
            if "tokens" in result.reconstruction and len(examples) < 5:
                examples.append({"victim": v, "text": " / ".join(truth.texts), "marked": marked_text(truth, result, tok, special),
                                 "recovered": tok.decode([t for t in result.reconstruction["tokens"] if t not in special])})
        rows.append(row)
        on_victim(v)
    table = {}
    for name, metrics in per_attack.items():
        if name in skipped and not metrics:
            table[name] = {"skipped": skipped[name]}
            continue
        table[name] = {
            "seconds_per_victim": seconds[name] / exp.victims,
            "metrics": {m: {"attack": bootstrap_ci([p[0] for p in pairs], seed=cfg.federation.seed).to_dict(),
                            "baseline": bootstrap_ci([p[1] for p in pairs], seed=cfg.federation.seed).to_dict()}
                        for m, pairs in metrics.items()},
        }
    return {**asdict(exp), "attacks": table, "by_length": by_length(rows), "victim_rows": rows, "examples": examples}


def by_length(rows: list[dict]) -> list[dict]:
    """Mean span-attack token recall by the victim batch's token count (specials included)."""
    key = "lora-span: token recall"
    out = []
    lo = 0
    for hi in LENGTH_BUCKETS:
        vals = [r["metrics"][key] for r in rows if key in r["metrics"] and lo < r["tokens"] <= hi]
        if vals:
            out.append({"tokens": f"{lo + 1}-{hi}", "victims": len(vals), "recall": bootstrap_ci(vals).to_dict()})
        lo = hi
    return out
