"""A composed job config that cannot be right is refused before any data is read.

Hydra's structured configs catch a wrong type and an unknown key given without ``+``;
``check_job`` adds what they cannot: a key added with ``+`` that no schema has (a typo
like ``+trainer.epoch=3`` would otherwise be logged and ignored), a value outside the
range its field declares (``compression.config_checks``: positive sizes and epochs,
probabilities in [0, 1), budgets > 0 and no larger than the tables), the job-level
budget string and the seeds. ``experiments.run`` calls it first thing in every job.

Example::

    check_job(cfg)   # ConfigError: trainer.batch_size: must be >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from compression.config_checks import ConfigError, check_fields
from experiments.seeds import resolve_seeds


def unknown_keys(node: Any, prefix: str = "") -> None:
    """Raise ``ConfigError`` for a key of ``node`` its structured schema does not have."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        key = str(key)
        path = f"{prefix}.{key}" if prefix else key
        if fields is not None and key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"{path}: no such key in {getattr(schema, '__name__', 'the schema')}{hint}")
        if fields is not None:
            child = node._get_node(key)
            if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
                unknown_keys(child, path)


def _to_object(cfg: DictConfig, node: str) -> Any:
    """The node as its dataclass. A method's config checks itself when made and names its
    keys as the library does (``optembed.alpha``); here they are named as the override a
    user types (``compression.alpha``)."""
    try:
        return OmegaConf.to_object(cfg[node])
    except ConfigError as e:
        method = getattr(OmegaConf.get_type(cfg[node]), "method", "")
        if node != "compression" or not method:
            raise
        raise type(e)(str(e).replace(f"{method}.", "compression.") + f" ({method})") from None


def check_job(cfg: DictConfig) -> None:
    """Every check that needs no data: keys, field ranges, the budget string, seeds."""
    from experiments.identity import parse_budget

    unknown_keys(cfg)
    for node in ("dataset", "model", "compression", "trainer", "mlflow", "distributed"):
        check_fields(_to_object(cfg, node), node)
    resolve_seeds(cfg.get("seeds"), int(cfg.seed))
    if cfg.get("budget") is not None:
        budget = parse_budget(cfg.budget, cfg.get("budget_scope", "model"))
        check_fields(budget, "budget")
