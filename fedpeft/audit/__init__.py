"""Privacy audit: what an honest-but-curious server can rebuild from one client's payload.

One module per job:

- :mod:`~fedpeft.audit.attacks`: the attacks, one file each, their registry and their contract
  (:class:`~fedpeft.audit.attacks.base.Attack` declares its metrics and scores itself);
- :mod:`~fedpeft.audit.design`: the experiments (main, positive control, studies) and the victims' sentences;
- :mod:`~fedpeft.audit.observe`: one victim's round, split into the server's view and the truth;
- :mod:`~fedpeft.audit.priors`: the server's public prior and its prior-only baselines;
- :mod:`~fedpeft.audit.scoring` and :mod:`~fedpeft.audit.metrics`: metrics, shared scorers, bootstrap intervals;
- :mod:`~fedpeft.audit.runner`: orchestration (:func:`~fedpeft.audit.runner.run_audit`);
- :mod:`~fedpeft.audit.image_audit` and :mod:`~fedpeft.audit.vision`: the image experiment;
- :mod:`~fedpeft.audit.dp`, :mod:`~fedpeft.audit.empirical`, :mod:`~fedpeft.audit.client_path`: DP victims
  and the canary audit;
- :mod:`~fedpeft.audit.report` and :mod:`~fedpeft.audit.sweep`: ``audit.json``/``audit.md`` and audit sweeps.

The settings are the ``[audit]`` section of the config (:class:`fedpeft.config.AuditConfig`).

The package is also the function ``fedpeft.audit(config, overrides=..., out=...)``
(:func:`fedpeft.audit.entry.audit`): a package and a function cannot share the name
``fedpeft.audit`` otherwise, since importing any ``fedpeft.audit.*`` module
rebinds that attribute to the package.
"""

import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        from fedpeft.audit.entry import audit

        return audit(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
