"""The one interface every compressed embedding module implements.

A compressed module is a TorchRec ``EmbeddingBagCollectionInterface``: it takes the
model's ``KeyedJaggedTensor`` and returns a ``KeyedTensor`` with one pooled embedding
per feature, so TorchRec models (``torchrec.models.dlrm.DLRM``) and the sharder
(``DistributedModelParallel``) use it without knowing it is compressed. Inside it is
an id transform in front of real TorchRec tables and a combine step behind them.

``embedding_bag_configs()`` describes what the model sees (one config per source
table, ``embedding_dim`` = that feature's output dim); the physical, smaller tables
live in TorchRec submodules (``EmbeddingBagCollection`` ...), which is what the
sharder shards and what the byte accounting counts.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.errors import IdOutOfRangeError, MethodConfigError
from compression.stages import Stage, schedule

if TYPE_CHECKING:  # the planner's types pull in torchrec.distributed: only for hints
    from torchrec.distributed.planner.types import ParameterConstraints

    from compression.api import CompressionConfig

__all__ = ["CompressedEmbeddingBagCollection", "IdOutOfRangeError", "MethodConfigError", "Stage", "table_named"]


def _tracing() -> bool:
    return torch.jit.is_scripting() or torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()


class CompressedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """Base class of every compressed module (KJT in, KeyedTensor out).

    Args:
        tables: the uncompressed tables this module replaces.
        output_dims: per-table output dim when it differs from the table's own
            ``embedding_dim`` (e.g. multi-probe methods that concatenate chunks).
        validate_ids: refuse ids outside ``[0, num_embeddings)`` with a message naming
            the feature; methods that hash arbitrary ids set this to False.
        config: the config the module is built from (``compress`` passes it as
            ``ctx.config``); its post-training stages end the schedule.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        output_dims: Mapping[str, int] | None = None,
        validate_ids: bool = True,
        config: CompressionConfig | None = None,
    ) -> None:
        super().__init__()
        self.compression_config = config
        if not tables:
            raise ValueError("compress() needs at least one EmbeddingBagConfig")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be unique, got {names}")
        features = [f for t in tables for f in t.feature_names]
        if len(set(features)) != len(features):
            raise ValueError(f"a feature may feed only one table, got {features}")
        output_dims = dict(output_dims or {})
        self._source_tables = [dataclasses.replace(t) for t in tables]
        self._logical_tables = [
            dataclasses.replace(t, embedding_dim=output_dims.get(t.name, t.embedding_dim))
            for t in tables
        ]
        self._feature_names: list[str] = features
        self._feature_rows: dict[str, int] = {
            f: t.num_embeddings for t in tables for f in t.feature_names
        }
        self._validate_ids = validate_ids
        # how compression.sizing.build_sized sized it: "plan" (before training, bytes verified),
        # "search" (a stage searches within the budget) or "own rule" (no budget); None: unbudgeted
        self.sizing: str | None = None

    # -- TorchRec interface -------------------------------------------------------
    @abc.abstractmethod
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor: ...

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._logical_tables

    def is_weighted(self) -> bool:
        return False

    # -- what the rest of embcomp asks of a method ---------------------------------
    def source_tables(self) -> list[EmbeddingBagConfig]:
        """The uncompressed tables this module stands for (what the ratio is against)."""
        return self._source_tables

    def target_bytes(self) -> int | None:
        """The bytes its config's budget allows these tables (None: no budget); what a
        method that sizes itself in a stage (a search, a selection) must fit."""
        budget = getattr(self.compression_config, "budget", None)
        return None if budget is None else budget.target_bytes(self.source_tables())

    @property
    def feature_names(self) -> list[str]:
        return self._feature_names

    def output_dims(self) -> dict[str, int]:
        return {f: t.embedding_dim for t in self._logical_tables for f in t.feature_names}

    def table_parameters(self) -> list[nn.Parameter]:
        """Embedding rows, trained by the sparse (row-wise Adagrad) optimizer.

        Default: the rows (``embedding_bags``) of every TorchRec embedding collection
        inside. Everything else (projections, step sizes, thresholds) is dense.
        """
        seen: dict[int, nn.Parameter] = {}
        for m in self.modules():
            if isinstance(m, EmbeddingBagCollection):
                for p in m.embedding_bags.parameters():
                    seen[id(p)] = p
        return list(seen.values())

    def stages(self) -> list[Stage]:
        """The method's training schedule; most methods train in one standard stage."""
        return [Stage("train")]

    def schedule(self) -> list[Stage]:
        """What the trainer runs: ``stages()``, then ``quantize`` when the config asks.

        Post-training quantization is the same for every method (the TorchRec tables
        inside become quantized TorchRec tables), so no method lists it itself.
        """
        post = self.compression_config.post_training_stages() if self.compression_config is not None else []
        return schedule(self.stages(), post)

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers of the module's own non-table parameters (e.g. OptEmbed's
        thresholds on plain SGD), stepped beside the trainer's; none by default. The
        trainer leaves their parameters out of its dense optimizer."""
        return []

    def regularization(self) -> torch.Tensor | None:
        """Extra loss term added to the task loss during training (None: nothing)."""
        return None

    def training_metrics(self) -> dict[str, float]:
        """Method-specific figures logged at each epoch end (e.g. thresholds); none by default."""
        return {}

    def alternatives(self) -> dict[str, AbstractContextManager[Any]]:
        """Other deployed forms of this trained module that the job evaluates on the test split
        beside its own (one training, several budgets): name -> a context manager that puts
        that form in place for its block and restores this one after. Default: none."""
        return {}

    def figures(self) -> dict[str, Any]:
        """Matplotlib figures (file name -> figure) logged as run artifacts at the end."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Sizes the method chose (rows, collisions, dims ...), logged as MLflow params."""
        return {}

    def sharding_refusal(self) -> str | None:
        """Why TorchRec's DMP cannot shard this module correctly (one line naming the
        method, said before anything is planned), or None: it can."""
        return None

    def sharding_constraints(self) -> dict[str, ParameterConstraints]:
        """How TorchRec's planner may shard this module's physical tables.

        Table name (of an inner TorchRec collection) -> ``ParameterConstraints``
        (allowed sharding types, compute kernels ...). Empty by default: the planner
        chooses among the sharder's types. The sharded training path applies
        these, then the job config's ``distributed.constraints`` over them.

        Example::

            {"shared_all_0": ParameterConstraints(sharding_types=["row_wise"])}
        """
        return {}

    @property
    def validates_ids(self) -> bool:
        """True: ids outside ``[0, num_embeddings)`` are refused naming the feature (the
        method's rows are exact); False: any int64 id is valid (the method hashes it)."""
        return self._validate_ids

    # -- helpers for subclasses ------------------------------------------------------
    def check_ids(self, features: KeyedJaggedTensor) -> None:
        """Raise ``IdOutOfRangeError`` naming the feature if an id is outside its table.

        Every id is compared with its feature's bound at once (a handful of ops a batch, not
        four for each feature); only a batch that fails is looked at feature by feature, for
        the message."""
        if not self._validate_ids or _tracing():
            return
        values = features.values()
        if not values.numel():
            return
        keys = tuple(features.keys())
        cache = self.__dict__.setdefault("_id_bounds", {})
        bounds = cache.get(keys)
        if bounds is None:  # rows of each feature's table (no bound for a feature it has none of)
            bounds = cache[keys] = torch.tensor([self._feature_rows.get(k, 2**63 - 1) for k in keys])
        lengths = torch.tensor(features.length_per_key())
        per_value = torch.repeat_interleave(bounds, lengths, output_size=values.numel())
        if bool(((values < 0) | (values >= per_value)).any()):
            self._name_bad_id(features)

    def _name_bad_id(self, features: KeyedJaggedTensor) -> None:
        values, start = features.values(), 0
        for key, n in zip(features.keys(), features.length_per_key()):
            if n and key in self._feature_rows:
                chunk = values[start : start + n]
                lo, hi = int(chunk.min()), int(chunk.max())
                rows = self._feature_rows[key]
                if lo < 0 or hi >= rows:
                    bad = lo if lo < 0 else hi
                    raise IdOutOfRangeError(
                        f"feature '{key}': id {bad} is outside its table of {rows} rows "
                        f"(valid ids 0..{rows - 1})"
                    )
            start += n


def table_named(tables: Iterable[EmbeddingBagConfig], name: str) -> EmbeddingBagConfig:
    for t in tables:
        if t.name == name:
            return t
    raise KeyError(f"no table named '{name}'")
