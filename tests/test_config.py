"""fedpeft.config: the default, --set overrides and one clear error per mistake.

Uses the real registries (datasets, models, strategies); nothing here loads a
model or data, so the whole file runs in about a second.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedpeft.config import DEFAULT_CONFIG, Config, field_help, parse_override
from fedpeft.validation import build_strategy, config_from_dict, config_from_run_config, load_config
from fedpeft.errors import ConfigError, FedPeftError

ROOT = Path(__file__).resolve().parents[1]


def error(*overrides: str, path=None) -> str:
    """The ConfigError message for loading the default with ``overrides``."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


# --- the default ------------------------------------------------------------


def test_default_loads_and_matches_experiments_default():
    cfg = load_config()
    assert isinstance(cfg, Config)
    # One default file: experiments/default.toml is a link to the packaged one, not a copy that can drift.
    assert (ROOT / "experiments" / "default.toml").resolve() == DEFAULT_CONFIG.resolve()
    assert cfg == load_config(ROOT / "experiments" / "default.toml")
    assert cfg == load_config(DEFAULT_CONFIG)
    assert cfg.federation.num_clients == 10
    assert cfg.data.dataset == "rotten_tomatoes"
    assert cfg.data.partition == "dirichlet"
    assert cfg.model.name == "minilm"
    assert cfg.peft.target_modules == ["query", "value"]
    assert cfg.strategy_name == "fedit"
    assert cfg.dp.mode == "none"
    # alpha = 16 in the TOML is an int; the float field stores a float.
    assert cfg.peft.alpha == 16.0 and isinstance(cfg.peft.alpha, float)
    assert cfg.clients_per_round == cfg.federation.num_clients  # 0 = all


def test_default_round_trips_through_to_dict():
    cfg = load_config()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_build_strategy_of_default():
    s = build_strategy(load_config())
    assert s.name == "fedit"


def test_field_help_covers_documented_keys():
    help_ = field_help()
    for key in [
        "federation.num_clients", "federation.clients_per_round", "federation.num_rounds",
        "federation.seed", "federation.engine", "data.dataset", "data.partition", "data.alpha",
        "data.max_examples_per_client", "model.name", "model.max_length", "model.dropout",
        "peft.method", "peft.r", "peft.alpha", "peft.target_modules", "train.local_steps",
        "train.batch_size", "train.lr", "dp.mode", "dp.target_epsilon", "dp.delta",
        "dp.noise_multiplier", "dp.max_grad_norm",
    ]:
        assert help_.get(key), key


# --- --set overrides ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, section, key, value",
    [
        ("train.lr=0.01", "train", "lr", 0.01),
        ("train.local_steps=3", "train", "local_steps", 3),
        ("data.partition=iid", "data", "partition", "iid"),
        ('data.partition="iid"', "data", "partition", "iid"),
        ("peft.rslora=true", "peft", "rslora", True),
        ('peft.target_modules=["query","key"]', "peft", "target_modules", ["query", "key"]),
        (" train.lr = 1e-4 ", "train", "lr", 1e-4),
        ("federation.name=my run", "federation", "name", "my run"),
        ("strategy.name=fedit", "strategy", "name", "fedit"),
    ],
)
def test_parse_override(text, section, key, value):
    assert parse_override(text) == (section, key, value)


def test_overrides_apply_with_toml_values():
    cfg = load_config(
        None,
        [
            "train.lr=0.01",
            "train.local_steps=3",
            "federation.num_clients=4",
            "federation.clients_per_round=2",
            "data.partition=iid",
            'model.name="smollm2"',
            'peft.target_modules=["query","key"]',
            "peft.rslora=true",
            "federation.name=quick",
        ],
    )
    assert cfg.train.lr == 0.01
    assert cfg.train.local_steps == 3 and isinstance(cfg.train.local_steps, int)
    assert cfg.federation.num_clients == 4
    assert cfg.clients_per_round == 2
    assert cfg.data.partition == "iid"
    assert cfg.model.name == "smollm2"
    assert cfg.peft.target_modules == ["query", "key"]
    assert cfg.peft.rslora is True
    assert cfg.federation.name == "quick"
    # Untouched keys keep the default.
    assert cfg.peft.r == 8 and cfg.data.alpha == 0.5


