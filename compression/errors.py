"""The one family of errors a user can cause, and the base every one derives from.

A leaf: it imports nothing (not torch, not the rest of the package), so the data
pipeline, the config checks and the entry points can all raise and catch these without
loading a model. An entry point catches ``EmbcompError`` alone and prints its message
in one line (the message names the file, row, id or key); anything else is a bug and
keeps its traceback. Each class also derives from the builtin error it refines
(``ValueError``, ``IndexError``, ``KeyError``), so code that caught those still does.

Example::

    from compression.errors import EmbcompError

    try:
        compress(tables, HashingConfig(budget=Budget(ratio=1e9)))
    except EmbcompError as e:        # a BudgetError here
        sys.exit(f"error: {e}")

Errors of the other packages join the family where they live: ``recsys.data.DataError``,
``recsys.training.distributed.DistributedError``, ``experiments.seeds.SeedsError``,
``experiments.tracking.TrackingError``, ``experiments.job.CheckpointMismatch``,
``experiments.advise.AdviseError``, ``compression.preflight.MemoryPreflightError``.
"""

from __future__ import annotations


class EmbcompError(Exception):
    """Base of every error a user's input, config or environment can cause."""


class ConfigError(EmbcompError, ValueError):
    """A config value outside what its field accepts (the message names the key)."""


class MethodConfigError(ConfigError):
    """A method's config that cannot work (with these tables): the message says why."""


class BudgetError(EmbcompError, ValueError):
    """A budget that is malformed or that a method cannot reach."""


class IdOutOfRangeError(EmbcompError, IndexError):
    """An id outside the table its feature is declared to use."""


class UnknownMethodError(EmbcompError, KeyError):
    """A method name or config type the registry does not hold."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])
