"""Inference lookup time of quantized tables against fp32 ones, same process, same batches.

The lookup is an embedding collection's forward (eval mode, no autograd) on a batch of
4096 single-hot ids per feature, for 26 features:

- ``sample``: the Criteo sample's vocabularies (all tables fit in cache);
- ``large``: the same, with the 8 largest made 1M rows (lookups go to memory).

Ids follow a power law (``zipf(1.2)``, as ``experiments.benches.step``'s: most lookups hit a few
hot rows, which stay in cache) or, with ``--ids uniform``, are uniform over each
table (lookups in the 1M-row tables go to memory). Rows are compared as:
``fp32`` (TorchRec's ``EmbeddingBagCollection``: ``nn.EmbeddingBag`` per table, the
training module), ``fp32-tbe`` (fp32 rows in fbgemm's inference TBE, the kernel the
quantized tables use) and ``fp16``, ``int8``, ``int4`` (``compression.quantization``,
TorchRec's quantized EBC over fbgemm's TBE). Variants take turns batch by batch so
that a change in machine load hits them all; a row is the median over every timed
batch, with its ratio to ``fp32``.

Usage::

    python -m experiments.benches.lookup [--batch 4096] [--dims 16 64] [--rounds 5] [--threads 0]
        [--ids zipf|uniform] [--scenarios sample large]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.memory import tbe_attributes, tensor_bytes
from compression.quantization import fbgemm_rows, quantized_collection
from experiments.benches.step import CRITEO_SAMPLE_VOCAB

LARGE_ROWS = 1_000_000
VARIANTS = ("fp32", "fp32-tbe", "fp16", "int8", "int4")


def tables(scenario: str, dim: int) -> list[EmbeddingBagConfig]:
    vocab = list(CRITEO_SAMPLE_VOCAB)
    if scenario == "large":
        for i in sorted(range(len(vocab)), key=lambda i: -vocab[i])[:8]:
            vocab[i] = LARGE_ROWS
    return [
        EmbeddingBagConfig(name=f"t_C{i + 1}", embedding_dim=dim, num_embeddings=n, feature_names=[f"C{i + 1}"])
        for i, n in enumerate(vocab)
    ]


def batches(
    tabs: list[EmbeddingBagConfig], batch: int, n: int, distribution: str = "zipf", seed: int = 0
) -> list[KeyedJaggedTensor]:
    """``n`` batches of single-hot ids: power law (``zipf``) or ``uniform`` over each table."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if distribution == "zipf":
            ids = [np.minimum(rng.zipf(1.2, batch) - 1, t.num_embeddings - 1) for t in tabs]
        else:
            ids = [rng.integers(0, t.num_embeddings, batch) for t in tabs]
        out.append(
            KeyedJaggedTensor(
                keys=[t.feature_names[0] for t in tabs],
                values=torch.from_numpy(np.concatenate(ids)),
                lengths=torch.ones(batch * len(tabs), dtype=torch.int32),
            )
        )
    return out


def variant(ebc: EmbeddingBagCollection, name: str) -> nn.Module:
    """``ebc``'s rows in the format ``name`` (fp32 is ``ebc`` itself)."""
    if name == "fp32":
        return ebc
    precision = "fp32" if name == "fp32-tbe" else name
    weights = {t.name: fbgemm_rows(ebc.embedding_bags[t.name].weight, precision) for t in ebc.embedding_bag_configs()}
    return quantized_collection(ebc, weights, precision, None)


def held_bytes(module: nn.Module) -> int:
    named = list(module.named_parameters()) + list(module.named_buffers()) + tbe_attributes(module)
    return sum(tensor_bytes(named).values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--scenarios", nargs="+", default=["sample", "large"], choices=["sample", "large"])
    parser.add_argument("--ids", default="zipf", choices=["zipf", "uniform"], help="id distribution")
    parser.add_argument("--steps", type=int, default=8, help="distinct batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"26 single-hot features, {args.ids} ids"
    )
    print(f"{'tables':<8} {'dim':>4} {'rows':<9} {'MB held':>9} {'ms/batch':>9} {'vs fp32':>8}")
    for scenario in args.scenarios:
        for dim in args.dims:
            tabs = tables(scenario, dim)
            ebc = EmbeddingBagCollection(tables=tabs).eval()
            modules = {name: variant(ebc, name) for name in VARIANTS}
            data = batches(tabs, args.batch, args.steps, args.ids)
            times: dict[str, list[float]] = {name: [] for name in modules}
            with torch.inference_mode():
                for kjt in data[:2]:  # warm up
                    for m in modules.values():
                        m(kjt)
                for _ in range(args.rounds):
                    for kjt in data:
                        for name, m in modules.items():
                            start = time.perf_counter()
                            m(kjt).values()
                            times[name].append(time.perf_counter() - start)
            base = statistics.median(times["fp32"])
            for name, m in modules.items():
                ms = statistics.median(times[name])
                print(
                    f"{scenario:<8} {dim:>4} {name:<9} {held_bytes(m) / 1e6:>9.2f} {1e3 * ms:>9.3f} {ms / base:>7.2f}x"
                )
            del modules, ebc


if __name__ == "__main__":
    main()
