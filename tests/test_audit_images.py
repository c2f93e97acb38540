"""Image attacks through `fedpeft audit`'s runner: digits victims, a table per attack, the image grid.

Small and fast (a few victims, few iterations), yet DLG must beat the prior
image on digits at batch 1, and DP-SGD with heavy noise must bring it down.
"""

from __future__ import annotations

import pytest
import torch

from fedpeft.audit.report import IMAGE_GRID, write_report
from fedpeft.audit.runner import run_audit
from fedpeft.audit.attacks import build_attacks
from fedpeft.validation import load_config
from fedpeft.errors import ConfigError

FAST = ["audit.empirical=false", "audit.victims=6", "audit.inverting-gradients={iterations=30}"]  # DLG at its default 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def audit(overrides: list[str]) -> dict:
    cfg = load_config(None, FAST + overrides)
    return run_audit(cfg)


@pytest.fixture(scope="module")
def result(one_torch_thread) -> dict:
    # Two restarts: with one, a single unlucky start of six victims pulls the bootstrap interval to the prior.
    return audit(["audit.attacks=['dlg','inverting-gradients']", "audit.dlg={restarts=2}"])


def test_image_only_audit_writes_the_grid_and_a_table_per_attack(result, tmp_path):
    assert result["experiments"] == []  # no text attack: the text model is never loaded
    write_report(result, tmp_path)
    grid = tmp_path / IMAGE_GRID
    assert grid.is_file() and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(grid).shape[:2]
    assert width > 2 * height  # six columns (victim images), three rows (originals, dlg, inverting-gradients)
    md = (tmp_path / "audit.md").read_text()
    assert "## Images" in md and f"]({IMAGE_GRID})" in md
    for attack in ("dlg", "inverting-gradients"):
        assert f"**{attack}**" in md
    assert "| PSNR (dB) |" in md and "| SSIM |" in md and "| label accuracy |" in md
    rows = result["images"]["grid"]
    assert list(rows) == ["originals", "dlg", "inverting-gradients"]
    assert all(len(v) == 6 for v in rows.values())


def test_dlg_beats_the_prior_image_on_digits_batch_1(result):
    table = result["images"]["attacks"]["dlg"]["metrics"]
    psnr, ssim = table["PSNR (dB)"], table["SSIM"]
    assert psnr["attack"]["lo"] > psnr["baseline"]["hi"] + 5.0
    assert ssim["attack"]["lo"] > ssim["baseline"]["hi"]
    assert table["label accuracy"]["attack"]["mean"] == 1.0


def test_strong_dp_sgd_brings_dlg_to_the_prior():
    noisy = audit(["audit.attacks=['dlg']", "dp.mode=sample", "dp.noise_multiplier=10.0", "dp.target_epsilon=0",
                   "dp.max_grad_norm=0.1"])
    img = noisy["images"]
    assert img["dp"] is not None and img["dp"]["noise_multiplier"] == 10.0
    psnr = img["attacks"]["dlg"]["metrics"]["PSNR (dB)"]
    assert psnr["attack"]["mean"] <= psnr["baseline"]["hi"]


def test_bad_image_attack_parameter_is_a_config_error_before_anything_runs():
    cfg = load_config(None, ["audit.attacks=['dlg']", "audit.dlg={restarts=-1}"])
    with pytest.raises(ConfigError, match=r"audit\.dlg\.restarts = -1"):
        build_attacks(cfg.audit)


def test_more_image_victims_than_private_digits_fails_before_any_experiment():
    cfg = load_config(None, ["audit.attacks=['lora-span','dlg']", "audit.victims=200", "audit.batch_size=2"])
    with pytest.raises(ConfigError, match=r"400 images; .* 359 private images"):
        run_audit(cfg)
