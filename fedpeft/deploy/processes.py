"""The processes of a deployment: started with their own logs, stopped with everything they started.

Flower's SuperLink and SuperNodes start helpers of their own (``flower-superexec``,
then ``flwr-serverapp`` / ``flwr-clientapp`` per run or message), some in
process groups of their own and some outliving their parent for seconds.
:class:`Processes` stops each process tree, then its process group, then
any process left that carries the deployment's private ``FLWR_HOME``, so
nothing it started survives it, on success, failure or Ctrl-C alike.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

__all__ = ["Processes", "free_port", "wait_until"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready: Callable[[], bool], timeout: float, what: str, alive: Callable[[], str | None] = lambda: None,
               every: float = 0.25) -> None:
    """Poll ``ready`` until it is true; ``TimeoutError`` naming ``what`` after ``timeout`` s, ``RuntimeError`` as soon as
    ``alive`` says why the process it waits on is gone."""
    deadline = time.time() + timeout
    while not ready():
        gone = alive()
        if gone:
            raise RuntimeError(f"{what}: {gone}")
        if time.time() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)


class Processes:
    """Processes started in ``folder`` with environment ``env`` (which must carry a private ``FLWR_HOME``)."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env = Path(folder), env
        self.logs = self.folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start ``command``, its output in ``logs/<name>.log`` (a file, not a pipe: nothing can block on it)."""
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(command, cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def exited(self, name: str, proc: subprocess.Popen) -> str | None:
        """Why ``proc`` is gone (its exit code and last log lines), None while it runs."""
        if proc.poll() is None:
            return None
        tail = " | ".join(line.strip() for line in self.log(name).splitlines()[-4:] if line.strip())
        return f"{name} exited with code {proc.returncode} ({tail or 'no output'}; log: {self.logs / name}.log)"

    def stop(self, proc: subprocess.Popen, timeout: float = 10) -> None:
        """SIGTERM ``proc`` and its descendants, SIGKILL what is left, then its process group."""
        try:
            parent = psutil.Process(proc.pid)
            tree = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def leftovers(self) -> list[psutil.Process]:
        """Live processes (orphans included) whose environment carries this deployment's FLWR_HOME."""
        home, found = self.env["FLWR_HOME"], []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get("FLWR_HOME") == home and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return found

    def stop_all(self) -> None:
        """Stop every process started here (the last started first) and whatever they left behind."""
        for _, proc in reversed(self.started):
            self.stop(proc)
        self.started.clear()
        left = self.leftovers()
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=5)
