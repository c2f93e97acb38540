"""The real `fedpeft` console script on user mistakes: exit code 2, one line on
stderr naming the key, no traceback, nothing written.

Config errors fail before any model, data or Ray is touched (the CLI checks
the config and --out before loading anything); settings that need the data
fail after it loads and before the run folder exists. Most checks call the
CLI's entry point in the test process (``fedpeft_cli_in_process``: the same
exit code and output, without an interpreter start-up per case); the console
script itself runs in a subprocess for a config error and the busy folder.
"""

from __future__ import annotations

import pytest

# If a regression let a "failing" run through, keep it tiny rather than a
# default federation (the subprocess timeout is the last line of defence).
TINY = [
    "--set", "federation.num_clients=1",
    "--set", "federation.num_rounds=1",
    "--set", "data.max_examples_per_client=4",
    "--set", "data.max_test_examples=4",
    "--set", "train.local_steps=1",
]


@pytest.mark.parametrize(
    "args, named",
    [
        pytest.param(["--set", "train.foo=1"], ["train.foo", "[train]", "lr", "local_steps"], id="unknown-key"),
        pytest.param(["--set", "peft.r=0"], ["peft.r", ">= 1"], id="out-of-range"),
        pytest.param(["--set", "data.partition=foo"], ["data.partition", "iid", "dirichlet", "natural"], id="bad-choice"),
        pytest.param(["--set", "strategy.name=nope"], ["strategy.name", "nope", "fedit"], id="unknown-strategy"),
        pytest.param(["--config", "missing.toml"], ["--config", "missing.toml", "no such file"], id="missing-config"),
        # Settings a DP claim cannot honour (config-level: caught before any model loads).
        pytest.param(["--set", "dp.mode=sample", "--set", "dp.delta=0"], ["dp.delta", "(0, 1 / records)"],
                     id="dp-missing-delta"),
        pytest.param(["--set", "dp.mode=sample", "--set", "train.batch_sampling=shuffle"],
                     ["train.batch_sampling", "Poisson", "'poisson' or 'auto'"], id="dp-non-poisson-batches"),
        pytest.param(["--set", "dp.mode=sample", "--set", "dp.noise_multiplier=0"], ["dp.noise_multiplier", "target_epsilon"],
                     id="dp-no-noise"),
        pytest.param(["--set", "dp.mode=client", "--set", "strategy.name=fedex-lora"],
                     ["dp.mode = 'client'", "fedex-lora", "residual", "fedit, ffa-lora"], id="dp-client-unsafe-rule"),
        pytest.param(["--set", "dp.mode=client", "--set", "dp.accountant=prv"], ["dp.accountant", "'rdp'"],
                     id="dp-client-accountant"),
        pytest.param(["--set", "dp.mode=nope"], ["dp.mode", "sample", "client"], id="dp-bad-mode"),
        pytest.param(["--set", "dp.mode=sample", "--set", "federation.client_eval=true"],
                     ["federation.client_eval", "without noise"], id="dp-client-eval"),
    ],
)
def test_run_rejects_bad_config(tmp_path, args, named, fedpeft_cli_in_process, assert_user_error):
    out = tmp_path / "out"
    proc = fedpeft_cli_in_process("run", *args, "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, *named)
    assert not out.exists(), "the run folder was created before failing"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        # Needs the shard sizes: caught after the data loads, before the run folder exists.
        pytest.param(["--set", "dp.mode=sample", "--set", "dp.delta=0.5"], ["dp.delta", "too large for 4 records", "< 1/n"],
                     id="dp-delta-over-1-over-n"),
        pytest.param(["--set", "dp.mode=client", "--set", "dp.clipping=adaptive", "--set", "dp.delta=0.1",
                      "--set", "federation.num_clients=2"],
                     ["dp.clipped_count_stddev", "sigma / 2"], id="dp-adaptive-count-noise"),
        # Embeddings never train in fedpeft (so DP-SGD never needs their per-sample gradients).
        pytest.param(["--set", "dp.mode=sample", "--set", "peft.target_modules=[\"word_embeddings\", \"query\"]"],
                     ["peft.target_modules", "word_embeddings", "Linear layers only"], id="embedding-targets"),
        pytest.param(["--set", "dp.mode=sample", "--set", "dp.accountant=rdp"],
                     ["dp.accountant = 'rdp'", "replacing one example", "only 'pld'"], id="dp-add-remove-accountant"),
        pytest.param(["--set", "dp.mode=sample", "--set", "dp.secret_file=no-such-secret"],
                     ["dp.secret_file", "cannot be read"], id="dp-missing-secret-file"),
    ],
)
def test_run_rejects_dp_settings_it_cannot_honour(tmp_path, args, named, fedpeft_cli_in_process, assert_user_error):
    out = tmp_path / "out"
    proc = fedpeft_cli_in_process("run", *TINY, *args, "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, *named)
    assert not out.exists(), "the run folder was created before failing"


def test_the_console_script_exits_2_with_one_line(tmp_path, fedpeft_cli, assert_user_error):
    out = tmp_path / "out"
    assert_user_error(fedpeft_cli("run", "--set", "train.foo=1", "--out", str(out), cwd=tmp_path), "train.foo", "[train]")
    assert not out.exists()


def test_run_rejects_busy_out_folder(tmp_path, fedpeft_cli, assert_user_error):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    proc = fedpeft_cli("run", *TINY, "--out", str(busy), cwd=tmp_path)
    assert_user_error(proc, "--out", str(busy))
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert (busy / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "runs").exists()


def test_strategies_lists_fedit(tmp_path, fedpeft_cli):
    proc = fedpeft_cli("strategies", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    names = [line.split()[0] for line in lines]
    assert "fedit" in names
    for line in lines:  # one line each: a name, then a non-empty description
        name, _, summary = line.partition(" ")
        assert name and summary.strip(), line


def test_help(tmp_path, fedpeft_cli):
    proc = fedpeft_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "run" in proc.stdout and "strategies" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
