"""Privacy audit: what an honest-but-curious server can rebuild from one client's payload.

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
