"""A user's own attack by ``audit.attacks = ["module:Class"]``, and ``fedpeft attacks``.

The user attack lives in a module the test writes; it runs through the real
`fedpeft audit` command on real MiniLM victims and its declared metric lands
in audit.json beside its baseline. Mistakes (a class that is not an Attack,
a missing module, an attack that declares no metrics) are one line and exit 2.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpeft.audit.attacks import Attack, AttackResult, available_attacks, get_attack
from fedpeft.audit.runner import declared_scores
from fedpeft.audit.scoring import LABEL_METRICS, Metric
from fedpeft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def readme_attack() -> str:
    """The example attack of the README's "Your own attack" section, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("#### Your own attack"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]


# The README's example, plus two classes the audit must refuse.
USER_MODULE = readme_attack() + textwrap.dedent('''


    class NotAnAttack:
        pass


    class Silent(Attack):
        """Declares no metrics."""

        def run(self, obs, prior=None):
            return AttackResult(self.name, {})
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "my_attack"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_attack_runs_through_fedpeft_audit_and_reports_its_metric(tmp_path, user_module):
    from fedpeft.cli import app

    out = tmp_path / "audit"
    entry = f"{user_module}:BiasArgmin"
    args = ["audit", "--out", str(out)]
    for override in (f"audit.attacks=['{entry}', 'label-recovery']", "audit.victims=3", "audit.studies=false",
                     "audit.empirical=false", "audit.prior_examples=50"):
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "audit.json").read_text())
    main = report["experiments"][0]
    label = main["attacks"][entry]["metrics"]["label accuracy"]
    # At batch 1 only the true class has a negative bias gradient: the argmin is exact.
    assert label["attack"]["mean"] == 1.0 and label["attack"]["n"] == 3
    assert label["baseline"]["n"] == 3  # the prior-only baseline sits beside it
    assert main["attacks"]["label-recovery"]["metrics"]["label accuracy"]["attack"]["mean"] == 1.0
    assert f"**{entry}**" in (out / "audit.md").read_text()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("my_attack:NotAnAttack", "audit.attacks 'my_attack:NotAnAttack': 'NotAnAttack' is not a "
                                        "fedpeft.audit.attacks.Attack subclass"),
        ("no_such_module_xyz:Attack", "audit.attacks 'no_such_module_xyz:Attack': cannot import module 'no_such_module_xyz'"),
        ("my_attack:Missing", "module 'my_attack' has no attribute 'Missing'"),
        ("my_attack:Silent", "declares no metrics"),
    ],
)
def test_bad_user_attack_is_one_line_and_exit_2(tmp_path, user_module, entry, message, fedpeft_cli_in_process,
                                               assert_user_error):
    out = tmp_path / "audit"
    proc = fedpeft_cli_in_process("audit", "--set", f"audit.attacks=['{entry}']", "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, message)
    assert not out.exists()


def test_fedpeft_attacks_lists_every_builtin_with_what_it_recovers(tmp_path, fedpeft_cli):
    proc = fedpeft_cli("attacks", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    builtin = {n for n in available_attacks() if get_attack(n).__module__.startswith("fedpeft.audit.attacks.")}
    assert set(lines) == builtin and len(builtin) == 6
    for name, line in lines.items():
        cls = get_attack(name)
        assert cls.recovers and f"{cls.recovers} from {cls.observes}" in line, line


def test_every_builtin_declares_metrics_with_units_and_baselines():
    for name in available_attacks():
        cls = get_attack(name)
        assert cls.metrics, name
        assert all(m.unit and m.baseline for m in cls.metrics), name
        assert not cls.study_metric or cls.metric(cls.study_metric) is not None, name


def test_scores_outside_the_declared_metrics_fail_loudly():
    class Declared(Attack):
        name = "declared"
        metrics = LABEL_METRICS + (Metric("cosine {layer} input", "cosine", "mean input"),)

        def run(self, obs, prior=None):
            return AttackResult(self.name, {})

    ok = declared_scores(Declared(), {"label accuracy": (1, 0.5), "cosine classifier input": (0.9, 0.1)})
    assert ok == {"label accuracy": (1.0, 0.5), "cosine classifier input": (0.9, 0.1)}
    with pytest.raises(TypeError, match="'token recall', which it does not declare"):
        declared_scores(Declared(), {"token recall": (1.0, 0.0)})


def test_user_attack_loaded_by_path_is_checked_like_a_strategy(user_module):
    cls = get_attack(f"{user_module}:BiasArgmin")
    assert issubclass(cls, Attack) and cls.name == f"{user_module}:BiasArgmin"
    with pytest.raises(ConfigError, match="expected 'package.module:ClassName'"):
        get_attack(":BiasArgmin")
