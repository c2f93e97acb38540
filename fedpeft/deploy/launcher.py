"""``fedpeft deploy``: the same ServerApp and ClientApp on Flower's Deployment Engine, all on loopback.

One SuperLink and ``N`` SuperNodes, each a process of its own started with
its own partition (``--node-config "partition-id=i num-partitions=N"``),
then ``flwr run`` of this project against the SuperLink. By default every
connection is TLS (a CA and a server certificate for 127.0.0.1 made for
this deployment, :mod:`fedpeft.deploy.pki`) and SuperNodes authenticate:
each has its own key pair whose public half is registered with the
SuperLink before it starts, and a SuperNode whose key is not registered is
refused. ``insecure=True`` runs without either, as Flower's ``--insecure``.

Everything the deployment needs lives in ``<out>.deploy/``: the keys and
certificates, each process's log, a private ``FLWR_HOME`` (Flower's
connection config and installed apps) and the staged app (only the
project's sources, so Flower does not walk the virtual environment to
build it). The run folder ``<out>`` is the usual one, written by the
ServerApp. Every process started is stopped at the end, also on failure
and on Ctrl-C (:class:`fedpeft.deploy.processes.Processes`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpeft.config import CONFIG_JSON, Config
from fedpeft.deploy.pki import make_supernode_keys, make_test_certificates
from fedpeft.deploy.processes import Processes, free_port, wait_until
from fedpeft.errors import DeployError

__all__ = ["deploy", "Deployment", "nodes_problem"]

QUIET = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0",
         "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "NO_COLOR": "1"}
CONNECTION = "fedpeft-deploy"
APP_PARTS = ("fedpeft", "strategies", "pyproject.toml", "README.md")
COMPLETED = "finished:completed"


def bin_dir() -> Path:
    """The folder of this Python's console scripts (flwr, flower-superlink, flower-supernode)."""
    return Path(sys.executable).parent


