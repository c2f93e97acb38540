"""A run killed at any moment resumes to the result of a run that never stopped; a bad checkpoint changes nothing.

Two levels. In-process, the run is cut at each step of the checkpoint's
write sequence (before round 0's checkpoint, with a round's folder written
but not renamed, renamed but not named by ``latest.json``, named but the
old round not yet deleted, a metrics line half-written, after the last
checkpoint but before the summary) by an exception nothing catches, which
leaves the disk as a kill at that point would; then ``--resume`` must give
the uninterrupted run's metrics, adapter and summary. Then the real thing,
``kill -9`` of a ``fedpeft run`` process, twice (before its first
checkpoint, and mid-run), each followed by ``fedpeft run --resume`` in a
process of its own. Finally corrupt, truncated and foreign checkpoints:
one line, exit code 2, and every file of the folder as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fedpeft.server.checkpoint as checkpoint
from fedpeft.engine import run_engine
from fedpeft.server.run_folder import RunFolder
from fedpeft.validation import config_from_dict, load_config
from tests.conftest import TEST_ENV, without_timings

ROUNDS = 3


@pytest.fixture(scope="module")
def overrides() -> list[str]:
    from tests.conftest import TINY_FEDERATION

    return [o for o in TINY_FEDERATION if not o.startswith("federation.num_rounds")] + [
        f"federation.num_rounds={ROUNDS}", "federation.num_clients=3", "train.local_steps=2"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, overrides) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    run_engine(load_config(None, overrides), out)
    return out


class Killed(BaseException):
    """Unwinds like a kill: nothing in fedpeft or Flower catches a BaseException that is not an Exception."""


def cut_at(monkeypatch, owner, name: str, nth: int, when: str = "before", only=lambda *a, **k: True):
    """Raise :class:`Killed` at the ``nth`` call of ``owner.name`` that ``only`` accepts, before or after it runs."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        hit = only(*args, **kwargs) and len(calls) == nth - 1
        if only(*args, **kwargs):
            calls.append(1)
        if hit and when == "before":
            raise Killed(name)
        result = original(*args, **kwargs)
        if hit:
            raise Killed(name)
        return result

    monkeypatch.setattr(owner, name, wrapper)


def half_line(folder, line):
    """``append_metrics`` killed in the middle of its write: part of the line, no newline."""
    with open(folder.path / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(line)[:17])
    raise Killed("append_metrics")


def is_latest(path, data) -> bool:
    return Path(path).name == "latest.json"


CUTS = {
    "before-round-0-checkpoint": (checkpoint.Checkpoint, "save", 1, "before", None),
    "round-folder-written-not-renamed": (checkpoint, "_sha256", 4, "before", None),  # 3 files a round: round 1's first
    "renamed-not-named-by-latest": (checkpoint, "fsync_write", 2, "before", is_latest),
    "named-old-round-not-deleted": (checkpoint, "fsync_write", 2, "after", is_latest),
    "half-a-metrics-line": (RunFolder, "append_metrics", 3, "half", None),
    "after-the-last-checkpoint": (RunFolder, "write_summary", 1, "before", None),
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_a_run_cut_at_any_step_of_its_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, whole,
                                                                                     overrides, cut):
    owner, name, nth, when, only = CUTS[cut]
    if when == "half":
        monkeypatch.setattr(owner, name, _half_on_nth(getattr(owner, name), nth))
    else:
        cut_at(monkeypatch, owner, name, nth, when, **({"only": only} if only else {}))
    out = tmp_path / "cut"
    with pytest.raises(Killed):
        run_engine(load_config(None, overrides), out)
    monkeypatch.undo()
    assert not (out / "summary.json").exists()
    resumed = run_engine(config_from_dict(RunFolder(out).checkpoint_config()), out, resume=True)
    assert_same_run(out, whole, resumed)
    rounds = sorted(p.name for p in (out / "checkpoint").iterdir() if p.is_dir())
    assert rounds == [f"round-{ROUNDS:05d}"], rounds  # no temporary or stale round left behind


def _half_on_nth(original, nth):
    calls = []

    def append(folder, line):
        calls.append(1)
        if len(calls) == nth:
            half_line(folder, line)
        return original(folder, line)

    return append


def assert_same_run(out: Path, whole: Path, summary: dict | None = None):
    cut_metrics, whole_metrics = RunFolder(out).read_metrics(), RunFolder(whole).read_metrics()
    assert [m["round"] for m in cut_metrics] == list(range(ROUNDS + 1))
    assert without_timings(cut_metrics) == without_timings(whole_metrics)
    assert (out / "adapter/adapter_model.safetensors").read_bytes() == \
        (whole / "adapter/adapter_model.safetensors").read_bytes()
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, whole)]
    drop = ("wall_s", "config")
    assert {k: v for k, v in summaries[0].items() if k not in drop} == \
        {k: v for k, v in summaries[1].items() if k not in drop}
    if summary is not None:
        assert summary["final_accuracy"] == summaries[1]["final_accuracy"]


