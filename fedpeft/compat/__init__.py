"""Adapters over the private internals of pinned upstream libraries.

fedpeft relies on a few underscore names of opacus and Flower. Each is used
in exactly one module here, behind a fedpeft function or class, and
``tests/test_compat.py`` checks that the pinned behaviour still holds, so an
upgrade that changes it fails loudly instead of silently changing a privacy
number.
"""
