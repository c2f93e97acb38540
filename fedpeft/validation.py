"""Checks across config sections that need the registries, and the loaders that run them.

:mod:`fedpeft.config` parses and type-checks each field; what a single field
cannot say (that the dataset, model and rule it names exist and fit
together, that a DP claim can be honoured) is checked here, where data,
models, strategies and privacy are all below. Defaults that depend on the
named model (LoRA target modules, the head) and the accountant are filled in
here, so ``summary.json`` names what was used.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from fedpeft.config import Config, config_tables, parse_config, run_config_tables
from fedpeft.errors import ConfigError
from fedpeft.privacy.validation import validate_dp


def config_from_dict(tables: dict[str, Any], *, role: str = "server") -> Config:
    """Build and validate a :class:`Config` from nested tables (``role``: see :func:`validate_device`)."""
    cfg = parse_config(tables)
    validate(cfg, role=role)
    return cfg


def load_config(path: str | Path | Config | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read ``path`` (default: the embedded default), apply ``--set`` overrides, validate.

    ``path`` may also be a :class:`Config`: the overrides then apply to a copy of it.
    """
    return config_from_dict(config_tables(path, overrides))


def config_from_run_config(run_config: typing.Mapping[str, Any], *, role: str = "server") -> Config:
    """The validated config of a ``flwr run .`` launch (see :func:`fedpeft.config.run_config_tables`).

    ``role = "client"`` in a ClientApp: see :func:`validate_device`.
    """
    return config_from_dict(run_config_tables(run_config), role=role)


def validate(cfg: Config, *, role: str = "server") -> None:
    """Cross-field checks and registry look-ups that a single field cannot do (``role``: see :func:`validate_device`)."""
    fed = cfg.federation
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError(
            f"federation.clients_per_round = {fed.clients_per_round} exceeds "
            f"federation.num_clients = {fed.num_clients}; use a value in 0..{fed.num_clients} (0 = all)"
        )
    if fed.batch_clients and fed.engine != "batched":
        raise ConfigError(
            f"federation.batch_clients = {fed.batch_clients} sizes the batched engine's passes; set "
            f"federation.engine = 'batched' (now {fed.engine!r}) or federation.batch_clients = 0"
        )
    if fed.ray_address and fed.engine != "simulation":
        raise ConfigError(f"federation.ray_address = {fed.ray_address!r} names a Ray cluster for engine = 'simulation'; "
                          f"engine = {fed.engine!r} runs in this process: set one or clear the other")
    if fed.num_nodes > fed.num_clients:
        raise ConfigError(
            f"federation.num_nodes = {fed.num_nodes} exceeds federation.num_clients = {fed.num_clients}; "
            f"use a value in 0..{fed.num_clients} (0 = min(num_clients, clients per round))"
        )
    validate_faults(cfg)
    validate_device(cfg, role=role)
    spec = validate_model(cfg)
    validate_data(cfg, spec.task)
    strategy = build_strategy(cfg)
    ranks = cfg.peft.client_ranks
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ConfigError(f"peft.client_ranks must be a list of positive integers, got {ranks!r}")
    if len(set(ranks)) > 1 and not strategy.heterogeneous_ranks:
        import strategies

        able = [n for n in strategies.available() if strategies.get(n).heterogeneous_ranks]
        raise ConfigError(
            f"peft.client_ranks = {ranks} mixes ranks, which strategy {cfg.strategy_name!r} cannot aggregate; "
            f"use one of: {', '.join(able)}"
        )
    validate_dp(cfg, strategy)


def validate_faults(cfg: Config) -> None:
    """Fault injection and the round quorum fit together and can be met."""
    fed = cfg.federation
    if fed.failure_rate + fed.straggler_rate >= 1:
        raise ConfigError(f"federation.failure_rate + federation.straggler_rate = "
                          f"{fed.failure_rate + fed.straggler_rate:g} loses every client of every round; keep the sum "
                          "below 1")
    if fed.straggler_rate > 0 and fed.round_timeout <= 0:
        raise ConfigError(f"federation.straggler_rate = {fed.straggler_rate:g} simulates clients that answer after "
                          "federation.round_timeout, which is 0 (the server waits up to an hour and gets every reply); "
                          "set federation.round_timeout to the seconds the server waits, e.g. 600")
    if fed.min_clients > cfg.clients_per_round:
        raise ConfigError(f"federation.min_clients = {fed.min_clients} exceeds the {cfg.clients_per_round} clients "
                          f"sampled each round; use a value in 1..{cfg.clients_per_round}")


def validate_device(cfg: Config, role: str = "server") -> None:
    """``federation.device`` names a device this machine has; ``federation.client_gpus`` fits it and the engine.

    ``role = "client"`` (a ClientApp reading the run config of ``flwr run .``)
    checks only that the name is valid: a Ray client worker sees just the GPU
    share Ray gave it, so the server's ``cuda:N`` may not exist there, and
    :func:`fedpeft.devices.client_device` picks the worker's device anyway.
    """
    from fedpeft.devices import check_name, resolve

    fed = cfg.federation
    if role == "client":
        check_name(fed.device)
        return
    if role != "server":
        raise ValueError(f"role = {role!r}; choose 'server' or 'client'")
    device = resolve(fed.device)
    if fed.client_gpus > 0 and device.type != "cuda":
        raise ConfigError(f"federation.client_gpus = {fed.client_gpus} reserves GPUs for the client workers, but "
                          f"federation.device = {fed.device!r} is the CPU here; set federation.client_gpus = 0, or "
                          "federation.device to \"cuda\" on a machine with CUDA")
    if fed.client_gpus > 0 and fed.engine != "simulation":
        raise ConfigError(f"federation.client_gpus = {fed.client_gpus} applies to engine = 'simulation' (Ray workers); "
                          f"with engine = {fed.engine!r} the clients share the server's federation.device: set it to 0")
    if fed.device.strip().lower() != "auto" and device.type == "cuda" and fed.engine == "simulation" and fed.client_gpus == 0:
        raise ConfigError(f"federation.device = {fed.device!r} with engine = 'simulation' needs federation.client_gpus "
                          "> 0, the fraction of a GPU each client worker reserves from Ray (e.g. 0.25), or the "
                          "clients would train on the CPU")