def test_later_override_wins():
    assert load_config(None, ["train.lr=0.1", "train.lr=0.2"]).train.lr == 0.2


def test_int_accepted_for_float_field():
    cfg = load_config(None, ["train.lr=1", "data.alpha=2"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.alpha == 2.0 and isinstance(cfg.data.alpha, float)


def test_strategy_params_pass_through():
    cfg = load_config(None, ["strategy.seed=3"])
    assert cfg.strategy_params == {"seed": 3}
    assert build_strategy(cfg).seed == 3


def test_overrides_on_a_user_file(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text('[federation]\nnum_clients = 3\n\n[train]\nlr = 0.5\n')
    cfg = load_config(f, ["train.lr=0.25"])
    assert cfg.federation.num_clients == 3
    assert cfg.train.lr == 0.25
    # Sections absent from the file take the dataclass defaults, with the
    # model's default LoRA targets and head resolved.
    assert cfg.peft == type(cfg.peft)(target_modules=["query", "value"], modules_to_save=["pooler.dense", "classifier"])


def test_config_from_run_config():
    cfg = config_from_run_config({"train.lr": 0.01})
    assert cfg.train.lr == 0.01
    assert dataclasses.replace(cfg, train=load_config().train) == load_config()


def test_config_from_run_config_ignores_out_and_checks_keys():
    assert config_from_run_config({"out": "somewhere"}) == load_config()
    with pytest.raises(ConfigError, match="train.nope"):
        config_from_run_config({"train.nope": 1})
    with pytest.raises(ConfigError, match="section.key"):
        config_from_run_config({"lr": 1})


# --- errors: each names the key and what is valid ----------------------------


def test_config_error_is_a_fedpeft_error():
    assert issubclass(ConfigError, FedPeftError)


def test_unknown_section():
    msg = error("nosuch.key=1")
    assert "nosuch" in msg
    for section in ("federation", "data", "model", "peft", "train", "strategy", "dp"):
        assert section in msg


def test_unknown_key_lists_valid_keys_of_its_section():
    msg = error("train.lrr=0.1")
    assert "train.lrr" in msg
    for key in ("local_steps", "batch_size", "lr"):
        assert key in msg
    assert "num_clients" not in msg  # only that section's keys


def test_unknown_key_in_a_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model]\nnmae = 'minilm'\n")
    msg = error(path=f)
    assert "model.nmae" in msg and "max_length" in msg


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ('train.local_steps="ten"', "train.local_steps", "int"),
        ("train.local_steps=ten", "train.local_steps", "int"),
        ("train.local_steps=true", "train.local_steps", "int"),
        ("federation.num_clients=2.5", "federation.num_clients", "int"),
        ("train.lr=fast", "train.lr", "float"),
        ("peft.rslora=1", "peft.rslora", "bool"),
        ('peft.target_modules="query"', "peft.target_modules", "list"),
    ],
)
def test_wrong_type(override, key, expected):
    msg = error(override)
    assert key in msg and expected in msg


def test_target_modules_must_be_names():
    msg = error("peft.target_modules=[1, 2]")
    assert "peft.target_modules" in msg


@pytest.mark.parametrize(
    "override, key, bound",
    [
        ("train.lr=-0.1", "train.lr", ">= 0"),
        ("peft.r=0", "peft.r", ">= 1"),
        ("model.dropout=1.5", "model.dropout", "<= 0.9"),
        ("federation.num_clients=0", "federation.num_clients", ">= 1"),
        ("dp.delta=2", "dp.delta", "<= 1"),
    ],
)
def test_out_of_range(override, key, bound):
    msg = error(override)
    assert key in msg and bound in msg


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_rejected(value):
    msg = error(f"train.lr={value}")
    assert "train.lr" in msg and "finite" in msg


@pytest.mark.parametrize(
    "override, key, choices",
    [
        ("data.partition=foo", "data.partition", ["iid", "dirichlet", "natural"]),
        ("model.name=foo", "model.name", ["minilm", "smollm2"]),
        ("data.dataset=foo", "data.dataset", ["rotten_tomatoes"]),
        ("dp.mode=foo", "dp.mode", ["none"]),
        ("federation.engine=foo", "federation.engine", ["simulation"]),
    ],
)
def test_bad_choice_lists_valid_ones(override, key, choices):
    msg = error(override)
    assert key in msg and "'foo'" in msg
    for choice in choices:
        assert choice in msg


