"""`fedpeft audit` on user mistakes: exit code 2, one line naming the key, nothing written.

Every other audit.* message is checked in-process in test_audit_metrics.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(sys.executable).with_name("fedpeft")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fedpeft.cli"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("audit.victims=0", "audit.victims must be an integer >= 1"),
        ("audit.attacks=['nope']", "audit.attacks: 'nope' is not an attack; choose from:"),
        ("audit.dlg={iterations=-1}", "audit.dlg.iterations = -1 must be a non-negative number"),
    ],
)
def test_bad_audit_key_is_one_line_and_writes_nothing(tmp_path, override, message):
    out = tmp_path / "audit"
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*COMMAND, "audit", "--set", override, "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
