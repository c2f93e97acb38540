"""The one typed configuration of a fedpeft run.

A run is described by TOML sections that mirror the dataclasses below
(``[federation]``, ``[data]``, ``[model]``, ``[peft]``, ``[train]``,
``[strategy]``, ``[dp]``, ``[audit]``). ``load_config`` reads a file, applies
``--set section.key=value`` overrides and validates everything before a single
model weight is loaded, so a typo costs a second, not a run.

Every field carries its help text and its valid range in ``metadata`` so the
error for a bad value can name the key and what would be valid.
"""

from __future__ import annotations

import copy
import json
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")


def _f(default: Any, help: str, **limits: Any) -> Any:
    """A dataclass field with a help string and optional ``min``/``max``/``choices`` (and ``expect``: its valid values in words)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **limits})
    return field(default=default, metadata={"help": help, **limits})


@dataclass
class FederationConfig:
    num_clients: int = _f(10, "clients in the federation (1 = centralised reference)", min=1)
    clients_per_round: int = _f(0, "clients sampled each round (0 = all)", min=0)
    num_nodes: int = _f(0, "Flower nodes (SuperNodes) that run the clients: each round's sampled clients are dealt to "
                           "them in turn, so start-up and memory do not grow with num_clients (0 = min(num_clients, "
                           "clients per round))", min=0)
    num_rounds: int = _f(6, "federated rounds", min=1)
    seed: int = _f(0, "seed for sampling, initialisation and local batches", min=0)
    engine: str = _f("simulation", "simulation (Flower + Ray workers), inprocess (same apps, direct calls) or batched "
                                   "(in-process; each round's sampled clients train together in one batched pass)",
                     choices=("simulation", "inprocess", "batched"))
    batch_clients: int = _f(0, "engine = batched: clients trained together per pass, to bound memory (0 = all sampled "
                               "clients of the round)", min=0)
    max_update_norm: float = _f(0.0, "reject a client's reply whose update (upload minus what it was sent) has an L2 "
                                      "norm above this, with the reason in metrics.jsonl (0 = no bound)", min=0.0)
    byzantine_fraction: float = _f(0.0, "share of the clients that send hostile uploads (a seeded, fixed set; at "
                                         "least one when > 0): a robustness experiment, 0 = none", min=0.0, max=1.0)
    byzantine_attack: str = _f("scale", "what a hostile client sends: scale (its update times byzantine_strength), "
                                        "sign-flip (the same reversed) or noise (Gaussian, byzantine_strength times "
                                        "its update's RMS)", choices=("scale", "sign-flip", "noise"))
    byzantine_strength: float = _f(10.0, "the hostile clients' factor (see byzantine_attack)", min=0.0)
    failure_rate: float = _f(0.0, "fault injection: chance that a sampled client crashes before it answers (seeded "
                                   "per round, attempt and client; from the DP secret under client-level DP); 0 = none",
                             min=0.0, max=1.0)
    straggler_rate: float = _f(0.0, "fault injection: chance that a sampled client answers only after "
                                     "round_timeout, so the round goes on without it (needs round_timeout > 0)",
                               min=0.0, max=1.0)
    round_timeout: float = _f(0.0, "seconds the server waits for a round's replies (Flower's timeout; 0 = an hour); "
                                    "a client that has not answered by then counts as failed", min=0.0)
    min_clients: int = _f(1, "a round aggregates when at least this many sampled clients answered (with an update "
                             "that passes the checks); fewer: the round is run again with a fresh sample, "
                             "round_retries times, then the run stops", min=1)
    round_retries: int = _f(2, "how many times a round with fewer than min_clients answers is run again (fresh "
                               "sample) before the run stops", min=0)
    ray_address: str = _f("", "engine = simulation: the Ray cluster to run the client workers on (\"auto\" or "
                              "HOST:PORT of its head, as `ray start --head` prints); \"\" = start Ray on this machine")
    client_cpus: float = _f(1.0, "CPU cores reserved per simulated client (Ray resources)", min=0.1)
    client_threads: int = _f(1, "torch threads in each client worker", min=1)
    client_eval: bool = _f(False, "also evaluate each round's model on every client's own shard")
    client_eval_clients: int = _f(100, "clients that evaluate on their own shard each round (client_eval, or a "
                                       "personalised strategy): a fixed seeded sample of this many, the same every "
                                       "round (0 = every client)", min=0)
    eval_every: int = _f(1, "evaluate the global adapter centrally every k rounds (round 0 and the last round always, "
                            "in full); 1 = every round", min=1)
    eval_examples: int = _f(256, "rounds between the first and the last: evaluate on a fixed seeded subset of this many "
                               "test examples (0 = the whole test set); round 0 and the last round use the whole one",
                            min=0)
    threads: int = _f(0, "torch threads of the server process, which runs the clients too with engine=inprocess (0 = all cores)", min=0)
    name: str = _f("default", "run name, used in the run folder's name")
    device: str = _f("auto", "where models, batches, optimizers and DP noise live: auto (the first CUDA GPU when there "
                             "is one, else the CPU), cpu, cuda or cuda:N; with engine = simulation the clients use a GPU "
                             "only with federation.client_gpus > 0", expect='"auto", "cpu", "cuda" or "cuda:N"')
    client_gpus: float = _f(0.0, "fraction of one GPU each simulated client worker reserves from Ray (0.25 = four "
                                 "workers per GPU; 0 = clients train on the CPU); needs a CUDA federation.device",
                            min=0.0)


@dataclass
class DataConfig:
    dataset: str = _f("rotten_tomatoes", "dataset name (see fedpeft.data.available_datasets), or the path of a local "
                                         ".csv, .tsv, .json/.jsonl or .parquet file or of a saved Hugging Face datasets folder")
    partition: str = _f("dirichlet", "how train rows are split over clients (natural: whole groups, by movie for "
                                     "rotten_tomatoes, by data.client_column for a dataset file)",
                        choices=("iid", "dirichlet", "natural"))
    alpha: float = _f(0.5, "Dirichlet concentration (smaller = more label skew)", min=1e-6)
    max_examples_per_client: int = _f(0, "cap on each client's rows (0 = no cap)", min=0)
    max_test_examples: int = _f(0, "evaluate on the first N test rows only (0 = all)", min=0)
    test_fraction: float = _f(0.1, "held-out global test split", min=0.01, max=0.5)
    text_column: str = _f("text", "dataset file: the column holding each example's text (classification, or causal-LM "
                                  "text when data.prompt_template is empty)")
    label_column: str = _f("label", "dataset file, classification: the label column (strings or integers; mapped to "
                                    "0..K-1 in sorted order, a datasets ClassLabel keeps its own order)")
    client_column: str = _f("", "dataset file: the column naming each row's natural client (user, author, ...) for "
                                "data.partition = natural (\"\" = none)")
    prompt_template: str = _f("", "dataset file, causal LM: the prompt before each response; \"alpaca\" (Stanford "
                                  "Alpaca's, from instruction/input columns) or a Python format string of columns, e.g. "
                                  "\"Q: {question}\\nA: \"; \"\" = learn data.text_column as plain text")
    response_column: str = _f("output", "dataset file, causal LM with data.prompt_template: the column appended after "
                                        "the prompt; the loss counts only its tokens")


@dataclass
class ModelConfig:
    name: str = _f("minilm", "base model (see `fedpeft.models.available_models`), or the path of a local Hugging Face "
                             "model folder")
    task: str = _f("auto", "classification or causal_lm; auto = the bundled model's, or inferred from a model "
                           "folder's config.json", choices=("auto", "classification", "causal_lm"))
    max_length: int = _f(48, "tokens per example after truncation", min=4, max=512)
    dropout: float = _f(0.1, "base-model dropout (0 turns it off)", min=0.0, max=0.9)
    pooling: str = _f("cls", "classification features: cls (BERT's pooler on the first token) or mean (masked mean of "
                             "the last hidden states, how sentence-transformers such as MiniLM are trained)",
                      choices=("cls", "mean"))
    dtype: str = _f("float32", "compute precision: float32, or bfloat16 (torch.autocast: matmuls in bfloat16; weights, "
                               "gradients, optimizer state and DP clipping stay float32)",
                    choices=("float32", "bfloat16"))


@dataclass
class PeftConfig:
    method: str = _f("lora", "adapter method", choices=("lora",))
    r: int = _f(8, "LoRA rank", min=1, max=1024)
    alpha: float = _f(16.0, "LoRA alpha; scaling = alpha / r (alpha / sqrt(r) with rslora)", min=0.0)
    target_modules: list = _f([], "module names that get adapters ([] = the model's default)")
    dropout: float = _f(0.0, "dropout on the LoRA input", min=0.0, max=0.9)
    rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")
    client_ranks: list = _f([], "per-client LoRA ranks, e.g. [4, 8, 16] ([] = every client uses r)")
    rank_assignment: str = _f("round_robin", "how client_ranks are given out", choices=("round_robin", "random"))
    modules_to_save: list = _f([], "modules trained in full and sent with the adapter, e.g. [\"classifier\"] "
                                   "([] = the model's task head: pooler.dense + classifier for MiniLM)")


@dataclass
class TrainConfig:
    local_steps: int = _f(10, "optimizer steps per client per round", min=1)
    batch_size: int = _f(16, "examples per local step", min=1)
    lr: float = _f(3e-3, "learning rate of the adapter and head", min=0.0)
    weight_decay: float = _f(0.0, "weight decay (decoupled for AdamW)", min=0.0)
    optimizer: str = _f("adamw", "local optimizer: adamw, or sgd (with train.momentum; often better under DP, where "
                                 "AdamW scales every noisy coordinate to a full step)", choices=("adamw", "sgd"))
    momentum: float = _f(0.0, "SGD momentum (train.optimizer = sgd)", min=0.0, max=0.999)
    eval_batch_size: int = _f(128, "examples per forward pass in evaluation", min=1)
    batch_sampling: str = _f("auto", "local batches: shuffle (epochs, fixed size), poisson (each example with rate "
                                     "batch_size / n), auto (poisson under dp.mode = sample, else shuffle)",
                             choices=("auto", "shuffle", "poisson"))


@dataclass
class DPConfig:
    mode: str = _f("none", "differential privacy: none, sample (DP-SGD on each client), client (central DP on the server)",
                   choices=("none", "sample", "client"))
    accountant: str = _f("auto", "privacy accountant: auto (pld for sample mode, rdp for client mode), pld, rdp or prv; "
                                 "sample mode needs pld (shard sizes are public: replace-one), client mode rdp",
                         choices=("auto", "rdp", "prv", "pld"))
    target_epsilon: float = _f(0.0, "epsilon to calibrate the noise for (0 = use noise_multiplier)", min=0.0)
    delta: float = _f(1e-5, "delta of the (epsilon, delta) guarantee; below 1 / records (sample) or 1 / clients (client)",
                      min=0.0, max=1.0)
    noise_multiplier: float = _f(1.0, "Gaussian noise std / clipping norm", min=0.0)
    max_grad_norm: float = _f(1.0, "clipping norm: of each example's gradient (sample), of each client's update (client; "
                                   "the starting norm with adaptive clipping)", min=0.0)
    clipping: str = _f("fixed", "client mode: fixed or adaptive clipping norm", choices=("fixed", "adaptive"))
    clip_on: str = _f("server", "client mode: clip updates on the server or on each client", choices=("server", "client"))
    target_clipped_quantile: float = _f(0.5, "adaptive clipping: the quantile of update norms the norm tracks (fraction left unclipped)", min=0.0, max=1.0)
    clip_norm_lr: float = _f(0.2, "adaptive clipping: learning rate of the clipping norm", min=0.0)
    clipped_count_stddev: float = _f(0.0, "adaptive clipping: noise on the clipped count (0 = clients per round / 20)",
                                     min=0.0)
    secret_file: str = _f("", "file holding a secret that makes DP noise, Poisson batches and client sampling repeatable "
                              "(epsilon then holds only while it stays secret); \"\" = the OS CSPRNG, never stored")


@dataclass
class AuditConfig:
    """``[audit]``: what ``fedpeft audit`` plays, a curious server rebuilding one client's data from its payload.

    Besides these keys the table holds one sub-table per attack that takes
    parameters (``[audit.dlg]``, ``audit.lora-span = {tol = 0.01}``); they
    are collected in ``params`` and checked against the attack when the audit
    builds it (:func:`fedpeft.audit.attacks.build_attacks`), since the attack
    registry sits above the config.
    """

    attacks: list = _f(["label-recovery", "linear-inversion", "lora-span"],
                       "attacks to run: registered names (`fedpeft attacks`) or 'package.module:ClassName' for your own",
                       expect="a non-empty list of attack names")
    victims: int = _f(20, "victims in the main experiment and the positive control (bootstrap intervals over them; 20 or more)",
                      min=1, expect="an integer >= 1")
    batch_size: int = _f(1, "examples each victim holds and trains on per step (its whole local data)", min=1,
                         expect="an integer >= 1")
    round: int = _f(1, "1 = a fresh round (LoRA B = 0); k > 1 = the global state after k - 1 rounds (B != 0), approximated by "
                       "(k - 1) * train.local_steps steps on public rows", min=1, expect="an integer >= 1")
    local_steps: int = _f(1, "the victim's local steps (1 = it uploads its single-step gradient)", min=1,
                          expect="an integer >= 1")
    optimizer: str = _f("sgd", "the victim's optimiser when local_steps > 1", choices=("sgd", "adamw"))
    victim_texts: str = _f("", "file of victims' sentences, one per line (optionally \"<label><TAB><text>\"); \"\" = the unseen "
                               "test split", expect="a path to a text file")
    max_victim_tokens: int = _f(0, "only victim sentences of at most this many tokens, specials included (0 = any)", min=0,
                                expect="an integer >= 0")
    studies: bool = _f(True, "also the positive control and the studies that vary it (batch, length, dropout, steps)",
                       expect="true or false")
    study_victims: int = _f(8, "victims per study experiment", min=1, expect="an integer >= 1")
    prior_examples: int = _f(2000, "public training rows forming the server's prior (token and label frequencies, mean "
                                   "features)", min=10, expect="an integer >= 10")
    empirical: bool = _f(True, "also the canary audit: an empirical epsilon lower bound beside the accountant's",
                         expect="true or false")
    canary_trials: int = _f(1000, "canary audit trials with the canary, and as many without", min=10,
                            expect="an integer >= 10")
    confidence: float = _f(0.95, "confidence of the empirical lower bound (Clopper-Pearson)", min=0.5,
                           expect="a number in [0.5, 1), e.g. 0.95")
    params: dict = _f({}, "per-attack parameters by attack: the [audit.<attack>] sub-tables, e.g. [audit.dlg] iterations = 50")

    def __post_init__(self) -> None:
        # What one field's type and limits cannot say.
        if not self.attacks or not all(isinstance(a, str) and a for a in self.attacks):
            raise ConfigError(f"audit.attacks must be a non-empty list of attack names, got {self.attacks!r}")
        if self.confidence >= 1.0:
            raise ConfigError(f"audit.confidence must be a number in [0.5, 1), e.g. 0.95, got {self.confidence!r}")
        if self.victim_texts and not Path(self.victim_texts).is_file():
            raise ConfigError(f"audit.victim_texts = {self.victim_texts!r}: no such file")
        for name, table in self.params.items():
            if not isinstance(table, dict):
                raise ConfigError(f"audit.{name} must be a table of that attack's parameters, got {table!r}")

    @classmethod
    def normalise_table(cls, table: dict[str, Any]) -> dict[str, Any]:
        """The ``[audit]`` table with its attack sub-tables gathered into ``params``.

        Any key that is not a field and holds a table is an attack's
        parameters; any other such key is a typo. A single attack name may be
        given as a string (``--set audit.attacks=lora-span``).
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        params = dict(table.get("params", {})) if isinstance(table.get("params"), dict) else {}
        for key, value in table.items():
            if key in fields:
                out[key] = value
            elif isinstance(value, dict):
                params[key] = value
            else:
                raise ConfigError(
                    f"unknown key audit.{key}; valid keys: {', '.join(sorted(fields))}; or, if {key!r} is an attack, "
                    f"audit.{key} must be a table of its parameters ([audit.{key}])"
                )
        if isinstance(out.get("attacks"), str):
            out["attacks"] = [out["attacks"]]
        if params or "params" in out:
            out["params"] = params
        return out


