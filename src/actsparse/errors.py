"""Exceptions for bad user input. Messages name the problem and the fix."""


class ActsparseError(Exception):
    """Base class for errors caused by user input or environment."""


class ModelNotFoundError(ActsparseError):
    pass


class DataError(ActsparseError):
    pass


class ConfigError(ActsparseError):
    pass
