"""Exceptions for bad user input and wrong state. Messages name the problem and the fix."""


class ActsparseError(Exception):
    """Base class for errors caused by user input, environment or call order."""


class ModelNotFoundError(ActsparseError):
    """A model name, directory or file that cannot be loaded."""


class DataError(ActsparseError):
    """Text, windows or statistics that cannot serve the request."""


class ConfigError(ActsparseError):
    """A configuration value (method config, option, plan entry) that is invalid."""


class SiteError(ConfigError, KeyError):
    """A site spec (role, module path, group, io) that does not resolve on the model. Also a
    ``KeyError`` (a lookup that failed), but printed as its message, not as a quoted key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateError(ActsparseError):
    """A call that does not fit the object's current state (already sparsified, KV cache
    full, not sparsified yet, ...)."""


class UnsupportedError(ActsparseError):
    """A model, architecture feature or format that this part of actsparse does not handle."""