@dataclass
class Config:
    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The strategy's own parameters are not known until its class is: they are
    # kept as a plain table and checked against the class in ``validate``.
    strategy: dict = field(default_factory=lambda: {"name": "fedit"})
    dp: DPConfig = field(default_factory=DPConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def clients_per_round(self) -> int:
        """Clients sampled each round, with 0 resolved to all of them."""
        n = self.federation.clients_per_round
        return self.federation.num_clients if n == 0 else n

    @property
    def num_nodes(self) -> int:
        """Flower nodes that run the clients, with 0 resolved to one per client of a round."""
        n = self.federation.num_nodes
        return min(self.federation.num_clients, self.clients_per_round) if n == 0 else n

    @property
    def strategy_name(self) -> str:
        return str(self.strategy.get("name", "fedit"))

    @property
    def strategy_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.strategy.items() if k != "name"}


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the field type; ints are accepted for floats."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is list and isinstance(value, tuple):
        return list(value)
    if not isinstance(value, tp):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):  # nan slips past every min/max check
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def _check_limits(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} = {value!r} is not valid; choose one of: {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key} = {value!r} is out of range; it must be >= {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} = {value!r} is out of range; it must be <= {hi}")


def _build_section(name: str, table: Any) -> Any:
    section_field = SECTIONS[name]
    cls = section_field.default_factory  # type: ignore[misc]
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table of keys, got {table!r}")
    if not dataclasses.is_dataclass(cls):
        base = cls()
        base.update(table)
        return base
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    if hasattr(cls, "normalise_table"):  # a section with sub-tables of its own ([audit.<attack>])
        table = cls.normalise_table(table)
    values = {}
    for key, value in table.items():
        full = f"{name}.{key}"
        if key not in known:
            raise ConfigError(f"unknown key {full}; valid keys in [{name}]: {', '.join(known)}")
        values[key] = _field_value(full, value, hints[key], known[key].metadata)
    return cls(**values)


