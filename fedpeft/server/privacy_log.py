"""The privacy numbers a run writes: epsilon per round, the summary's ``dp`` block, and DP checkpoint state.

Sample level: each client reports its own accountant's epsilon when it
trains; the run's epsilon is the largest. Client level: the server's own
mechanism, accounted from the plan after each round.
"""

from __future__ import annotations

from typing import Any

from fedpeft.privacy.plan import DPPlan
from fedpeft.privacy.secret import OS_SECRET


def round_privacy(plan: DPPlan | None, flower, log_, server_round: int) -> dict[str, Any]:
    """The privacy fields of one ``metrics.jsonl`` line (round 0 is before any training)."""
    if plan is None:
        return {"epsilon": None}
    if plan.unit == "client":
        return {"epsilon": plan.epsilon_after(-1, server_round)}
    trained = log_.epsilon if log_ else {}
    return {
        "epsilon": max(flower.dp_epsilon.values(), default=0.0),
        "epsilon_of_round_clients": {str(c): e for c, e in sorted(trained.items())},
    }


def run_privacy(plan: DPPlan | None, flower, history: list[dict[str, Any]], secret=None) -> dict[str, Any]:
    """``epsilon``, ``delta`` and the ``dp`` block of ``summary.json``.

    The block's guarantee fields (unit, accountant, delta, noise multiplier,
    sample rate, steps, epsilon, relation) are the plan's
    :class:`~fedpeft.privacy.report.PrivacyReport`; the rest describes the mechanism.
    """
    if plan is None:
        return {"epsilon": None, "delta": None, "dp": None}
    if plan.unit == "client":
        report = plan.report(-1, int(history[-1]["round"]) if history else 0)
        # Every client is protected by the same mechanism: one epsilon each.
        per_client = {c: report.epsilon for c in range(plan.num_clients)}
    else:
        per_client = {c: flower.dp_epsilon.get(c, 0.0) for c in range(plan.num_clients)}
        worst = max(range(plan.num_clients), key=lambda c: (flower.dp_steps.get(c, 0), plan.sample_rates[c]))
        # The run's epsilon is the largest any client's own accountant reported.
        report = plan.report(worst, flower.dp_steps.get(worst, 0), epsilon=max(per_client.values()))
    block: dict[str, Any] = {
        "randomness": (secret or OS_SECRET).describe(),
        **report.to_dict(),
        "max_grad_norm": plan.max_grad_norm,
        "target_epsilon": plan.target_epsilon,
        "planned_epsilon": plan.planned_epsilon(),
        "mechanism": plan.describe(),
        "epsilon_per_client": {str(c): e for c, e in per_client.items()},
    }
    if plan.unit == "client":
        block.update(
            sampling=f"{plan.clients_per_round} of {plan.num_clients} clients per round, without replacement, secret",
            noised_arrays=sorted(flower.private_keys()),
        )
    else:
        block.update(
            steps_per_client={str(c): flower.dp_steps.get(c, 0) for c in range(plan.num_clients)},
            sample_rate_per_client={str(c): q for c, q in plan.sample_rates.items()},
            sampling="Poisson batches, secret",
        )
    return {"epsilon": report.epsilon, "delta": plan.delta, "dp": block}


def dp_checkpoint(flower, wrapper) -> dict[str, Any]:
    """What a resumed run needs to continue the privacy state exactly."""
    out: dict[str, Any] = {
        "steps": {str(c): s for c, s in flower.dp_steps.items()},
        "epsilon": {str(c): e for c, e in flower.dp_epsilon.items()},
    }
    if wrapper is not flower:
        # The adaptive norm is a noised release, safe to keep; the noise stream is secret and is not stored.
        out["wrapper"] = {"clipping_norm": float(wrapper.clipping_norm)}
    return out


def restore_wrapper(wrapper, saved: dict[str, Any] | None) -> None:
    """Put a client-level DP wrapper back where the checkpoint left it (the adaptive norm)."""
    if not saved:
        return
    wrapper.clipping_norm = float(saved["clipping_norm"])
