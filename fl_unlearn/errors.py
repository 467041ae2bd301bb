"""One error hierarchy for fl_unlearn.

Every error says what was wrong, with the value, and what to do. Errors that are about a bad
argument subclass ``ValueError`` too, so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class UnlearnError(Exception):
    """Base of all fl_unlearn errors."""


class RequestError(UnlearnError, ValueError):
    """A malformed or unserviceable unlearning request: unknown class or client, empty forget set."""


class FisherError(UnlearnError, ValueError):
    """A Fisher diagonal with a wrong name, shape or dtype, NaN/inf or negative entries."""


class LineageError(UnlearnError, ValueError):
    """An invalid lineage operation: unknown parent, duplicate node, an edge that would make a cycle."""


class StoreError(UnlearnError):
    """A missing, corrupt or unreadable object in the store."""


class DataSourceError(UnlearnError):
    """A dataset source that cannot be reached or read; the message names the offline alternatives."""


class ConfigError(UnlearnError, ValueError):
    """An invalid configuration value (unknown model, partitioner, estimator, ...)."""


class RecordError(UnlearnError, ValueError):
    """A malformed message record from the network: undecodable array, wrong type or value in a config."""
