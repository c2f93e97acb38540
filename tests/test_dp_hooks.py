"""One opacus hook clean-up for training and the audit: no hook or per-sample state outlives a DP step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.audit.dp import dp_image_upload
from fedpeft.privacy.dp_sgd import DPSGD, dp_optimizer, per_sample_hooks, private_steps

STATE = ("grad_sample", "summed_grad")


def tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))


def left_behind(model: torch.nn.Module) -> list[str]:
    """Per-sample state on the parameters after one more ordinary backward pass (a live hook would add it)."""
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 3, 2, 2)).sum().backward()
    return [f"{n}.{a}" for n, p in model.named_parameters() for a in STATE if getattr(p, a, None) is not None]


def test_per_sample_hooks_leave_nothing_after_a_dp_step():
    model = tiny_classifier()
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    with per_sample_hooks(model) as gsm:
        opt = dp_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), DPSGD(1.0, 1.0, 1.0), 6.0,
                           torch.Generator().manual_seed(0))
        losses = list(private_steps(opt, [np.arange(6)], lambda idx: torch.nn.functional.cross_entropy(gsm(x[idx]), y[idx])))
        assert losses[0] is not None
        assert all(p.grad_sample is not None for p in model.parameters()), "the hooks did not record"
    assert left_behind(model) == []


def test_per_sample_hooks_are_removed_when_the_step_fails():
    model = tiny_classifier()
    with pytest.raises(RuntimeError, match="boom"):
        with per_sample_hooks(model) as gsm:
            gsm(torch.randn(2, 3, 2, 2)).sum().backward()
            raise RuntimeError("boom")
    assert left_behind(model) == []


def test_the_audit_image_victim_cleans_up_with_the_same_helper():
    model = tiny_classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    upload = dp_image_upload(DPSGD(1.0, 1.0, 1.0))
    grads = upload(model, torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1]), local_steps=2, lr=0.1, seed=0)
    assert len(grads) == 2 and all(torch.isfinite(g).all() for g in grads.values())
    for n, p in model.named_parameters():  # the server's copy is back at the global state
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
    assert left_behind(model) == []
