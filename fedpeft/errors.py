"""Exceptions that mean "the user asked for something invalid".

The CLI turns each of these into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class FedPeftError(Exception):
    """Base class for user-facing errors (bad config, missing asset, ...)."""


class ConfigError(FedPeftError):
    """A config key is unknown, mistyped or out of range."""


class CheckpointError(FedPeftError):
    """A run folder's checkpoint is missing, corrupt, or from another config or code version."""


class AssetError(FedPeftError):
    """A model or dataset package is missing or broken."""


class FederationError(FedPeftError):
    """The federation cannot go on as configured (too few clients answer a round, whatever it retries)."""


class DeployError(FedPeftError):
    """A loopback deployment could not start or its run failed (the logs say more)."""
