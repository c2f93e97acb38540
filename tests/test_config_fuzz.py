"""Random invalid configs and command lines (hypothesis): each is exit code 2 and one line, never a traceback,
never a half-written run folder, whichever command reads them."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.config import Config

# The dataclass sections (strategy is the rule's own table; audit also takes attack tables, so an unknown
# audit key may be a table and is covered by its own tests).
SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name not in ("strategy", "audit")}
FIELDS = [(section, f) for section, factory in SECTIONS.items() for f in dataclasses.fields(factory())]
COMMANDS = (["run"], ["audit"], ["deploy", "--nodes", "2"])
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)


def toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


@st.composite
def bad_override(draw) -> list[str]:
    """One ``--set`` that no valid config has (and, sometimes, valid ones around it)."""
    kind = draw(st.sampled_from(["unknown-key", "unknown-section", "below-min", "above-max", "not-a-choice",
                                 "wrong-type", "malformed"]))
    section, f = draw(st.sampled_from(FIELDS))
    meta, tp = f.metadata, f.type if isinstance(f.type, type) else eval(f.type)  # noqa: S307 (our own annotations)
    bad = None
    if kind == "unknown-key":
        bad = f"{section}.zz{draw(names)}={draw(st.integers(-5, 5))}"
    elif kind == "unknown-section":
        bad = f"zz{draw(names)}.{f.name}=1"
    elif kind == "below-min" and meta.get("min") is not None and tp in (int, float):
        step = draw(st.integers(1, 1000)) if tp is int else draw(st.floats(1e-3, 1e6))
        bad = f"{section}.{f.name}={toml(tp(meta['min'] - step))}"
    elif kind == "above-max" and meta.get("max") is not None and tp in (int, float):
        step = draw(st.integers(1, 1000)) if tp is int else draw(st.floats(1e-3, 1e6))
        bad = f"{section}.{f.name}={toml(tp(meta['max'] + step))}"
    elif kind == "not-a-choice" and meta.get("choices"):
        word = draw(names)
        if word not in meta["choices"]:
            bad = f"{section}.{f.name}={toml(word)}"
    elif kind == "wrong-type" and tp in (int, float, bool, list):
        bad = f"{section}.{f.name}={toml('x' + draw(names))}"
    elif kind == "malformed":
        bad = draw(st.sampled_from([f"{section}.{f.name}", f"{section}={draw(names)}", f"={draw(names)}",
                                    f".{f.name}=1"]))
    if bad is None:  # the field has no such limit: an unknown key instead
        bad = f"{section}.zz{draw(names)}=1"
    good = draw(st.lists(st.sampled_from(["train.lr=0.01", "federation.num_rounds=2", "peft.r=4", "model.dropout=0.0"]),
                         max_size=2))
    at = draw(st.integers(0, len(good)))
    return [*good[:at], bad, *good[at:]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=bad_override(), command=st.sampled_from(COMMANDS))
def test_a_random_invalid_config_is_one_line_and_writes_nothing(tmp_path, overrides, command, fedpeft_cli_in_process,
                                                                assert_user_error):
    out = tmp_path / f"out-{abs(hash((tuple(overrides), tuple(command))))}"
    proc = fedpeft_cli_in_process(*command, "--out", str(out), *[a for o in overrides for a in ("--set", o)],
                                  cwd=tmp_path)
    assert_user_error(proc)
    assert not out.exists() and not out.with_name(out.name + ".deploy").exists()


@pytest.mark.parametrize("args", [
    ["run", "--resume"], ["run", "--nodes", "2"], ["deploy", "--nodes", "two"], ["sweep"], ["run", "--config"],
    ["audit", "--sweep", "missing.toml"], ["run", "--config", "missing.toml"], ["bench", "--name", "nope"],
])
def test_bad_command_lines_are_one_line(tmp_path, args, fedpeft_cli_in_process, assert_user_error):
    assert_user_error(fedpeft_cli_in_process(*args, cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []
