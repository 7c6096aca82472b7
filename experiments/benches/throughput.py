"""Training throughput against the machine's limits, and where a step's time goes.

In one process: the machine's fp32 GEMM peak (``torch.mm`` of the MLP's shapes and larger,
the best GFLOP/s; then the best shape timed again between the rounds of steps, and the
median of those is the peak the steps are measured against: a shared machine's speed
drifts by 10% from one minute to the next, and a ratio taken with its parts far apart in
time carries that drift) and its memory bandwidth (a STREAM-like copy, read + write bytes); then,
for each model and method on Criteo-shaped tables (26 fields, the Kaggle file's
vocabularies by default: 33.7M ids, some tables of millions of rows), the trainer's own
step (``recsys.training.step.TrainStep``) on power-law batches:

- training samples/s (median step), and validation samples/s (a forward of the eval batch);
- model FLOPs per training sample, counted by ``torch.utils.flop_counter.FlopCounterMode``
  over one step's forward and backward (every matmul the layers and interactions run), and
  the share of the GEMM peak the step reaches;
- the embedding rows' bytes a step moves (forward reads ``4·D`` a looked-up id, the
  update reads and writes ``8·D + 8`` a distinct id: rows and row-wise state), and, with
  the table-wide L2 of ``embedding_l2_mode: table``, every table read and written
  (``8·D`` a row), against the bandwidth;
- the step's phases (forward, of it the embedding module's; backward; L2 and clipping;
  optimizers), and what assembling a batch from a processed dataset costs (``BatchLoader``
  on a synthetic set of the same vocabularies).

Methods are timed round-robin batch by batch, so machine load hits them all alike.

Usage::

    python -m experiments.benches.throughput                       # DeepFM (BARS), DCNv2, DLRM; none, hashing
    python -m experiments.benches.throughput --models deepfm --trainer bars --batch 4096 \\
        --methods none hashing qr unified_embedding --vocab kaggle --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import compression
from compression import Budget, compress, memory_report
from experiments.benches.step import CRITEO_SAMPLE_VOCAB
from recsys.models import DCNv2Config, DeepFMConfig, DLRMConfig
from recsys.training.fused import FusedTables
from recsys.training.optim import build_optimizers
from recsys.training.step import TrainStep
from recsys.training.trainer import TrainerConfig

# distinct values of C1..C26 in the Criteo Kaggle (Display Advertising Challenge) train file
CRITEO_KAGGLE_VOCAB = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
MODELS = {
    # BARS's DeepFM: FM dim 10 (tables 11 wide: the first-order weight), MLP [400, 400, 400]
    "deepfm": lambda: DeepFMConfig(embedding_dim=10, deep_layers=[400, 400, 400]),
    # ... with BARS's batch norm and dropout 0.2 (model=deepfm_bars)
    "deepfm_bars": lambda: DeepFMConfig(
        embedding_dim=10, deep_layers=[400, 400, 400], batch_norm=True, dropout=0.2
    ),
    "dcnv2": lambda: DCNv2Config(embedding_dim=16),
    "dlrm": lambda: DLRMConfig(embedding_dim=16),
}
TRAINERS = {
    "bars": dict(sparse_optimizer="adam", sparse_lr=1e-3, dense_lr=1e-3, embedding_l2=0.05, embedding_l2_mode="table",
                 clip_grad_norm=10.0),
    "default": dict(sparse_optimizer="rowwise_adagrad", sparse_lr=0.05, dense_lr=1e-3, embedding_l2=1e-4,
                    embedding_l2_mode="table"),
    # trainer=fused's settings: default's without the embedding L2, fbgemm's fused row-wise
    # Adagrad in the backward; "default_nol2" is the same update unfused (the like-for-like base)
    "default_nol2": dict(sparse_optimizer="rowwise_adagrad", sparse_lr=0.05, dense_lr=1e-3),
    "fused": dict(sparse_optimizer="rowwise_adagrad", sparse_lr=0.05, dense_lr=1e-3, fused_tables=True),
}  # fmt: skip
# the published Frappe CSV's ten fields (BARS's DeepFM split; no dense features)
FRAPPE_VOCAB = [957, 4082, 7, 7, 2, 3, 2, 9, 80, 233]
VOCABS = {
    "kaggle": (CRITEO_KAGGLE_VOCAB, 13),
    "sample": (CRITEO_SAMPLE_VOCAB, 13),
    "frappe": (FRAPPE_VOCAB, 0),
}


def gemm_peak(seconds: float = 2.0) -> tuple[float, tuple[int, int, int]]:
    """The best fp32 GFLOP/s of ``torch.mm`` over the MLP's shapes and larger ones, and
    the shape (m, k, n) that gave it."""
    best, shape = 0.0, (0, 0, 0)
    for mkn in ((4096, 400, 400), (4096, 1024, 1024), (2048, 2048, 2048)):
        clock = GemmClock(mkn, reps=1)
        clock.tick()  # (warm-up)
        clock.rates.clear()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            clock.tick()
        rate = len(clock.rates) * clock.flop / (time.perf_counter() - start) / 1e9
        if rate > best:
            best, shape = rate, mkn
    return best, shape


def _shape(mkn: tuple[int, int, int]) -> str:
    m, k, n = mkn
    return f"{m}x{k} @ {k}x{n}"


class GemmClock:
    """The GFLOP/s of one GEMM shape, timed at each ``tick`` (a few products' worth)."""

    def __init__(self, shape: tuple[int, int, int], reps: int = 3) -> None:
        m, k, n = shape
        self.a, self.b, self.reps, self.flop = torch.randn(m, k), torch.randn(k, n), reps, 2.0 * m * k * n
        self.rates: list[float] = []

    def tick(self) -> None:
        start = time.perf_counter()
        for _ in range(self.reps):
            torch.mm(self.a, self.b)
        self.rates.append(self.flop * self.reps / (time.perf_counter() - start) / 1e9)

    def median(self) -> float:
        return statistics.median(self.rates)


def bandwidth(mib: int = 512, reps: int = 10) -> float:
    """GB/s of a STREAM-like copy (bytes read + written)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / min(times) / 1e9


def tables(vocab: list[int], dim: int) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_C{i + 1}", embedding_dim=dim, num_embeddings=n, feature_names=[f"C{i + 1}"])
            for i, n in enumerate(vocab)]  # fmt: skip


def batches(vocab: list[int], n: int, batch: int, seed: int = 0, n_dense: int = 13) -> list[Batch]:
    """Power-law single-hot ids (ids 0.. by descending frequency), ``n_dense`` dense features, labels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = [np.minimum(rng.zipf(1.1, batch) - 1, v - 1) for v in vocab]
        kjt = KeyedJaggedTensor(keys=[f"C{i + 1}" for i in range(len(vocab))], values=torch.from_numpy(np.concatenate(ids)),
                                lengths=torch.ones(batch * len(vocab), dtype=torch.int32))  # fmt: skip
        out.append(Batch(dense_features=torch.randn(batch, n_dense), sparse_features=kjt,
                         labels=torch.randint(0, 2, (batch,)).float()))  # fmt: skip
    return out


class Run:
    """One model and method: its trainer step, timed phases, and what it is counted at."""

    def __init__(self, model_name: str, method: str, ratio: float, vocab: list[int], trainer: dict,
                 n_dense: int = 13) -> None:  # fmt: skip
        mcfg = MODELS[model_name]()
        config = compression.config_class(method)().with_budget(Budget(ratio=ratio))
        counts = {
            f"C{i + 1}": (1e6 / np.arange(1, v + 1)).astype(np.int64) for i, v in enumerate(vocab)
        }
        self.tabs = tables(vocab, mcfg.table_dim())
        self.module = compress(self.tabs, config, counts=counts, seed=0)
        self.model = mcfg.build(self.module, n_dense)
        cfg = TrainerConfig(**trainer)
        self.fused = FusedTables.fuse(self.module, cfg) if cfg.fused_tables else None
        opts = (build_optimizers(self.model, self.module, cfg) if self.fused is None
                else self.fused.optimizers(self.model, self.module, cfg))  # fmt: skip
        self.step = TrainStep(self.model, self.module, opts, cfg)
        self.times: list[float] = []
        self.emb_forward = 0.0
        self._t = 0.0
        self.module.register_forward_pre_hook(lambda *_: setattr(self, "_t", time.perf_counter()))
        self.module.register_forward_hook(lambda *_: setattr(self, "emb_forward",
                                                             self.emb_forward + time.perf_counter() - self._t))  # fmt: skip
        self.l2_table = cfg.embedding_l2 and cfg.embedding_l2_mode == "table"

    def flops(self, batch: Batch) -> float:
        """FLOPs of one training step's forward and backward, per sample."""
        counter = FlopCounterMode(display=False)
        with counter:
            logits = self.model(batch.dense_features, batch.sparse_features).reshape(-1)
            torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / len(batch.labels)

    def row_bytes(self, batch: Batch) -> float:
        """Bytes of embedding rows one step moves (see the module docstring)."""
        dim = self.tabs[0].embedding_dim
        values = batch.sparse_features.values()
        kjt = batch.sparse_features
        features = kjt.keys()
        distinct = sum(int(torch.unique(kjt[f].values()).numel()) for f in features)
        moved = 4 * dim * values.numel() + (8 * dim + 8) * distinct
        if self.l2_table:
            moved += 8 * sum(p.numel() for p in self.module.table_parameters())
        return float(moved)


def assembly_ms(vocab: list[int], batch: int, n: int, n_dense: int) -> float:
    """Mean ms a training batch (KJT, dense, labels) takes to assemble from a processed dataset,
    over an epoch of ``n`` batches (the iterator's start included)."""
    from recsys.data.loader import BatchLoader
    from recsys.data.synthetic import SyntheticConfig

    with tempfile.TemporaryDirectory() as tmp:
        rows = int(batch * n / 0.8) + batch
        ds = SyntheticConfig(rows=rows, cardinalities=vocab, n_dense=n_dense, seed=0).prepare(
            Path(tmp)
        )
        loader = BatchLoader(ds, "train", batch, shuffle=True, seed=0)
        start, count = time.perf_counter(), 0
        for _ in loader:
            count += 1
        return (time.perf_counter() - start) / max(count, 1) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=["none", "hashing"])
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument(
        "--vocab",
        choices=list(VOCABS),
        default="kaggle",
        help="the Criteo Kaggle file's 26 vocabularies, the Criteo sample's, or Frappe's ten",
    )
    parser.add_argument(
        "--trainer",
        nargs="+",
        choices=list(TRAINERS),
        default=["bars"],
        help="one or more: their runs are timed interleaved, batch by batch",
    )
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, n_dense = VOCABS[args.vocab]
    peak, shape = gemm_peak()
    bw = bandwidth()
    print(
        f"{torch.get_num_threads()} threads: fp32 GEMM peak {peak:.0f} GFLOP/s ({_shape(shape)}); copy bandwidth {bw:.1f} GB/s"
    )
    print(
        f"batch assembly (BatchLoader, {len(vocab)} fields, batch {args.batch}): {assembly_ms(vocab, args.batch, 20, n_dense):.1f} ms"
    )
    clock = GemmClock(shape)
    data = batches(vocab, args.steps + 2, args.batch, n_dense=n_dense)
    runs = {(m, x, t): Run(m, x, args.ratio, vocab, TRAINERS[t], n_dense)
            for m in args.models for x in args.methods for t in args.trainer}  # fmt: skip
    for r in runs.values():
        for b in data[:2]:  # warm up
            r.step(b)
        r.step.phases, r.emb_forward = {}, 0.0
    for b in data[2:]:
        for r in runs.values():
            start = time.perf_counter()
            r.step(b)
            r.times.append(time.perf_counter() - start)
        clock.tick()
    peak = clock.median()
    emb_forward = {
        key: r.emb_forward for key, r in runs.items()
    }  # (before the counting passes below)
    print(f"trainer={','.join(args.trainer)}, batch {args.batch}, budget {args.ratio:g}x, {args.steps} steps, median; "
          f"phases as shares of the mean step")  # fmt: skip
    print(f"GEMM peak between the rounds of steps ({_shape(shape)}, median of {len(clock.rates)}): {peak:.0f} GFLOP/s "
          f"(range {min(clock.rates):.0f}-{max(clock.rates):.0f}); 'of peak' is against it")  # fmt: skip
    head = (f"{'model':<7} {'method':<18} {'trainer':<12} {'samples/s':>10} {'MFLOP/smp':>9} {'of peak':>7} {'row GB/s':>8} {'of bw':>6} "
            f"{'eval smp/s':>10}  forward (emb) / backward / l2+clip / optim")  # fmt: skip
    print(head)
    for (model_name, method, trainer), r in runs.items():
        step_s = statistics.median(r.times)
        rate = args.batch / step_s
        flops = r.flops(data[0])
        moved = r.row_bytes(data[0]) / step_s / 1e9
        r.model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            r.model(data[0].dense_features, data[0].sparse_features)
            eval_rate = args.batch / (time.perf_counter() - start)
        r.model.train()
        total = sum(r.times)
        ph = r.step.phases or {}
        share = " / ".join(
            f"{ph.get(k, 0) / total:.0%}"
            for k in ("forward", "backward", "l2_and_clip", "optimizer")
        )
        fwd_emb = emb_forward[(model_name, method, trainer)] / total
        print(f"{model_name:<7} {method:<18} {trainer:<12} {rate:10.0f} {flops / 1e6:9.2f} {flops * rate / 1e9 / peak:7.1%} "
              f"{moved:8.2f} {moved / bw:6.1%} {eval_rate:10.0f}  {share} (emb fwd {fwd_emb:.0%}); "
              f"{memory_report(r.module).bytes / 2**20:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
