"""Training step time of every registered method against ``none``, same batches, one process.

A step is DCNv2's forward, backward and optimizer step (row-wise Adagrad on the table
rows, Adam on the rest, as the trainer builds them) on a batch of 512 with 13 dense
and 26 single-hot sparse features whose vocabularies are the Criteo sample's (times
``--scale``), ids drawn from a power law. Beside it, the embedding module alone
(forward and backward, no optimizer), where the id transform's cost shows. Methods
take turns batch by batch, so that a change in machine load hits them all; the table
shows each one's median over every timed step.

Usage::

    python -m experiments.benches.step [--ratio 10] [--scale 1] [--steps 10] [--rounds 5]
    # only some methods, plus a variant of one (its fields as OmegaConf dot-list overrides)
    python -m experiments.benches.step --methods none hashing \
        --variant unified_embedding:chunk_dim=8,chunk_rule=cardinality
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import compression
from compression import Budget, BudgetError, MethodConfigError, compress, memory_report
from recsys.models import DCNv2
from recsys.training.optim import build_optimizers
from recsys.training.step import TrainStep
from recsys.training.trainer import TrainerConfig

# distinct values + 1 (the OOV id) of C1..C26 in data/criteo-sample/train.txt
CRITEO_SAMPLE_VOCAB = [
    176, 387, 5521, 4033, 57, 8, 3185, 94, 4, 2987, 2085, 5284, 1726,
    25, 2036, 4724, 10, 1150, 547, 4, 5037, 8, 13, 2525, 40, 1939,
]  # fmt: skip
DIM = 16
BATCH = 512


def tables(scale: int) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t_C{i + 1}", embedding_dim=DIM, num_embeddings=n * scale, feature_names=[f"C{i + 1}"])
        for i, n in enumerate(CRITEO_SAMPLE_VOCAB)
    ]


def counts(tabs: list[EmbeddingBagConfig]) -> dict[str, np.ndarray]:
    """Power-law train counts, ids 1.. by descending frequency (the processed data's order)."""
    return {t.feature_names[0]: (1e6 / np.arange(1, t.num_embeddings + 1)).astype(np.int64) for t in tabs}


def batches(
    tabs: list[EmbeddingBagConfig], n: int, seed: int = 0, batch: int = BATCH
) -> list[tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]]:
    """``n`` batches of (13 dense features, power-law single-hot ids over ``tabs``, labels [batch, 1])."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = [np.minimum(rng.zipf(1.2, batch) - 1, t.num_embeddings - 1) for t in tabs]
        kjt = KeyedJaggedTensor(
            keys=[t.feature_names[0] for t in tabs],
            values=torch.from_numpy(np.concatenate(ids)),
            lengths=torch.ones(batch * len(tabs), dtype=torch.int32),
        )
        out.append((torch.randn(batch, 13), kjt, torch.randint(0, 2, (batch, 1)).float()))
    return out


def trainer_for(config: compression.CompressionConfig, tabs: list[EmbeddingBagConfig]):
    module = compress(tabs, config, counts=counts(tabs), seed=0)
    model = DCNv2(module, dense_in_features=13)
    cfg = TrainerConfig(sparse_lr=0.05, dense_lr=1e-3)
    train_step = TrainStep(model, module, build_optimizers(model, module, cfg), cfg)  # the trainer's step

    def step(dense: torch.Tensor, kjt: KeyedJaggedTensor, label: torch.Tensor) -> None:
        train_step(Batch(dense_features=dense, sparse_features=kjt, labels=label.reshape(-1)))

    def embedding_only(dense: torch.Tensor, kjt: KeyedJaggedTensor, label: torch.Tensor) -> None:
        module(kjt).values().sum().backward()
        model.zero_grad(set_to_none=True)

    return module, step, embedding_only


def variant(spec: str) -> tuple[str, compression.CompressionConfig]:
    """``method:key=value,key=value`` -> (a row label, that method's config with those fields)."""
    name, _, overrides = spec.partition(":")
    cls = compression.config_class(name)
    merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.from_dotlist(overrides.split(",") if overrides else []))
    return spec, OmegaConf.to_object(merged)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=10.0, help="compression ratio of every budget-driven method")
    parser.add_argument("--scale", type=int, default=1, help="multiply every vocabulary by this")
    parser.add_argument("--steps", type=int, default=10, help="batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--methods", nargs="*", default=None, help="registered methods to time (default: all; none always)")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="METHOD:K=V,...", help="also time this config (repeatable)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tabs = tables(args.scale)
    data = batches(tabs, args.steps)
    runs = {}
    chosen = [
        (name, cls())
        for name, cls in sorted(compression.registered_methods().items(), key=lambda kv: kv[0] != "none")
        if args.methods is None or name in args.methods or name == "none"
    ]
    refused = {}
    for name, config in chosen + [variant(v) for v in args.variant]:
        try:
            config = config.with_budget(Budget(ratio=args.ratio))  # a method without one ignores it
            runs[name] = trainer_for(config, tabs)
        except (BudgetError, MethodConfigError) as e:  # out of its reach at this ratio: said, not timed
            refused[name] = str(e).splitlines()[0]
            continue
        for batch in data[:3]:  # warm up
            runs[name][1](*batch)
    steps: dict[str, list[float]] = {name: [] for name in runs}
    emb: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for batch in data:
            for name, (_, step, embedding_only) in runs.items():
                for fn, out in ((step, steps), (embedding_only, emb)):
                    start = time.perf_counter()
                    fn(*batch)
                    out[name].append((time.perf_counter() - start) * 1e3)
    base, base_emb = statistics.median(steps["none"]), statistics.median(emb["none"])
    print(
        f"DCNv2 training step, batch {BATCH}, 26 sparse fields (Criteo sample vocabularies x{args.scale}, "
        f"dim {DIM}), budget {args.ratio:g}x, {torch.get_num_threads()} threads, "
        f"median of {args.rounds * args.steps} steps"
    )
    width = max(18, *(len(name) for name in runs))
    print(f"{'method':<{width}} {'step ms':>8} {'vs none':>8} {'emb f+b ms':>11} {'vs none':>8} {'bytes':>10} {'ratio':>7}")
    for name, (module, _, _) in runs.items():
        ms, ems = statistics.median(steps[name]), statistics.median(emb[name])
        report = memory_report(module)
        print(
            f"{name:<{width}} {ms:8.2f} {ms / base:7.2f}x {ems:11.2f} {ems / base_emb:7.2f}x "
            f"{report.bytes:10d} {report.ratio:6.1f}x"
        )
    for name, why in refused.items():
        print(f"{name:<{width}} not timed: {why}")


if __name__ == "__main__":
    main()
