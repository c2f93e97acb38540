"""`fedpeft audit` on user mistakes: exit code 2, one line naming the key, nothing written.

Every other audit.* message is checked in-process in test_audit_metrics.py.
"""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("audit.victims=0", "audit.victims must be an integer >= 1"),
        ("audit.attacks=['nope']", "audit.attacks: 'nope' is not an attack; choose from:"),
        ("audit.dlg={iterations=-1}", "audit.dlg.iterations = -1 must be a non-negative number"),
    ],
)
def test_bad_audit_key_is_one_line_and_writes_nothing(tmp_path, override, message, fedpeft_cli, assert_user_error):
    out = tmp_path / "audit"
    proc = fedpeft_cli("audit", "--set", override, "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, message)
    assert not out.exists()
