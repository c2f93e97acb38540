"""The Python API (``fedpeft.run``, ``fedpeft.audit``, ``fedpeft.load_config``), the strategy
authors' namespace, and the layering of the code (tools/import_graph.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fedpeft
import strategies
from fedpeft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    'federation.engine="inprocess"', "federation.num_clients=2", "federation.num_rounds=1", "train.local_steps=1",
    "train.batch_size=4", "data.max_examples_per_client=8", "data.max_test_examples=16",
]


def test_run_returns_the_summary_it_writes(tmp_path):
    rounds = []
    summary = fedpeft.run(overrides=TINY, out=tmp_path / "run", on_round=rounds.append)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(summary))  # plain JSON types: what a caller can store
    assert summary == written
    assert [line["round"] for line in rounds] == [0, 1]
    assert summary["num_rounds"] == 1 and summary["trainable_params"] == 222_338  # README: LoRA + BERT head


def test_run_takes_a_config_object_and_applies_overrides_to_a_copy(tmp_path):
    cfg = fedpeft.load_config(None, TINY)
    assert isinstance(cfg, fedpeft.Config)
    summary = fedpeft.run(cfg, overrides=['strategy.name="ffa-lora"'], out=tmp_path / "ffa")
    assert summary["strategy"] == "ffa-lora" and cfg.strategy_name == "fedit"
    # What FFA-LoRA clients train: the BERT head and every B, not the frozen A (12 x 8 x 384 fewer values).
    assert summary["trainable_params"] == 222_338 - 12 * 8 * 384 == 185_474


def test_run_refuses_a_busy_folder_and_a_bad_key_before_writing(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("an earlier result")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        fedpeft.run(overrides=TINY, out=busy)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    with pytest.raises(ConfigError, match="unknown key train.lrr"):
        fedpeft.run(overrides=TINY + ["train.lrr=1"], out=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_audit_is_callable_after_its_modules_are_imported(tmp_path):
    import fedpeft.audit.report  # noqa: F401  (rebinds fedpeft.audit to the package)

    assert callable(fedpeft.audit)
    with pytest.raises(ConfigError, match="unknown key"):
        fedpeft.audit(overrides=["audit.no_such_key=1"], out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_strategies_namespace_exports_every_builtin_rule():
    exported = {getattr(strategies, name) for name in strategies.__all__}
    for name in strategies.available():
        assert strategies.get(name) in exported, f"{name}: its class is not in strategies.__all__"
    for name in strategies.__all__:
        assert hasattr(strategies, name), name


def test_import_graph_has_no_cycle_and_no_upward_import():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no cycle, no upward import" in result.stdout


def test_import_graph_catches_an_upward_import(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import import_graph
    finally:
        sys.path.remove(str(ROOT / "tools"))
    fake = tmp_path / "fedpeft" / "data"
    fake.mkdir(parents=True)
    (tmp_path / "fedpeft" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "loader.py").write_text("def f():\n    from fedpeft.server import app  # lazy, still upward\n")
    server = tmp_path / "fedpeft" / "server"
    server.mkdir()
    (server / "__init__.py").write_text("")
    (server / "app.py").write_text("from fedpeft.data import loader\n")
    monkeypatch.setattr(import_graph, "ROOT", tmp_path)
    _, problems = import_graph.check()
    assert any(p.startswith("upward import: fedpeft.data.loader") for p in problems), problems
    assert any(p.startswith("import cycle: fedpeft.data.loader <-> fedpeft.server.app") for p in problems), problems
