"""Crash-safe checkpoints: a run killed at any moment resumes to the result of a run that never stopped.

Layout of ``checkpoint/``::

    config.json            the resolved config (written when the run starts)
    code.json              the fedpeft version and a digest of its source that wrote the checkpoint
    round-00003/           the last complete round: state/ (safetensors + JSON) and progress.json
    latest.json            names that folder and the SHA-256 of every file in it

A round is written into a hidden temporary folder, every file and the folder
fsynced, then renamed into place; ``latest.json`` is replaced atomically
only after that, and older rounds are deleted last. A kill at any moment
therefore leaves either the previous round or the new one complete and
named by ``latest.json``; a run killed before its first checkpoint has no
``latest.json`` and starts again from round 0. Reading checks everything
before anything is changed: a truncated, corrupt or foreign checkpoint is
one :class:`CheckpointError` and the folder stays as it was.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

import strategies
from fedpeft.errors import CheckpointError
from strategies import ServerState

CONFIG = "config.json"
CODE = "code.json"
LATEST = "latest.json"
PROGRESS = "progress.json"
STATE = "state"
FORMAT = 2  # 1: state/ and progress.json overwritten in place (no latest.json)


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: a temporary file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(obj: Any, default=None) -> bytes:
    return (json.dumps(obj, indent=2, default=default) + "\n").encode()


@functools.lru_cache(maxsize=1)
def code_identity() -> dict[str, str]:
    """The fedpeft version and a SHA-256 over the source of ``fedpeft`` and ``strategies``.

    A checkpoint resumes only under the code that wrote it: another version
    could compute other rounds from the same state, and the resumed run
    would silently differ from one that never stopped.
    """
    digest = hashlib.sha256()
    for root in (Path(__file__).resolve().parents[1], Path(strategies.__file__).resolve().parent):
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"fedpeft": importlib.metadata.version("fedpeft"), "source_sha256": digest.hexdigest()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Checkpoint:
    """The ``checkpoint/`` folder of one run."""

    def __init__(self, path: Path, run_dir: Path):
        self.path = path
        self.run_dir = run_dir

    def create(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fsync_write(self.path / CODE, _json_bytes({"format": FORMAT, **code_identity()}))
        fsync_write(self.path / CONFIG, _json_bytes(config))

    def config(self) -> dict[str, Any]:
        """The run's resolved config; a :class:`CheckpointError` if it is missing, unreadable or from other code."""
        where = f"--resume {self.run_dir}"
        path = self.path / CONFIG
        if not path.is_file():
            raise CheckpointError(f"{where}: no checkpoint/{CONFIG}, so this is not a resumable run folder")
        self._check_code(where)
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{where}: checkpoint/{CONFIG} is corrupt ({exc}); the folder was left as it is") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: checkpoint/{CONFIG} is not a config table; the folder was left as it is")
        return config

    def _check_code(self, where: str) -> None:
        path = self.path / CODE
        if not path.is_file():
            raise CheckpointError(f"{where}: the checkpoint has no {CODE}: it was written by an older fedpeft "
                                  f"(checkpoint format 1), which this one cannot resume; start the run again")
        try:
            written = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{where}: checkpoint/{CODE} is corrupt; the folder was left as it is") from None
        ours = {"format": FORMAT, **code_identity()}
        if written != ours:
            what = (f"fedpeft {written.get('fedpeft')!r}" if written.get("fedpeft") != ours["fedpeft"]
                    else "other fedpeft source code")
            raise CheckpointError(f"{where}: the checkpoint was written by {what} (source "
                                  f"{str(written.get('source_sha256'))[:12]}, format {written.get('format')}); this is "
                                  f"fedpeft {ours['fedpeft']!r} (source {ours['source_sha256'][:12]}, format {FORMAT}), "
                                  "whose rounds could differ: resume it with the code that wrote it, or start again")

    def save(self, state: ServerState, progress: dict[str, Any], default=None) -> None:
        """Round ``progress["round"]``'s state and progress, complete on disk before ``latest.json`` names them."""
        name = f"round-{int(progress['round']):05d}"
        tmp = self.path / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        state.save(tmp / STATE)
        (tmp / PROGRESS).write_bytes(_json_bytes(progress, default))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for path in files:
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
        for folder in {p.parent for p in files}:
            fsync_dir(folder)
        digests = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        final = self.path / name
        if final.exists():  # the same round written again (a run restarted from round 0)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.path)
        fsync_write(self.path / LATEST, _json_bytes({"round": int(progress["round"]), "folder": name,
                                                     "sha256": digests}))
        for old in self.path.iterdir():  # only now: until latest.json moved on, the old round was the checkpoint
            if old.is_dir() and old.name != name and old.name.startswith(("round-", ".round-")):
                shutil.rmtree(old, ignore_errors=True)

    def load(self) -> tuple[ServerState, dict[str, Any]] | None:
        """The last complete round's state and progress, verified; None when no round was checkpointed yet.

        Nothing is written: every check comes first, so a bad checkpoint
        leaves the folder as it was.
        """
        where = f"--resume {self.run_dir}"
        self._check_code(where)
        latest = self.path / LATEST
        if not latest.is_file():
            return None
        try:
            index = json.loads(latest.read_text())
            folder = self.path / index["folder"]
            digests = dict(index["sha256"])
            round_ = int(index["round"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: checkpoint/{LATEST} is corrupt ({exc}); the folder was left as "
                                  "it is") from None
        if not folder.is_dir() or Path(index["folder"]).name != index["folder"]:
            raise CheckpointError(f"{where}: checkpoint/{LATEST} names round folder {index['folder']!r}, which is "
                                  "missing; the folder was left as it is")
        for rel in (f"{STATE}/state.json", f"{STATE}/state.safetensors", PROGRESS):
            if rel not in digests:
                raise CheckpointError(f"{where}: checkpoint/{LATEST} lists no {rel}; the folder was left as it is")
        for rel, want in digests.items():
            path = folder / rel
            if not path.is_file() or _sha256(path) != want:
                state = "missing" if not path.is_file() else "changed since it was written (truncated or corrupt)"
                raise CheckpointError(f"{where}: checkpoint/{index['folder']}/{rel} is {state}; the folder was "
                                      "left as it is")
        try:
            state = ServerState.load(folder / STATE)
            progress = json.loads((folder / PROGRESS).read_text())
        except Exception as exc:  # the digests matched, so this is a checkpoint fedpeft cannot read at all
            raise CheckpointError(f"{where}: checkpoint/{index['folder']} cannot be read ({exc}); the folder was "
                                  "left as it is") from None
        if progress.get("round") != round_:
            raise CheckpointError(f"{where}: checkpoint/{index['folder']} holds round {progress.get('round')}, "
                                  f"not round {round_}; the folder was left as it is")
        return state, progress


def check_state_fits(state: ServerState, initial, where: str) -> None:
    """A :class:`CheckpointError` unless ``state``'s adapter has the modules, shapes and head of ``initial``.

    ``initial`` is the model's initial payload under the checkpoint's own
    config: a state that does not fit it was written for another model or
    adapter, and loading it would fail half-way or train something else.
    """
    problems = []
    if set(state.factors) != set(initial.factors):
        problems.append(f"LoRA modules {sorted(state.factors)[:3]}... vs the config's {sorted(initial.factors)[:3]}...")
    else:
        for module, f in initial.factors.items():
            got = state.factors[module]
            # A rule may keep the global adapter below the model's rank, never above it.
            if got.A.shape[1] != f.A.shape[1] or got.B.shape[0] != f.B.shape[0] or got.A.shape[0] > f.A.shape[0]:
                problems.append(f"{module}: A {got.A.shape} / B {got.B.shape} vs {f.A.shape} / {f.B.shape}")
    if {k: v.shape for k, v in state.extras.items()} != {k: v.shape for k, v in initial.extras.items()}:
        problems.append(f"trained head tensors {sorted(state.extras)} vs the config's {sorted(initial.extras)}")
    if problems:
        raise CheckpointError(f"{where}: the checkpoint's state does not fit the model its config builds "
                              f"({'; '.join(problems[:2])}); the folder was left as it is")
