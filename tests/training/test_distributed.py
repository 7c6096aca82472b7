"""Sharded (2 gloo processes, TorchRec DMP) equals unsharded, for every registered method.

One ``torch.multiprocessing`` spawn runs every method in turn: the module is built
unsharded, copied, the copy wrapped by DMP (plan under the method's constraints) and
the unsharded weights loaded after wrapping; then the sharded forward and one
training step (fused row-wise Adagrad for sharded tables, the same optimizer
unfused for the reference) must equal the unsharded module's on the whole batch.
The global batch is odd, so one rank's part is padded with an empty sample.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import compression
from compression import Budget, compress
from compression.methods.dedup import DedupConfig
from compression.methods.dhe import DHEConfig
from compression.methods.double_hashing import DoubleHashingConfig
from compression.methods.dpq import DPQConfig, MGQEConfig
from compression.methods.frequency_hybrid import FrequencyHybridConfig
from compression.methods.hashing import HashingConfig
from compression.methods.managed_collision import ManagedCollisionConfig
from compression.methods.mixed_dim import MixedDimConfig
from compression.methods.mpzch import MpzchConfig
from compression.methods.none import NoCompression
from compression.methods.optembed import OptEmbedConfig
from compression.methods.qr import QRConfig
from compression.methods.robe import RobeConfig
from compression.methods.tt_rec import TTRecConfig
from compression.methods.unified_embedding import UnifiedEmbeddingConfig
from recsys.data.loader import pad_batch
from recsys.training import distributed as D
from recsys.training.sharded import global_loss, sharded_optimizers

WORLD = 2
BATCH = 15  # odd: rank 1's part is padded
DIM = 8
TOL = 2e-5
TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=DIM, num_embeddings=4000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_mid", embedding_dim=DIM, num_embeddings=600, feature_names=["mid"]),
    EmbeddingBagConfig(name="t_tags", embedding_dim=DIM, num_embeddings=300, feature_names=["tags"]),
]
COUNTS = {f: (10_000 // np.arange(1, t.num_embeddings + 1)) for t in TABLES for f in t.feature_names}
# configs chosen to exercise a plan for these tables; every other registered method runs its
# first contract example (so a new method is sharded here without being listed)
TUNED = {
    "none": NoCompression(),
    "hashing": HashingConfig(budget=Budget(ratio=8)),
    "double_hashing": DoubleHashingConfig(budget=Budget(ratio=8)),
    "qr": QRConfig(budget=Budget(ratio=8)),
    "qr_add": QRConfig(budget=Budget(ratio=8), combine="add"),
    "frequency_hybrid": FrequencyHybridConfig(budget=Budget(ratio=8)),
    "managed_collision": ManagedCollisionConfig(budget=Budget(ratio=2)),
    "mpzch": MpzchConfig(budget=Budget(ratio=2)),
    "mixed_dim": MixedDimConfig(budget=Budget(ratio=3)),
    "unified_embedding": UnifiedEmbeddingConfig(budget=Budget(ratio=8), chunk_dim=4, num_tables=2),
    "optembed": OptEmbedConfig(),
    # their training form: DPQ's query tables (an EmbeddingCollection) sharded, codebooks
    # data-parallel; dedup's full tables; pack / merge and after run on rank 0 unsharded
    "dpq": DPQConfig(budget=Budget(ratio=8)),
    "mgqe": MGQEConfig(budget=Budget(ratio=8)),
    "dedup": DedupConfig(budget=Budget(ratio=2)),
    "robe": RobeConfig(budget=Budget(ratio=8)),  # the array row-wise
    "tt_rec": TTRecConfig(budget=Budget(ratio=8)),  # the cores replicated (data-parallel)
    "dhe": DHEConfig(budget=Budget(ratio=8), num_hashes=32),  # no table: the MLPs data-parallel
}
CONFIGS = {
    **{name: cls.contract_examples()[0] for name, cls in compression.registered_methods().items()},
    **TUNED,
}
# mixed_dim's dims here are not all multiples of 4: those tables are replicated
# (data-parallel), the others sharded; qr_add pools before combining (one bag per sample)
# methods TorchRec cannot shard on the CPU, with the reason the run is refused with
REFUSED_ON_CPU = {
    "managed_collision": "fbgemm::reset_weight_momentum, which FBGEMM implements for CUDA only",
    "mpzch": "fbgemm::reset_weight_momentum, which FBGEMM implements for CUDA only",
}
# and methods refused everywhere: their module's declared sharding_refusal() (tt_rec: its only
# plan gives wrong rows), which the run must report as it is
REFUSED_ON_CPU.update({
    name: reason for name, config in CONFIGS.items()
    if (reason := compress(TABLES, config, counts=COUNTS, seed=0).sharding_refusal()) is not None
})


class Tiny(nn.Module):
    """Dense features and pooled embeddings into one linear layer: a model with both
    kinds of parameters, called as the trainer calls models."""

    def __init__(self, ebc: nn.Module, n_dense: int = 2) -> None:
        super().__init__()
        self.ebc = ebc
        width = sum(c.embedding_dim * len(c.feature_names) for c in ebc.embedding_bag_configs())
        self.head = nn.Linear(n_dense + width, 1)

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(torch.cat([dense, self.ebc(kjt).values()], dim=1))


def make_batch(rows: list[int], seed: int = 0) -> Batch:
    """Rows ``rows`` of one fixed global batch (multi-hot tags, empty bags included)."""
    g = torch.Generator().manual_seed(seed)
    big = torch.randint(0, 4000, (BATCH,), generator=g)
    mid = torch.randint(0, 600, (BATCH,), generator=g)
    tag_len = torch.randint(0, 4, (BATCH,), generator=g)
    tags = torch.randint(0, 300, (int(tag_len.sum()),), generator=g)
    dense = torch.randn(BATCH, 2, generator=g)
    labels = torch.randint(0, 2, (BATCH,), generator=g).float()
    off = torch.cat([torch.zeros(1, dtype=torch.long), tag_len.cumsum(0)])
    idx = torch.tensor(rows, dtype=torch.long)
    kjt = KeyedJaggedTensor(
        keys=["big", "mid", "tags"],
        values=torch.cat([big[idx], mid[idx]] + [tags[off[r] : off[r + 1]] for r in rows]),
        lengths=torch.cat([torch.ones(2 * len(rows), dtype=torch.int32), tag_len[idx].int()]),
    )
    return Batch(dense_features=dense[idx], sparse_features=kjt, labels=labels[idx])


def _compare(rank: int, runtime: D.Runtime, name: str) -> dict[str, float]:
    module = compress(TABLES, CONFIGS[name], counts=COUNTS, seed=0)
    torch.manual_seed(1)
    ref = Tiny(module)
    model = copy.deepcopy(ref)
    state = copy.deepcopy(ref.state_dict())
    cfg = SimpleNamespace(sparse_lr=0.1, dense_lr=0.01, weight_decay=0.0, sparse_optimizer="rowwise_adagrad")
    sharded = D.shard(model, model.ebc, runtime, D.DistributedConfig(), sparse_lr=cfg.sparse_lr, state=state)
    size = -(-BATCH // WORLD)
    rows = list(range(rank * size, min(BATCH, (rank + 1) * size)))
    whole, part = make_batch(list(range(BATCH))), pad_batch(make_batch(rows), size - len(rows))
    dmp = sharded.dmp
    out: dict[str, float] = {"plan": sharded.plan.sharding_types(), "estimate": sharded.plan.estimate}  # type: ignore[dict-item]

    def diff() -> float:
        ref.eval(), dmp.eval()
        with torch.no_grad():
            a = dmp(part.dense_features, part.sparse_features).reshape(-1)[: len(rows)]
            b = ref(whole.dense_features, whole.sparse_features).reshape(-1)[rows]
        ref.train(), dmp.train()
        return float((a - b).abs().max())

    out["forward"] = diff()
    with torch.no_grad():
        before = ref(whole.dense_features, whole.sparse_features)
    if name == "optembed":  # the supernet samples dims at random per sample: step the fixed mode
        for m in (module, model.ebc):
            m.mode = "fixed"
    # the reference: one process, the whole batch, row-wise Adagrad (unfused) for the tables,
    # the module's own optimizers for their parameters (autosrh's alpha: SGD), Adam for the rest
    tables = {id(p) for p in ref.ebc.table_parameters()}
    extra = ref.ebc.extra_optimizers()
    own = tables | {id(p) for o in extra for g in o.param_groups for p in g["params"]}
    opts = [  # (no table rows, as DHE's MLPs: Adam alone)
        *([RowWiseAdagrad(ref.ebc.table_parameters(), lr=cfg.sparse_lr)] if tables else []),
        torch.optim.Adam([p for p in ref.parameters() if id(p) not in own], lr=cfg.dense_lr),
        *extra,
    ]
    loss = F.binary_cross_entropy_with_logits(ref(whole.dense_features, whole.sparse_features).reshape(-1), whole.labels)
    loss.backward()
    for o in opts:
        o.step()
    sopts = sharded_optimizers(sharded, model.ebc, cfg)
    logits = dmp(part.dense_features, part.sparse_features).reshape(-1)
    sloss, value, count = global_loss(logits, part.labels)
    out["count"] = count
    sloss.backward()
    sopts.step()
    out["loss"] = abs(value - float(loss.detach()))
    out["step"] = diff()
    with torch.no_grad():  # how far one step moved the logits: the scale of the step's error
        out["moved"] = float((ref(whole.dense_features, whole.sparse_features) - before).abs().max())
    out["bytes"] = D.rank_bytes(sharded, model.ebc, "ebc")  # type: ignore[assignment]
    out["table_bytes"] = sum(p.numel() * p.element_size() for p in module.table_parameters())
    return out


def _worker(rank: int, port: int, out_dir: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    runtime = D.Runtime(rank, WORLD, WORLD, torch.device("cpu"), "gloo")
    results: dict[str, object] = {}
    for name in names:
        try:
            results[name] = _compare(rank, runtime, name)
        except Exception as e:  # recorded: the test names the method and the reason
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, default=str))
    # both ranks done before either tears its connections down: a rank that exits while
    # its peer is still in gloo can take the peer down with it (SIGABRT, seen once in CI)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out), sorted(CONFIGS)), nprocs=WORLD)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


# methods whose training step is, by design, DDP's rather than one process's on the whole
# batch: their sharded forward (evaluation) must still equal the unsharded one
DATA_PARALLEL_STEP = {
    "autodim": "Gumbel noise is drawn on each rank and BatchNorm normalises each rank's batch",
}
# known failures, with what fails (strict: the test says when they pass)
KNOWN_FAILING: dict[str, str] = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_FAILING[n], strict=True))
                                  if n in KNOWN_FAILING else n
                                  for n in sorted(set(CONFIGS) - set(REFUSED_ON_CPU))])  # fmt: skip
def test_sharded_equals_unsharded(results, name):
    for rank, res in enumerate(results):
        r = res[name]
        assert "error" not in r, f"{name} on rank {rank}: {r.get('error')}"
        assert r["forward"] < TOL, (name, rank, r)
        if name in DATA_PARALLEL_STEP:  # the step trains, as DDP's would
            assert r["moved"] > 100 * TOL and np.isfinite(r["loss"]), (name, rank, r)
            continue
        assert r["loss"] < TOL, (name, rank, r)
        # one row-wise Adagrad step moves logits by ~lr; fused and unfused agree to float error
        assert r["step"] < TOL, (name, rank, r)
        assert r["moved"] > 100 * TOL, (name, rank, r)  # the step did change the model


@pytest.mark.parametrize("name", sorted(REFUSED_ON_CPU))
def test_methods_torchrec_cannot_shard_on_cpu_are_refused_clearly(results, name):
    for res in results:
        error = res[name].get("error", "")
        assert error.startswith("DistributedError: ") and REFUSED_ON_CPU[name] in error, res[name]


SHARDING_TYPES = {"table_wise", "column_wise", "row_wise", "table_row_wise", "data_parallel"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_FAILING[n], strict=True))
                                  if n in KNOWN_FAILING else n
                                  for n in sorted(set(CONFIGS) - set(REFUSED_ON_CPU))])  # fmt: skip
def test_the_plan_and_what_each_rank_holds(results, name):
    """Every table planned, the same plan on every rank; the ranks' table bytes are the
    unsharded tables split (each data-parallel table whole on every rank), counted from
    the shards held, and the fused optimizer holds state for the sharded rows."""
    assert all("error" not in res[name] for res in results), [res[name].get("error") for res in results]
    plans = [res[name]["plan"] for res in results]
    full = results[0][name]["table_bytes"]
    # a method with no TorchRec table rows (DHE: the MLPs are dense) has nothing to plan
    assert (bool(plans[0]) == (full > 0)) and all(p == plans[0] for p in plans), plans
    assert set(plans[0].values()) <= SHARDING_TYPES, plans
    held = [res[name]["bytes"]["table_bytes"] for res in results]
    # the planner's storage estimate per rank (its chosen shards: tables, optimizer state, I/O)
    # covers what each rank holds, and every rank read the same one
    estimates = [res[name]["estimate"] for res in results]
    assert all(e == estimates[0] for e in estimates) and len(estimates[0]) == WORLD, estimates
    assert all(est >= h for est, h in zip(estimates[0], held)), (name, estimates[0], held)
    if "data_parallel" in plans[0].values():
        assert full <= sum(held) <= WORLD * full, (name, held, full)
    else:
        assert sum(held) == full, (name, held, full)
        assert full == 0 or all(res[name]["bytes"]["optimizer_bytes"] > 0 for res in results), name
    for res in results:
        b = res[name]["bytes"]
        assert b["total_bytes"] == b["table_bytes"] + b["other_bytes"] + b["optimizer_bytes"]


def test_the_group_a_job_started_is_destroyed_at_exit():
    """A gloo group left to the interpreter's finalization can abort the process (its
    worker threads outlive it): an error's ``exit 1`` came back as SIGABRT. ``start``
    leaves the group to an exit handler that destroys it while the interpreter is whole."""
    code = (
        "import atexit, torch.distributed as dist\n"
        "from recsys.training.distributed import DistributedConfig, start\n"
        "start(DistributedConfig(mode='on'), 'cpu')\n"
        "assert dist.is_initialized()\n"
        "atexit._run_exitfuncs()\n"
        "print('group left after the exit handlers:', dist.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("group left after the exit handlers: False"), proc.stdout

