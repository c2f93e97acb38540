"""Tests for fedpeft.reporting: plots, report.md and the terminal table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from rich.console import Console  # noqa: E402

from fedpeft.reporting import format_bytes, load_run, round_table, write_plots, write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# MiniLM-sized: LoRA r=8 on query/value plus a 2-way head, float32 on the wire.
TRAINABLE, TOTAL = 148_994, 22_862_978
PER_CLIENT = TRAINABLE * 4
CLIENTS_PER_ROUND = 5
FULL_PER_ROUND = 2 * TOTAL * 4 * CLIENTS_PER_ROUND


def make_metrics(dp: bool = False, failure: bool = False) -> list[dict]:
    accuracy = [0.5123, 0.7011, 0.7954, 0.8432]
    loss = [0.6931, 0.5822, 0.4710, 0.3987]
    train_loss = [None, 0.6512, 0.5120, 0.4301]
    epsilon = [None, 1.21, 1.88, 2.5]
    rows, cum_up, cum_down = [], 0, 0
    for r in range(4):
        clients = [] if r == 0 else [(r * 3 + k) % 10 for k in range(CLIENTS_PER_ROUND)]
        failed = []
        if failure and r == 2:
            failed = [{"client": clients.pop(), "reason": "CUDA out of memory | retry later"}]
        up = len(clients) * PER_CLIENT
        down = CLIENTS_PER_ROUND * PER_CLIENT if r else 0
        cum_up, cum_down = cum_up + up, cum_down + down
        rows.append({
            "round": r, "accuracy": accuracy[r], "loss": loss[r], "train_loss": train_loss[r],
            "bytes_up": up, "bytes_down": down, "cum_bytes_up": cum_up, "cum_bytes_down": cum_down,
            "clients": clients, "failed": failed, "epsilon": epsilon[r] if dp else None,
            "wall_s": 4.0 + 21.5 * r,
        })
    return rows


def make_summary(metrics: list[dict], dp: bool = False) -> dict:
    return {
        "name": "minilm-rt-noniid", "strategy": "fedit", "model": "minilm",
        "dataset": "rotten_tomatoes", "partition": "dirichlet", "num_rounds": 3, "num_clients": 10,
        "clients_per_round": CLIENTS_PER_ROUND, "final_accuracy": metrics[-1]["accuracy"],
        "final_loss": metrics[-1]["loss"], "majority_baseline": 0.578,
        "bytes_up": metrics[-1]["cum_bytes_up"], "bytes_down": metrics[-1]["cum_bytes_down"],
        "full_finetune_bytes_per_round": FULL_PER_ROUND, "trainable_params": TRAINABLE,
        "total_params": TOTAL, "epsilon": 2.5 if dp else None, "delta": 1e-5 if dp else None,
        "wall_s": 68.5, "seed": 0, "machine": "cpu x2",
        "config": {
            "federation": {"num_clients": 10, "clients_per_round": 5, "num_rounds": 3, "seed": 0},
            "data": {"dataset": "rotten_tomatoes", "partition": "dirichlet", "alpha": 0.5},
            "model": {"name": "minilm"}, "peft": {"method": "lora", "r": 8, "alpha": 16.0},
            "train": {"local_steps": 10, "batch_size": 16, "lr": 0.003},
            "strategy": {"name": "fedit", "server_lr": 1.0},
            "dp": {"mode": "sample" if dp else "none", "delta": 1e-5, "noise_multiplier": 1.1,
                   "max_grad_norm": 1.0},
        },
    }


def assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict], list[Path]]:
    run_dir = tmp_path_factory.mktemp("plain")
    metrics = make_metrics(failure=True)
    summary = make_summary(metrics)
    written = write_plots(run_dir, summary, metrics)
    write_report(run_dir, summary, metrics)
    return run_dir, summary, metrics, written


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict], list[Path]]:
    run_dir = tmp_path_factory.mktemp("dp")
    metrics = make_metrics(dp=True)
    summary = make_summary(metrics, dp=True)
    written = write_plots(run_dir, summary, metrics)
    write_report(run_dir, summary, metrics)
    return run_dir, summary, metrics, written


# --- plots -------------------------------------------------------------------


def test_plots_without_dp(plain_run) -> None:
    run_dir, _, _, written = plain_run
    assert written == [run_dir / "plots" / "accuracy.png", run_dir / "plots" / "bytes.png"]
    for path in written:
        assert_real_png(path)
    assert not (run_dir / "plots" / "epsilon.png").exists()
    assert plt.get_fignums() == []


def test_plots_with_dp(dp_run) -> None:
    run_dir, _, _, written = dp_run
    assert [p.name for p in written] == ["accuracy.png", "bytes.png", "epsilon.png"]
    for path in written:
        assert_real_png(path)
    assert plt.get_fignums() == []


# --- report ------------------------------------------------------------------


def test_report_results_and_links(plain_run) -> None:
    run_dir, summary, _, _ = plain_run
    text = (run_dir / "report.md").read_text(encoding="utf-8")
    assert text.startswith("# minilm-rt-noniid\n")
    assert "84.32%" in text and "57.80%" in text
    assert "dirichlet (α = 0.5)" in text and "LoRA r = 8" in text and "**fedit** (server_lr = 1)" in text
    sent = summary["bytes_up"] + summary["bytes_down"]
    full = 3 * FULL_PER_ROUND
    assert f"{100 * sent / full:.3g}%" in text
    assert f"{full / sent:,.0f}× fewer bytes" in text
    assert format_bytes(full) in text
    assert "(plots/accuracy.png)" in text and "(plots/bytes.png)" in text
    assert "epsilon.png" not in text
    assert "No differential privacy: ε = ∞." in text
    assert f"{TRAINABLE:,} of {TOTAL:,} (0.652%)" in text


def test_report_lists_failed_client_and_reason(plain_run) -> None:
    text = (plain_run[0] / "report.md").read_text(encoding="utf-8")
    assert "## Failed or rejected clients" in text
    # The pipe in the reason is escaped so the table keeps its columns.
    assert "CUDA out of memory \\| retry later" in text
    failed = plain_run[2][2]["failed"][0]["client"]
    per_round, failure = [line for line in text.splitlines() if line.startswith("| 2 |")]
    assert per_round.endswith(f"| {failed} |")
    assert failure.startswith(f"| 2 | {failed} | CUDA")


def test_report_with_dp(dp_run) -> None:
    text = (dp_run[0] / "report.md").read_text(encoding="utf-8")
    assert "(ε = 2.50, δ = 1e-05)-DP, sample-level" in text
    assert "(plots/epsilon.png)" in text
    assert "ε = ∞" not in text
    assert "Failed" not in text


def test_report_shows_only_what_exists(tmp_path: Path) -> None:
    metrics = make_metrics()
    for row in metrics:
        row.pop("train_loss")
        row["perplexity"] = float(np.exp(row["loss"]))
    summary = make_summary(metrics)
    summary["majority_baseline"] = None
    del summary["full_finetune_bytes_per_round"]
    text = write_report(tmp_path, summary, metrics).read_text(encoding="utf-8")
    assert "## Plots" not in text and "Train loss" not in text and "baseline" not in text
    assert "full fine-tuning" not in text and "Failed" not in text
    assert "Perplexity" in text and f"{np.exp(0.3987):.2f}" in text


def test_load_run_round_trip(tmp_path: Path) -> None:
    metrics = make_metrics(dp=True)
    summary = make_summary(metrics, dp=True)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    assert load_run(tmp_path) == (summary, metrics)


# --- console -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1_500, "1.5 kB"), (1_500_000, "1.5 MB"),
     (12_345_678, "12.3 MB"), (123_456_789, "123 MB"), (999_960, "1.0 MB"), (2.5e9, "2.5 GB"),
     (None, "–")],
)
def test_format_bytes(n: float | None, text: str) -> None:
    assert format_bytes(n) == text


def test_round_table_one_row_per_round() -> None:
    metrics = make_metrics(failure=True)
    table = round_table(metrics)
    assert table.row_count == len(metrics)
    headers = [c.header for c in table.columns]
    assert headers[:5] == ["Round", "Accuracy", "Loss", "Bytes up", "Bytes down"]
    assert list(table.columns[3].cells) == [format_bytes(m["bytes_up"]) for m in metrics]
    console = Console(width=120, record=True)
    console.print(table)
    assert "84.32%" in console.export_text()


def test_inputs_are_not_modified(tmp_path: Path) -> None:
    metrics = make_metrics(dp=True, failure=True)
    summary = make_summary(metrics, dp=True)
    before = copy.deepcopy((summary, metrics))
    write_report(tmp_path, summary, metrics)
    round_table(metrics)
    assert (summary, metrics) == before