def _field_value(key: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    """``value`` coerced to the field's type and checked against its limits.

    A field whose metadata says what it expects in words (``expect``) gets
    that one message for a wrong type and an out-of-range value alike.
    """
    try:
        coerced = _coerce(key, value, tp)
        _check_limits(key, coerced, meta)
    except ConfigError:
        if "expect" in meta:
            raise ConfigError(f"{key} must be {meta['expect']}, got {value!r}") from None
        raise
    return coerced


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value``; the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be section.key, e.g. train.lr=0.001")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts[0], parts[1], value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a folder, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid TOML ({exc})") from None


def parse_config(tables: dict[str, Any]) -> Config:
    """A :class:`Config` from nested tables, every field type- and limit-checked.

    Checks that need a registry (the dataset, model, rule or DP settings it
    names) are :func:`fedpeft.validation.validate`'s; use
    :func:`fedpeft.validation.config_from_dict` for both.
    """
    sections = {}
    for name, table in tables.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}]; valid sections: {', '.join(SECTIONS)}")
        sections[name] = _build_section(name, table)
    return Config(**sections)


def config_tables(path: str | Path | Config | None = None, overrides: typing.Sequence[str] = ()) -> dict[str, Any]:
    """The tables of ``path`` (default: the embedded default) with ``--set`` overrides applied.

    ``path`` may also be a :class:`Config`: the overrides then apply to a copy of it.
    """
    if isinstance(path, Config):
        tables = copy.deepcopy(path.to_dict())
    else:
        tables = _read_toml(Path(path) if path else DEFAULT_CONFIG)
    for text in overrides:
        section, key, value = parse_override(text)
        tables.setdefault(section, {})
        if not isinstance(tables[section], dict):
            raise ConfigError(f"--set {text!r}: [{section}] is not a table")
        tables[section][key] = value
    return tables


