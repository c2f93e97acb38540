"""The run folder of DESIGN.md: metrics, summary, adapter, checkpoint, report.

Files are written so that a crash never leaves a half-written one: JSON goes
to a temporary name first, is fsynced and renamed into place; metrics lines
are fsynced as they are appended; the checkpoint is
:mod:`fedpeft.server.checkpoint`'s.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpeft.errors import CheckpointError, ConfigError
from fedpeft.server.checkpoint import Checkpoint, check_state_fits, fsync_write
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
    """``obj`` as JSON at ``path``, atomically and durably (a temporary file, fsync, rename)."""
    fsync_write(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


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
        self.checkpoint = Checkpoint(self.path / CHECKPOINT, self.path)

    def create(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fsync_write(self.path / METRICS, b"")
        self.checkpoint.create(config)

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.path / METRICS, "a") as fh:
            fh.write(json.dumps(line, default=_jsonable) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

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
        """The state and progress after a round (see :meth:`Checkpoint.save`)."""
        self.checkpoint.save(state, progress, default=_jsonable)

    def checkpoint_config(self) -> dict[str, Any]:
        """The config the run was started with; a :class:`CheckpointError` when the folder cannot be resumed."""
        return self.checkpoint.config()

    def checkpoint_state_dir(self) -> Path:
        """The folder of the last checkpointed round's strategy state."""
        loaded = json.loads((self.path / CHECKPOINT / "latest.json").read_text())
        return self.path / CHECKPOINT / loaded["folder"] / "state"

    def load_checkpoint(self) -> tuple[ServerState, dict[str, Any], list[dict[str, Any]]] | None:
        """The last checkpointed round: state, progress and the metrics lines up to it; None before round 0's.

        Writes nothing (:meth:`keep_metrics` then drops the lines after it).
        A line of ``metrics.jsonl`` cut off by a kill, and lines of rounds
        after the checkpoint, are left out; a line missing before it is a
        :class:`CheckpointError`.
        """
        loaded = self.checkpoint.load()
        if loaded is None:
            return None
        state, progress = loaded
        last = int(progress["round"])
        history = []
        text = (self.path / METRICS).read_text() if (self.path / METRICS).is_file() else ""
        for number, raw in enumerate(text.splitlines(), start=1):
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                if number == len(text.splitlines()) and not text.endswith("\n"):
                    break  # the line being appended when the run was killed
                raise CheckpointError(f"--resume {self.path}: {METRICS} line {number} is corrupt; the folder was "
                                      "left as it is") from None
            if line.get("round", last + 1) <= last:
                history.append(line)
        if [m["round"] for m in history] != list(range(last + 1)):
            raise CheckpointError(f"--resume {self.path}: {METRICS} holds rounds {[m['round'] for m in history]}, "
                                  f"but the checkpoint is at round {last} and needs rounds 0..{last}; the folder was "
                                  "left as it is")
        return state, progress, history

    def resume_point(self, initial) -> tuple[ServerState, dict[str, Any], list[dict[str, Any]]] | None:
        """:meth:`load_checkpoint`, and the state checked against ``initial`` (the model's initial payload
        under the checkpoint's config): the whole check a resume needs, writing nothing."""
        loaded = self.load_checkpoint()
        if loaded is not None:
            check_state_fits(loaded[0], initial, f"--resume {self.path}")
        return loaded

    def keep_metrics(self, history: list[dict[str, Any]]) -> None:
        """Make ``metrics.jsonl`` exactly ``history`` (the rounds a resumed run keeps)."""
        fsync_write(self.path / METRICS, "".join(json.dumps(m, default=_jsonable) + "\n" for m in history).encode())

    def write_report(self, summary: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
        from fedpeft.reporting import write_plots, write_report

        write_plots(self.path, summary, metrics)
        write_report(self.path, summary, metrics)
