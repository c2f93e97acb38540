"""`fedpeft deploy`: Flower's Deployment Engine on loopback, with TLS and SuperNode authentication.

The runs start real processes (a SuperLink, SuperNodes, `flwr run`, and the
ClientApp process Flower starts per message): minutes on the 2-core CPU,
so they are slow; the TLS run and the refusal also run in CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedpeft.deploy import Deployment
from fedpeft.deploy.pki import make_supernode_keys, make_test_certificates
from fedpeft.server.run_folder import RunFolder
from fedpeft.validation import load_config
from tests.conftest import TEST_ENV

TINY = ['model.name="tiny-bert"', "model.max_length=16", "train.local_steps=1", "train.batch_size=8",
        "data.max_examples_per_client=16", "data.max_test_examples=16", "federation.num_clients=2",
        "federation.num_rounds=1"]


def flwr_processes(home: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FLWR_HOME") == str(home) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_the_test_pki_is_a_ca_a_loopback_server_certificate_and_openssh_ec_keys(tmp_path):
    paths = make_test_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert oct(paths["server_key"].stat().st_mode & 0o777) == "0o600"
    private, public = make_supernode_keys(tmp_path, "node")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert load_ssh_private_key(private.read_bytes(), None).curve.name == "secp384r1"


@pytest.mark.parametrize("args,named", [(["--nodes", "0"], ["--nodes 0", "1..2"]), (["--nodes", "3"], ["--nodes 3"])])
def test_a_node_count_that_cannot_work_is_one_line(tmp_path, args, named, fedpeft_cli_in_process, assert_user_error):
    proc = fedpeft_cli_in_process("deploy", "--out", str(tmp_path / "run"), *args,
                                  *[a for o in TINY for a in ("--set", o)], cwd=tmp_path)
    assert_user_error(proc, *named)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.deploy").exists()


@pytest.mark.slow
@pytest.mark.ci
def test_a_tls_deployment_with_authenticated_supernodes_writes_the_run_folder(tmp_path, fedpeft_cli_in_process):
    out = tmp_path / "run"
    proc = fedpeft_cli_in_process("deploy", "--nodes", "2", "--out", str(out),
                                  *[a for o in TINY for a in ("--set", o)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = RunFolder(out).read_metrics()
    assert [m["round"] for m in metrics] == [0, 1]
    assert metrics[1]["clients"] == [0, 1] and metrics[1]["failed"] == [] and metrics[1]["bytes_up"] > 0
    assert all((out / f).is_file() for f in ("summary.json", "report.md", "adapter/adapter_model.safetensors"))
    logs = out.with_name("run.deploy") / "logs"
    assert "Uvicorn running on https://127.0.0.1" in (logs / "superlink.log").read_text()  # TLS
    assert sorted(p.name for p in (out.with_name("run.deploy") / "pki/supernodes").iterdir()) == [
        "supernode-0", "supernode-0.pub", "supernode-1", "supernode-1.pub"]  # each node its own registered key
    assert flwr_processes(out.with_name("run.deploy") / "flwr-home") == []  # everything it started is gone


@pytest.mark.slow
@pytest.mark.ci
def test_a_supernode_whose_key_is_not_registered_is_refused(tmp_path):
    deployment = Deployment(load_config(None, TINY), tmp_path / "run", nodes=1)
    try:
        deployment.start_superlink()
        deployment.start_supernodes()
        refusal = deployment.unregistered_supernode()
        assert "Failed to activate SuperNode" in refusal, refusal
        assert "No SuperNode found with the given public key" in deployment.processes.log("superlink")
        nodes = deployment.flwr("supernode", "list", "fedpeft-deploy")["nodes"]
        assert [n["status"] for n in nodes] == ["online"]  # the registered node is still in
    finally:
        deployment.stop()
    assert flwr_processes(deployment.home) == []


@pytest.mark.slow
def test_an_insecure_deployment_runs_and_a_failed_run_is_one_line(tmp_path, fedpeft_cli_in_process, assert_user_error):
    """Without TLS or authentication; the ServerApp's own failure (too few clients answer) reaches the user as a line,
    though `flwr run` itself exits 0."""
    out = tmp_path / "run"
    proc = fedpeft_cli_in_process("deploy", "--insecure", "--nodes", "2", "--out", str(out),
                                  *[a for o in TINY for a in ("--set", o)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Uvicorn running on http://127.0.0.1" in (tmp_path / "run.deploy/logs/superlink.log").read_text()
    failing = [*TINY, "federation.failure_rate=0.9", "federation.min_clients=2", "federation.round_retries=0"]
    proc = fedpeft_cli_in_process("deploy", "--insecure", "--nodes", "2", "--out", str(tmp_path / "failing"),
                                  *[a for o in failing for a in ("--set", o)], cwd=tmp_path)
    assert_user_error(proc, "ended finished:failed")
    assert flwr_processes(tmp_path / "failing.deploy" / "flwr-home") == []


@pytest.mark.slow
def test_ctrl_c_stops_every_process_the_deployment_started(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "deploy", "--nodes", "2", "--out", str(out),
                             *[a for o in TINY for a in ("--set", o)]], cwd=tmp_path,
                            env={**os.environ, **TEST_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    home = tmp_path / "run.deploy" / "flwr-home"
    deadline = time.time() + 300
    while len(flwr_processes(home)) < 3:  # the SuperLink and its helpers are up, SuperNodes on the way
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr.read().decode()
    assert flwr_processes(home) == []
