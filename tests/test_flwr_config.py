"""`flwr run .` reads pyproject's [tool.flwr.app.config]: it must stay the default config."""

import tomllib
from pathlib import Path

from fedpeft.config import DEFAULT_CONFIG
from fedpeft.validation import config_from_run_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def flatten(tables: dict) -> dict:
    return {f"{s}.{k}": v for s, t in tables.items() if isinstance(t, dict) for k, v in t.items()}


def test_pyproject_run_config_mirrors_the_default_config():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr = pyproject["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "fedpeft.server.app:app", "clientapp": "fedpeft.client.app:app"}
    run_config = flatten(flwr["config"])
    default = tomllib.loads(DEFAULT_CONFIG.read_text())
    scalars = {k: v for k, v in flatten(default).items() if not isinstance(v, list)}
    assert run_config == scalars
    assert config_from_run_config({**run_config, "out": ""}) == load_config()
