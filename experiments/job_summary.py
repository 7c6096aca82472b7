"""What a finished job returns, typed: ``JobSummary`` (``summary.json`` is its ``to_json()``).

A single run carries its details (the tensors' bytes, the sizes chosen, each stage's
figures, the epochs' history, the config, the dataset); a seed group carries its seeds and
each seed's metrics, its ``metrics`` being their aggregate.

Example::

    summary = run_job(cfg, out)
    summary.metrics["test_auc"], summary.per_seed      # per_seed: None for a single run
    JobSummary.from_json(json.loads((out / "summary.json").read_text()))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

_FIELDS = ("run_id", "run_name", "experiment", "parent_run_id", "tags", "metrics", "seeds", "per_seed")


@dataclass
class JobSummary:
    run_id: Optional[str]  # (None: the run is not in the store)
    run_name: str
    experiment: str
    parent_run_id: Optional[str]
    tags: dict[str, str]
    metrics: dict[str, float]
    seeds: Optional[list[int]] = None  # a seed group's seeds
    per_seed: Optional[dict[str, dict[str, float]]] = None  # a seed group: each seed's metrics
    details: dict[str, Any] = field(default_factory=dict)  # a single run's: memory_by_tensor, chosen, stages ...

    def to_json(self) -> dict[str, Any]:
        """The summary.json form: the fields (a group's seeds and per_seed only where set) and
        the details beside them, flat."""
        out = {k: getattr(self, k) for k in _FIELDS if k not in ("seeds", "per_seed") or getattr(self, k) is not None}
        return {**out, **self.details}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSummary:
        known = {f.name for f in dataclasses.fields(cls)} - {"details"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   details={k: v for k, v in data.items() if k not in known})  # fmt: skip