CONFIG_JSON = "config-json"
"""Run-config key holding a whole config as JSON: Flower's run config holds scalars only, and a deployment
passes every key (``peft.target_modules`` and the other lists too)."""


def run_config_tables(run_config: typing.Mapping[str, Any]) -> dict[str, Any]:
    """The config tables of a ``flwr run .`` launch.

    Flower's run config (pyproject's ``[tool.flwr.app.config]`` plus
    ``--run-config`` overrides) holds the scalar keys as ``section.key``; they
    override the embedded default, whose lists (``peft.target_modules``) stay.
    ``out`` names the run folder; ``config-json``, when set, is the whole
    config and every other key is ignored.
    """
    if run_config.get(CONFIG_JSON):  # the whole config, lists included (fedpeft deploy)
        try:
            return json.loads(str(run_config[CONFIG_JSON]))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"run config key {CONFIG_JSON!r} is not a JSON config ({exc})") from None
    tables = _read_toml(DEFAULT_CONFIG)
    for key, value in run_config.items():
        if key in ("out", CONFIG_JSON):
            continue
        section, _, name = str(key).partition(".")
        if not name:
            raise ConfigError(f"run config key {key!r} must look like section.key")
        tables.setdefault(section, {})[name] = value
    return tables


def batch_sampling(cfg: Config) -> str:
    """``train.batch_sampling`` with ``auto`` resolved."""
    if cfg.train.batch_sampling == "auto":
        return "poisson" if cfg.dp.mode == "sample" else "shuffle"
    return cfg.train.batch_sampling


def client_ranks(cfg: Config) -> dict[int, int]:
    """Each client's LoRA rank: ``peft.client_ranks`` dealt round-robin or by a
    seeded draw; ``peft.r`` for everyone when the list is empty."""
    ranks = cfg.peft.client_ranks or [cfg.peft.r]
    n = cfg.federation.num_clients
    if cfg.peft.rank_assignment == "random":
        import numpy as np

        drawn = np.random.default_rng([cfg.federation.seed, 7919]).choice(ranks, size=n)
        return {c: int(r) for c, r in enumerate(drawn)}
    return {c: int(ranks[c % len(ranks)]) for c in range(n)}


def max_rank(cfg: Config) -> int:
    """The LoRA rank of the resident model: large enough for every client."""
    return max(cfg.peft.client_ranks or [cfg.peft.r])


def field_help() -> dict[str, str]:
    """``section.key`` -> help text, for the CLI and the docs."""
    out = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                out[f"{section.name}.{f.name}"] = f.metadata.get("help", "")
    return out
