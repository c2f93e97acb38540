"""The run folder of DESIGN.md: metrics, summary, adapter, checkpoint, report.

Files are written so that a crash never leaves a half-written one: JSON goes
to a temporary name first and is renamed into place.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpeft.errors import ConfigError, FedPeftError
from strategies import ServerState

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
CHECKPOINT = "checkpoint"


def default_run_dir(cfg) -> Path:
    """``runs/<timestamp>-<federation.name>``."""
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.federation.name}"


def new_output_folder(out: str | Path | None, default: Path, option: str = "out") -> Path:
    """``out`` (or ``default``) if it is absent or an empty folder; a :class:`ConfigError` otherwise.

    A run never writes into a folder that holds anything: an earlier result
    would be mixed with, or overwritten by, this one.
    """
    target = Path(out) if out is not None else default
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{option} {target} already exists and is not an empty folder; choose a new path")
    return target


def machine_description(device=None) -> str:
    """The machine in one line; with a CUDA ``device``, its GPU too."""
    import torch

    text = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if device is not None and torch.device(device).type == "cuda":
        text += f", {torch.cuda.get_device_name(torch.device(device))} GPU (CUDA {torch.version.cuda})"
    return f"{text}, torch {torch.__version__}, Python {platform.python_version()}"


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class RunFolder:
    """Writer of one run's folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def create(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / METRICS).write_text("")
        (self.path / CHECKPOINT).mkdir(exist_ok=True)
        write_json(self.path / CHECKPOINT / "config.json", config)

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.path / METRICS, "a") as fh:
            fh.write(json.dumps(line, default=_jsonable) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        with open(self.path / METRICS) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / SUMMARY, summary)

    def export_adapter(self, resident, payload) -> Path:
        """The global adapter in peft's own format (adapter_config.json + safetensors)."""
        from fedpeft.models.export import export_adapter

        return export_adapter(resident, payload, self.path / ADAPTER)

    def save_checkpoint(self, state: ServerState, progress: dict[str, Any]) -> None:
        """The state after a round, then the progress file that points at it
        (written last: a crash in between leaves the previous round intact)."""
        target = self.path / CHECKPOINT
        state.save(target / "state")
        write_json(target / "progress.json", progress)

    def checkpoint_config(self) -> dict[str, Any]:
        path = self.path / CHECKPOINT / "config.json"
        if not path.is_file():
            raise FedPeftError(f"--resume {self.path}: no {CHECKPOINT}/config.json, so this is not a resumable run folder")
        return json.loads(path.read_text())

    def load_checkpoint(self) -> tuple[ServerState, dict[str, Any], list[dict[str, Any]]]:
        """The last saved round: state, progress and the metrics up to it
        (a metrics line written after the last checkpoint is dropped)."""
        progress = json.loads((self.path / CHECKPOINT / "progress.json").read_text())
        state = ServerState.load(self.path / CHECKPOINT / "state")
        history = [m for m in self.read_metrics() if m["round"] <= progress["round"]]
        (self.path / METRICS).write_text("".join(json.dumps(m, default=_jsonable) + "\n" for m in history))
        return state, progress, history

    def write_report(self, summary: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
        from fedpeft.reporting import write_plots, write_report

        write_plots(self.path, summary, metrics)
        write_report(self.path, summary, metrics)