def test_unknown_strategy_lists_registered_ones():
    msg = error("strategy.name=nope")
    assert "strategy.name" in msg and "nope" in msg and "fedit" in msg


def test_unknown_strategy_module_path():
    msg = error('strategy.name="no_such_module_xyz:Rule"')
    assert "strategy.name" in msg and "no_such_module_xyz" in msg


def test_unknown_strategy_parameter():
    msg = error("strategy.foo=1")
    assert "strategy.foo" in msg and "fedit" in msg and "seed" in msg


def test_strategy_name_must_be_a_string():
    assert "strategy.name" in error("strategy.name=3")


def test_clients_per_round_above_num_clients():
    msg = error("federation.num_clients=4", "federation.clients_per_round=5")
    assert "federation.clients_per_round" in msg and "federation.num_clients" in msg
    assert "0..4" in msg
    # Equal is fine.
    assert load_config(None, ["federation.num_clients=4", "federation.clients_per_round=4"]).clients_per_round == 4


@pytest.mark.parametrize("text", ["trainlr=1", "a.b.c=1", "train.lr", ".lr=1", "train.=1"])
def test_malformed_set(text):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    msg = str(info.value)
    assert text in msg and "section.key" in msg
    assert "\n" not in msg
    # load_config reports the same error.
    error(text)


def test_override_on_a_non_table(tmp_path):
    f = tmp_path / "odd.toml"
    f.write_text("train = 3\n")
    assert "train" in error("train.lr=1", path=f)


def test_section_that_is_not_a_table(tmp_path):
    f = tmp_path / "odd.toml"
    f.write_text("train = 3\n")
    assert "[train]" in error(path=f)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    msg = error(path=missing)
    assert "--config" in msg and str(missing) in msg and "no such file" in msg


def test_config_path_is_a_folder(tmp_path):
    msg = error(path=tmp_path)
    assert "--config" in msg and str(tmp_path) in msg


@pytest.mark.parametrize("text", ["[train\nlr = 1\n", "[train]\nlr = \n", "[train]\nlr = 1\nlr = 2\n"])
def test_invalid_toml_file(tmp_path, text):
    f = tmp_path / "broken.toml"
    f.write_text(text)
    msg = error(path=f)
    assert "--config" in msg and str(f) in msg and "TOML" in msg


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin1.toml"
    f.write_bytes(b"[federation]\nname = '\xe9t\xe9'\n")
    assert "TOML" in error(path=f)


def test_client_ranks_round_robin_and_seeded_draw():
    from fedpeft.config import client_ranks, max_rank

    cfg = load_config(None, ["peft.client_ranks=[4, 8, 16]", "strategy.name=flora", "federation.num_clients=5"])
    assert client_ranks(cfg) == {0: 4, 1: 8, 2: 16, 3: 4, 4: 8}
    assert max_rank(cfg) == 16
    drawn = ["peft.client_ranks=[4, 8, 16]", "strategy.name=flora", "peft.rank_assignment=random"]
    # Pinned: the draw of seed 0 fixes every published heterogeneous-rank result.
    pinned = {0: 8, 1: 16, 2: 16, 3: 16, 4: 4, 5: 4, 6: 16, 7: 8, 8: 16, 9: 4}
    assert client_ranks(load_config(None, drawn)) == pinned
    assert client_ranks(load_config(None, drawn + ["federation.seed=1"])) != pinned, "the seed must move the draw"
    # Uniform over the list: each rank goes to about a third of many clients.
    shares = np.bincount(list(client_ranks(load_config(None, drawn + ["federation.num_clients=3000"])).values()))
    assert shares[[4, 8, 16]].sum() == 3000
    np.testing.assert_allclose(shares[[4, 8, 16]] / 3000, 1 / 3, atol=0.03)
    assert client_ranks(load_config()) == {c: 8 for c in range(10)}


@pytest.mark.parametrize("ranks, needle", [("[4, 0]", "positive integers"), ('["a"]', "positive integers"),
                                           ("[4, 8]", "cannot aggregate")])
def test_bad_client_ranks_are_config_errors(ranks, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        load_config(None, [f"peft.client_ranks={ranks}"])
    assert "peft.client_ranks" in str(err.value)