def validate_model(cfg: Config):
    """``[model]`` against the model it names; fills in the default target and head modules. Returns its spec."""
    from fedpeft.models import available_models, get_model_spec
    from fedpeft.models.folder import is_model_folder

    if not all(isinstance(m, str) and m for m in cfg.peft.target_modules):
        raise ConfigError(f"peft.target_modules must be a list of module names, got {cfg.peft.target_modules!r}")
    if not all(isinstance(m, str) and m for m in cfg.peft.modules_to_save):
        raise ConfigError(f"peft.modules_to_save must be a list of module names, got {cfg.peft.modules_to_save!r}")
    if cfg.model.name not in available_models() and is_model_folder(cfg.model.name):
        # Absolute, so worker processes (whatever their working folder) and a
        # later --resume find the same folder; summary.json records it.
        cfg.model.name = str(Path(cfg.model.name).expanduser().resolve())
    spec = get_model_spec(cfg.model.name, cfg.model.task)
    if not cfg.peft.target_modules:  # resolved here so summary.json names the real modules
        if not spec.default_targets:
            raise ConfigError(
                f"peft.target_modules: peft has no default LoRA target modules for architecture {spec.architecture!r} "
                f"({cfg.model.name}); set peft.target_modules to the names of its attention Linear layers, "
                "e.g. [\"q_proj\", \"v_proj\"]"
            )
        cfg.peft.target_modules = list(spec.default_targets)
    if cfg.model.pooling != "cls" and cfg.model.pooling not in spec.poolings:
        raise ConfigError(f"model.pooling = {cfg.model.pooling!r} is not available for model {cfg.model.name!r}; "
                          f"choose one of: {', '.join(('cls',) + tuple(spec.poolings))}")
    if not cfg.peft.modules_to_save:
        # Mean pooling has no pooler weights: the head is the classifier alone.
        head = spec.head_modules if cfg.model.pooling == "cls" else tuple(m for m in spec.head_modules if "pooler" not in m)
        cfg.peft.modules_to_save = list(head)
    return spec


def data_columns(cfg: Config):
    """The ``[data]`` keys that say how to read a dataset file, as :class:`fedpeft.data.DataColumns`."""
    from fedpeft.data import DataColumns

    d = cfg.data
    return DataColumns(text=d.text_column, label=d.label_column, client=d.client_column,
                       prompt_template=d.prompt_template, response=d.response_column)


def validate_data(cfg: Config, task: str) -> None:
    """``[data]`` against the dataset it names; a dataset file is read here, so a wrong column stops the run."""
    from fedpeft.data import available_datasets, is_dataset_file, load_dataset
    from fedpeft.data.local import looks_like_path

    name = cfg.data.dataset
    if name in available_datasets():
        if cfg.data.client_column:
            raise ConfigError(f"data.client_column = {cfg.data.client_column!r} applies to dataset files only; "
                              f"{name!r} has its own natural groups (data.partition = 'natural'); set it to \"\"")
        return
    if not is_dataset_file(name) and looks_like_path(name):
        raise ConfigError(f"data.dataset = {name!r}: no such file or folder")
    if not is_dataset_file(name):
        raise ConfigError(
            f"data.dataset = {name!r} is not valid; choose one of: {', '.join(available_datasets())}, or the path "
            "of a .csv, .tsv, .json, .jsonl or .parquet file or a saved Hugging Face datasets folder"
        )
    # Absolute for the same reasons as a model folder's path.
    name = cfg.data.dataset = str(Path(name).expanduser().resolve())
    if cfg.data.partition == "natural" and not cfg.data.client_column:
        raise ConfigError("data.partition = 'natural' on a dataset file needs data.client_column, the column naming "
                          "each row's client (user, author, ...)")
    if cfg.data.client_column and cfg.data.partition != "natural":
        raise ConfigError(f"data.client_column = {cfg.data.client_column!r} partitions by that column; set "
                          "data.partition = 'natural' (or data.client_column = \"\" for iid or dirichlet)")
    load_dataset(name, test_fraction=cfg.data.test_fraction, columns=data_columns(cfg), task=task)


def build_strategy(cfg: Config):
    """The configured strategy instance; unknown names and parameters are config errors."""
    import strategies

    name = cfg.strategy.get("name", "fedit")
    if not isinstance(name, str):
        raise ConfigError(f"strategy.name must be a string, got {name!r}")
    try:
        cls = strategies.get(name)
        params = dict(cfg.strategy_params)
        params.setdefault("seed", cfg.federation.seed)
        return cls.from_params(params)
    except strategies.UnknownStrategyError as exc:
        raise ConfigError(exc.args[0] if exc.args else str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from None