def test_kill_9_before_the_first_checkpoint_and_mid_run_then_resume_gives_the_same_summary(tmp_path, whole, overrides,
                                                                                          fedpeft_cli_in_process):
    """The measured bug: killed a second after it started, ``--resume`` ended in a FileNotFoundError traceback.
    Two ``fedpeft run`` processes killed with SIGKILL, then the last resume through the same CLI entry point
    in this process (the tiny federation runs in-process, no Ray)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedpeft.cli"]
    env = {**os.environ, **TEST_ENV, "COLUMNS": "200"}
    sets = [a for o in overrides for a in ("--set", o)]

    def start(*args):
        return subprocess.Popen([*command, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def kill_when(proc, ready, what):
        deadline = time.time() + 300
        while not ready():
            assert proc.poll() is None, f"finished before {what}: {proc.communicate()[1][-2000:]}"
            assert time.time() < deadline, f"no {what} after 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    first = start("run", "--out", str(out), *sets)
    kill_when(first, lambda: (out / "checkpoint" / "config.json").is_file(), "config.json")
    assert not (out / "checkpoint" / "latest.json").exists()  # killed before its first checkpoint

    def rounds_done() -> int:
        latest = out / "checkpoint" / "latest.json"
        return json.loads(latest.read_text())["round"] if latest.is_file() else -1

    second = start("run", "--resume", str(out))
    kill_when(second, lambda: rounds_done() >= 1, "round 1's checkpoint")
    assert rounds_done() < ROUNDS and not (out / "summary.json").exists()

    third = fedpeft_cli_in_process("run", "--resume", str(out), cwd=tmp_path)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert_same_run(out, whole)


# --- checkpoints that cannot be resumed: one line, exit code 2, the folder unchanged -----------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def interrupted(tmp_path, overrides) -> Path:
    """A run stopped after round 1's checkpoint."""

    def stop(line):
        if line["round"] == 1:
            raise Killed("after round 1")

    out = tmp_path / "cut"
    with pytest.raises(Killed):
        run_engine(load_config(None, overrides), out, on_round=stop)
    return out


def round_folder(out: Path) -> Path:
    return out / "checkpoint" / json.loads((out / "checkpoint" / "latest.json").read_text())["folder"]


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def flip_a_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def other_code(out: Path):
    path = out / "checkpoint" / "code.json"
    code = json.loads(path.read_text())
    path.write_text(json.dumps({**code, "source_sha256": "0" * 64}))


def other_model(out: Path):
    """The config edited to another adapter rank than the state was trained at."""
    path = out / "checkpoint" / "config.json"
    config = json.loads(path.read_text())
    config["peft"]["r"] = 4
    path.write_text(json.dumps(config))


BAD = {
    "truncated-state": (lambda out: truncate(round_folder(out) / "state" / "state.safetensors"),
                        "state/state.safetensors is changed since it was written"),
    "corrupt-progress": (lambda out: flip_a_byte(round_folder(out) / "progress.json"),
                         "progress.json is changed since it was written"),
    "missing-round": (lambda out: __import__("shutil").rmtree(round_folder(out)), "which is missing"),
    "corrupt-latest": (lambda out: truncate(out / "checkpoint" / "latest.json"), "latest.json is corrupt"),
    "corrupt-config": (lambda out: truncate(out / "checkpoint" / "config.json"), "config.json is corrupt"),
    "other-code": (other_code, "the checkpoint was written by other fedpeft source code"),
    "old-format": (lambda out: (out / "checkpoint" / "code.json").unlink(), "written by an older fedpeft"),
    "metrics-line-lost": (lambda out: (out / "metrics.jsonl").write_text(
        (out / "metrics.jsonl").read_text().splitlines()[1] + "\n"), "needs rounds 0..1"),
    "other-model": (other_model, "does not fit the model its config builds"),
}


@pytest.mark.parametrize("damage", list(BAD))
def test_a_bad_checkpoint_is_one_line_and_changes_nothing(interrupted, fedpeft_cli_in_process, assert_user_error,
                                                          damage):
    spoil, needle = BAD[damage]
    spoil(interrupted)
    before = snapshot(interrupted)
    result = fedpeft_cli_in_process("run", "--resume", str(interrupted), cwd=interrupted.parent)
    assert_user_error(result, needle)
    assert "the folder was left as it is" in result.stderr or damage in ("other-code", "old-format")
    assert snapshot(interrupted) == before
