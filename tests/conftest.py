"""Fixtures shared by the test suite.

* the environment every test and every subprocess it starts runs in
  (offline, no telemetry, no update check, no runtime installs);
* ``fedpeft_cli``: the real ``fedpeft`` console script in a subprocess, its
  output free of colour codes, and ``assert_user_error`` for its one-line
  failures; ``fedpeft_cli_in_process``: the same entry point called in the
  test process (no interpreter start-up and no torch import per call), for the
  many user-error checks that fail before any federation starts;
* ``one_torch_thread`` / ``torch_threads``: torch's thread count set for a
  module or a test and put back afterwards, so no test changes another's;
* ``read_run``: a run folder's ``summary.json`` and ``metrics.jsonl``;
* ``tiny_federation``: the overrides of a federation small enough for a unit
  test (random-weight two-layer BERT, in-process engine, seconds per run).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Set before any test imports transformers or Flower (they read these at
# import), and inherited by every subprocess a test starts.
TEST_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _key, _value in TEST_ENV.items():
    os.environ.setdefault(_key, _value)

_SCRIPT = Path(sys.executable).with_name("fedpeft")
FEDPEFT_COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fedpeft.cli"]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# A federation a unit test can afford: the random-weight two-layer BERT of
# fedpeft.models.tiny_bert, two clients, one round, one local step.
TINY_FEDERATION = (
    'model.name="tiny-bert"', "model.max_length=16", 'federation.engine="inprocess"', "federation.num_clients=2",
    "federation.num_rounds=1", "train.local_steps=1", "train.batch_size=8", "data.max_examples_per_client=16",
    "data.max_test_examples=16", 'data.partition="iid"',
)


def run_fedpeft(*args: str, cwd: Path, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``fedpeft ARGS...`` in ``cwd``; stdout and stderr without ANSI colour codes.

    A wide terminal keeps rich from wrapping the one-line errors the tests read.
    The generous timeout is only a last line of defence against a hang: on the
    shared 2-core machine a command of 10 s of CPU can take minutes of wall time.
    """
    full_env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([*FEDPEFT_COMMAND, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    proc.stdout, proc.stderr = ANSI.sub("", proc.stdout), ANSI.sub("", proc.stderr)
    return proc


@pytest.fixture(scope="session")
def fedpeft_cli() -> Callable[..., subprocess.CompletedProcess]:
    """The real console script: ``fedpeft_cli("run", "--set", ..., cwd=tmp_path)``."""
    return run_fedpeft


def run_fedpeft_in_process(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``fedpeft ARGS...`` through :func:`fedpeft.cli.main` in this process, as :func:`run_fedpeft` reports it.

    The exit code is the one ``main`` exits with; an exception that escapes
    ``main`` (which the console script would print as a traceback) comes back
    as exit code 1 with its traceback on stderr, so ``assert_user_error``
    fails on it exactly as it would on the subprocess. Only for commands that
    stop before a federation starts: a run that trains would start Ray in the
    test process.
    """
    import traceback

    from fedpeft.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    os.environ.update({"COLUMNS": "400", "NO_COLOR": "1", **(env or {})})
    sys.argv = ["fedpeft", *args]
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - a traceback is what the test must see
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["fedpeft", *args], code, ANSI.sub("", out.getvalue()),
                                       ANSI.sub("", err.getvalue()))


@pytest.fixture(scope="session")
def fedpeft_cli_in_process() -> Callable[..., subprocess.CompletedProcess]:
    """``fedpeft_cli``'s signature, in this process: for user errors caught before any federation starts."""
    return run_fedpeft_in_process


def check_user_error(proc: subprocess.CompletedProcess, *named: str) -> str:
    """Assert ``proc`` failed as a user error (exit 2, one ``error:`` line naming ``named``); return the line."""
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both
    assert proc.returncode == 2, both
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    line = lines[0]
    assert line.startswith("error:"), line
    for text in named:
        assert text in line, f"{text!r} not in {line!r}"
    return line


@pytest.fixture(scope="session")
def assert_user_error() -> Callable[..., str]:
    return check_user_error


def read_run_folder(out: Path) -> tuple[dict, list[dict]]:
    """A finished run folder's summary and its per-round metrics."""
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


@pytest.fixture(scope="session")
def read_run() -> Callable[[Path], tuple[dict, list[dict]]]:
    return read_run_folder


# What differs between any two runs of the same config: the wall clock and the clients' step-loop seconds.
TIMING_KEYS = ("wall_s", "client_compute_s")


def without_timings(lines: list[dict]) -> list[dict]:
    """Metrics lines without their timings, so two runs' lines compare equal when their results do."""
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]



@pytest.fixture
def tiny_federation() -> list[str]:
    """Overrides for a federation of seconds (a fresh list: tests may append)."""
    return list(TINY_FEDERATION)


def _set_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a whole module (its module-scoped fixtures included:
    request it from them too), restored afterwards. Attack optimisations are
    tuned and timed single-threaded."""
    yield from _set_threads(1)


@pytest.fixture(scope="module")
def two_torch_threads() -> Iterator[None]:
    yield from _set_threads(2)


@pytest.fixture
def torch_threads() -> Iterator[Callable[[int], None]]:
    """``torch_threads(n)`` inside a test; the count before the test comes back after it."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def restore_resident(rt):
    """A module's shared runtime ``rt``: after each test, whatever it set or left behind
    (payload, gradients, train mode), the next test starts from the initial adapter in
    eval mode. Use with ``pytestmark = pytest.mark.usefixtures("restore_resident")``."""
    try:
        yield
    finally:
        rt.model.set_payload(rt.model.initial)
        rt.model.model.zero_grad(set_to_none=True)
        rt.model.model.eval()