class Deployment:
    """A loopback deployment of ``cfg`` on ``nodes`` SuperNodes writing the run folder ``out``.

    Parameters
    ----------
    cfg : Config
        The run's config (``federation.num_nodes`` is set to ``nodes``).
    out : Path
        The run folder; the deployment's own files go to ``<out>.deploy/``.
    nodes : int
        SuperNodes to start.
    insecure : bool
        No TLS and no SuperNode authentication.
    startup_timeout : float
        Seconds each process may take to come up.
    """

    def __init__(self, cfg: Config, out: Path, nodes: int, insecure: bool = False, startup_timeout: float = 120.0):
        self.cfg, self.out, self.nodes, self.insecure = cfg, Path(out).resolve(), int(nodes), insecure
        self.startup_timeout = startup_timeout
        self.folder = self.out.with_name(self.out.name + ".deploy")
        self.home = self.folder / "flwr-home"
        env = {**os.environ, **QUIET, "FLWR_HOME": str(self.home),
               # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by bare name.
               "PATH": f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        self.processes = Processes(self.folder, env)
        self.port = free_port()
        self.certs: dict[str, Path] | None = None
        self.timings: dict[str, float] = {}

    # --- the steps ---------------------------------------------------------------------------------------------

    def stage_app(self) -> Path:
        """A copy of the project's sources: what ``flwr run`` builds into the app it installs."""
        root = Path(__file__).resolve().parents[2]  # fedpeft/deploy/launcher.py -> the project
        if not (root / "pyproject.toml").is_file():
            raise DeployError(f"fedpeft deploy needs the project's source tree (pyproject.toml beside {root / 'fedpeft'});"
                              " install fedpeft with `pip install -e .` from a clone")
        app = self.folder / "app"
        shutil.rmtree(app, ignore_errors=True)
        app.mkdir()
        for part in APP_PARTS:
            src = root / part
            if src.is_dir():
                shutil.copytree(src, app / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.is_file():
                shutil.copy2(src, app / part)
        return app

    def start_superlink(self) -> None:
        command = [str(bin_dir() / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                   "--isolation", "subprocess", "--disable-runtime-dependency-installation"]
        if self.insecure:
            command.append("--insecure")
        else:
            self.certs = make_test_certificates(self.folder / "pki")
            command += ["--ssl-ca-certfile", str(self.certs["ca_cert"]), "--ssl-certfile",
                        str(self.certs["server_cert"]), "--ssl-keyfile", str(self.certs["server_key"]),
                        "--enable-supernode-auth"]
        proc = self.processes.start("superlink", command)
        scheme = "http" if self.insecure else "https"
        ready = f"Uvicorn running on {scheme}://127.0.0.1:{self.port}"
        wait_until(lambda: ready in self.processes.log("superlink"), self.startup_timeout, "the SuperLink did not start",
                   lambda: self.processes.exited("superlink", proc))
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.port}"']
        lines.append("insecure = true" if self.insecure else f'root-certificates = "{self.certs["ca_cert"]}"')
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """``flwr ARGS --format json`` against this deployment's SuperLink; its JSON answer."""
        proc = subprocess.run([str(bin_dir() / "flwr"), *args, "--format", "json"], cwd=self.folder,
                              env=self.processes.env, capture_output=True, text=True, timeout=timeout)
        start = proc.stdout.find("{")
        try:
            answer = json.loads(proc.stdout[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            answer = None
        if proc.returncode != 0 or not isinstance(answer, dict) or answer.get("success") is False:
            detail = (answer or {}).get("error-message") or (proc.stdout + proc.stderr).strip()[-400:]
            raise DeployError(f"`flwr {' '.join(args)}` failed: {detail}")
        return answer

    def supernode_command(self, port: int, key: Path | None, partition: int | None) -> list[str]:
        command = [str(bin_dir() / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--host",
                   "127.0.0.1", "--port", str(port), "--max-retries", "3"]
        command += ["--insecure"] if self.insecure else ["--root-certificates", str(self.certs["ca_cert"])]
        if key is not None:
            command += ["--auth-supernode-private-key", str(key)]
        if partition is not None:
            command += ["--node-config", f"partition-id={partition} num-partitions={self.nodes}"]
        return command

    def start_supernodes(self) -> None:
        """Register each SuperNode's key (unless insecure), start them, wait until all are online."""
        started = []
        for i in range(self.nodes):
            key = None
            if not self.insecure:
                key, public = make_supernode_keys(self.folder / "pki" / "supernodes", f"supernode-{i}")
                self.flwr("supernode", "register", str(public), CONNECTION, "--name", f"supernode-{i}")
            started.append((f"supernode-{i}", self.processes.start(f"supernode-{i}", self.supernode_command(
                free_port(), key, i))))

        def online() -> bool:
            nodes = self.flwr("supernode", "list", CONNECTION)["nodes"]
            return sum(n.get("status") == "online" for n in nodes) >= self.nodes

        def gone() -> str | None:
            return next((why for name, p in started if (why := self.processes.exited(name, p))), None)

        wait_until(online, self.startup_timeout, f"not all {self.nodes} SuperNodes came online", gone, every=1.0)

    def run_config(self) -> Path:
        tables = self.cfg.to_dict()
        tables["federation"]["num_nodes"] = self.nodes
        path = self.folder / "run_config.toml"
        # json.dumps writes a valid TOML basic string (quotes, backslashes and control characters escaped).
        path.write_text(f"out = {json.dumps(str(self.out))}\n{CONFIG_JSON} = {json.dumps(json.dumps(tables))}\n")
        return path

    def run(self, app: Path, on_round: Callable[[dict[str, Any]], None] | None = None) -> str:
        """``flwr run`` the app; the run's id once it completed, with every metrics line passed to ``on_round``."""
        proc = self.processes.start("flwr-run", [str(bin_dir() / "flwr"), "run", str(app), CONNECTION,
                                                 "--run-config", str(self.run_config()), "--stream"])
        metrics, seen = self.out / "metrics.jsonl", 0
        while proc.poll() is None:
            seen = self._report(metrics, seen, on_round)
            time.sleep(0.5)
        self._report(metrics, seen, on_round)
        match = re.search(r"Successfully started run (\d+)", self.processes.log("flwr-run"))
        if proc.returncode != 0 or match is None:
            raise DeployError(f"`flwr run` failed: {self.processes.exited('flwr-run', proc)}")
        run_id = match.group(1)
        # `flwr run --stream` exits 0 when the ServerApp raised: the run's status says how it ended.
        (status,) = self.flwr("list", CONNECTION, "--run-id", run_id)["runs"]
        if status["status"] != COMPLETED:
            error = next((line.strip() for line in reversed(self.processes.log("flwr-run").splitlines())
                          if "Error" in line or "error" in line), status.get("status-details") or "")
            raise DeployError(f"run {run_id} ended {status['status']}: {error} (log: {self.processes.logs}/flwr-run.log)")
        return run_id

    @staticmethod
    def _report(metrics: Path, seen: int, on_round) -> int:
        if not metrics.is_file():
            return seen
        lines = metrics.read_text().splitlines()
        complete = [line for line in lines[seen:] if line.endswith("}")]
        for line in complete:
            if on_round is not None:
                on_round(json.loads(line))
        return seen + len(complete)

    def unregistered_supernode(self, timeout: float = 90.0) -> str:
        """Start a SuperNode whose key was never registered; the line with which the SuperLink refused it.

        Raises :class:`DeployError` if it was let in (it is still running after ``timeout`` s, or it ended
        another way).
        """
        key, _ = make_supernode_keys(self.folder / "pki" / "strangers", f"stranger-{free_port()}")
        name = key.name
        proc = self.processes.start(name, self.supernode_command(free_port(), key, 0))
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.processes.stop(proc)
            raise DeployError(f"a SuperNode with an unregistered key was still running after {timeout:.0f} s") from None
        refusal = next((line.strip() for line in self.processes.log(name).splitlines() if "Failed to activate" in line
                        or "authentication is enabled" in line), None)
        if proc.returncode == 0 or refusal is None:
            raise DeployError(f"the unregistered SuperNode was not refused: {self.processes.exited(name, proc)}")
        return refusal

    def stop(self) -> None:
        self.processes.stop_all()


def nodes_problem(cfg: Config, nodes: int) -> str | None:
    """Why ``nodes`` SuperNodes cannot run ``cfg`` (None when they can)."""
    if not 1 <= nodes <= cfg.federation.num_clients:
        return f"--nodes {nodes}: give 1..{cfg.federation.num_clients} (federation.num_clients) SuperNodes"
    return None


def deploy(cfg: Config, out: Path, nodes: int, insecure: bool = False,
           on_round: Callable[[dict[str, Any]], None] | None = None,
           on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``cfg`` on a loopback deployment of ``nodes`` SuperNodes; returns the run's summary (``<out>/summary.json``).

    ``on_step`` hears each start-up step; ``on_round`` each metrics line as it lands.
    Raises :class:`~fedpeft.errors.DeployError` with one line when a step fails.
    """
    problem = nodes_problem(cfg, nodes)
    if problem:
        raise DeployError(problem)
    deployment = Deployment(cfg, out, nodes, insecure)
    step = on_step or (lambda _: None)
    t0 = time.time()
    try:
        step("staging the app")
        app = deployment.stage_app()
        step("starting the SuperLink" + ("" if insecure else " (TLS, SuperNode authentication)"))
        deployment.start_superlink()
        step(f"starting {nodes} SuperNodes" + ("" if insecure else " (keys registered)"))
        deployment.start_supernodes()
        deployment.timings["startup_s"] = round(time.time() - t0, 3)
        step("flwr run")
        deployment.run(app, on_round)
    except (RuntimeError, TimeoutError) as exc:
        raise DeployError(f"{exc} (logs: {deployment.processes.logs})") from None
    finally:
        deployment.stop()
    summary = json.loads((deployment.out / "summary.json").read_text())
    (deployment.folder / "timings.json").write_text(json.dumps(
        {**deployment.timings, "total_s": round(time.time() - t0, 3), "run_wall_s": summary["wall_s"]}, indent=1))
    return summary
