"""fedpeft: simulate federated parameter-efficient fine-tuning.

    import fedpeft
    summary = fedpeft.run(overrides=["federation.num_rounds=2"], out="runs/short")
    result = fedpeft.audit(overrides=["dp.mode=sample", "dp.target_epsilon=1"], out="runs/audit-dp")
    cfg = fedpeft.load_config("experiments/dp_utility.toml")   # a validated Config

Both return what their folder records (``summary.json``, ``audit.json``).
Importing fedpeft is light: torch, transformers and Flower load when a run starts.
"""

from fedpeft import audit  # the audit package, callable as fedpeft.audit(...): see fedpeft/audit/__init__.py
from fedpeft.api import run
from fedpeft.config import Config
from fedpeft.validation import load_config

__version__ = "0.1.0"

__all__ = ["run", "audit", "load_config", "Config", "__version__"]
