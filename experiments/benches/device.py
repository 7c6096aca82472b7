"""What runs on a CUDA device, and how fast against the CPU of the same machine.

One command that answers, on a machine with a GPU (the CPU alone works too):

1. the stack: torch, CUDA, the GPU, fbgemm-gpu (its CPU or CUDA build) and torchrec;
2. whether TorchRec's unsharded modules run on CUDA tensors (KJT ops, an
   ``EmbeddingBagCollection`` forward and backward) with that fbgemm build;
3. per registered method: a DLRM training step with the compressed module on the
   device (ok, or the error's first line);
4. training throughput, DLRM with a compressed module, the same synthetic batches on
   the device and on the CPU (samples/s, median of timed steps);
5. real training through ``Trainer`` on a processed dataset (e.g. the Criteo sample's
   cache), on each device: test AUC and samples/s;
6. the paths that need FBGEMM's CUDA kernels: sharded training (DMP, fused TBE, world
   size 1) and post-training int8 (TorchRec's quantized EBC): ok, or why not.

Usage::

    python -m experiments.benches.device --out device.json \
        [--data data/cache/criteo_sample-<digest>] [--methods none hashing unified_embedding]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import compression
from compression import Budget, compress
from experiments.benches.step import batches, counts, tables
from recsys.models import DLRMConfig
from recsys.training.optim import build_optimizers
from recsys.training.step import TrainStep
from recsys.training.trainer import TrainerConfig

N_DENSE = 13


def _error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    """``{"ok": True, **fn()}`` or ``{"ok": False, "error": first line}``."""
    try:
        out = fn()
        return {"ok": True, **(out if isinstance(out, dict) else {})}
    except Exception as e:  # noqa: BLE001  (recorded, reported)
        traceback.print_exc()
        return {"ok": False, "error": _error(e)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stack() -> dict[str, Any]:
    import fbgemm_gpu
    import torchrec

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
        "fbgemm_variant": getattr(fbgemm_gpu, "__variant__", "?"),
        "torchrec": getattr(torchrec, "__version__", "?"),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
    return out


def synthetic(tabs: list[EmbeddingBagConfig], batch: int, n: int, seed: int = 0) -> list[tuple[Any, ...]]:
    """the step benchmark's power-law batches over ``tabs`` (CPU tensors), labels flat."""
    return [(dense, kjt, labels.reshape(-1)) for dense, kjt, labels in batches(tabs, n, seed, batch)]


def kjt_probe(device: torch.device) -> dict[str, dict[str, Any]]:
    """TorchRec's unsharded building blocks on ``device``, one by one."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    tabs = tables(1)[:4]
    _, kjt, _ = synthetic(tabs, 64, 1)[0]
    kjt = kjt.to(device)

    def ebc_step() -> dict[str, Any]:
        ebc = EmbeddingBagCollection(tables=tabs, device=device)
        out = ebc(kjt).values()
        out.sum().backward()
        return {"out_device": str(out.device)}

    return {
        "kjt.to_dict": attempt(lambda: {"n": len(kjt.to_dict())}),
        "kjt.permute": attempt(lambda: {"keys": len(kjt.permute([3, 2, 1, 0]).keys())}),
        "kjt.offsets": attempt(lambda: {"n": int(kjt.offsets().numel())}),
        "ebc.forward_backward": attempt(ebc_step),
    }


def build(name: str, device: torch.device, tabs: list[EmbeddingBagConfig], ratio: float) -> tuple[Any, Any, Callable]:
    """(module, model, step(dense, kjt, labels)) for method ``name`` on ``device``."""
    config = compression.config_class(name)()
    if name != "none":
        config = config.with_budget(Budget(ratio=ratio))  # a method without a budget ignores it
    module = compress(tabs, config, counts=counts(tabs), device=device, seed=0)
    model = DLRMConfig(embedding_dim=tabs[0].embedding_dim).build(module, N_DENSE).to(device)
    cfg = TrainerConfig(sparse_lr=0.05, dense_lr=1e-3, device=device.type)
    train_step = TrainStep(model, module, build_optimizers(model, module, cfg), cfg)  # the trainer's step

    def step(dense: torch.Tensor, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> float:
        return train_step(Batch(dense_features=dense, sparse_features=kjt, labels=labels))[0]

    return module, model, step


def method_steps(device: torch.device, methods: list[str], ratio: float) -> dict[str, dict[str, Any]]:
    tabs = tables(1)
    data = synthetic(tabs, 256, 2)
    out = {}
    for name in methods:

        def one(name: str = name) -> dict[str, Any]:
            _, _, step = build(name, device, tabs, ratio)
            losses = [step(*(x.to(device) for x in b)) for b in data]
            return {"loss": losses[-1]}

        out[name] = attempt(one)
    return out


def throughput(
    device: torch.device, methods: list[str], ratio: float, scale: int, batch: int, steps: int
) -> dict[str, dict[str, Any]]:
    """Samples/s of DLRM training steps, synthetic batches already on ``device``."""
    tabs = tables(scale)
    data = [tuple(x.to(device) for x in b) for b in synthetic(tabs, batch, steps)]
    out = {}
    for name in methods:

        def timed(name: str = name) -> dict[str, Any]:
            module, _, step = build(name, device, tabs, ratio)
            for b in data[:3]:
                step(*b)
            times = []
            for b in data:
                sync(device)
                t0 = time.perf_counter()
                step(*b)
                sync(device)
                times.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(times)
            return {"step_ms": ms, "samples_per_s": batch / (ms / 1e3), "bytes": compression.memory_report(module).bytes}

        out[name] = attempt(timed)
    return out


def real_training(device: torch.device, root: Path, methods: list[str], ratio: float, epochs: int) -> dict[str, Any]:
    """``Trainer.run`` on a processed dataset: test AUC and samples/s per method."""
    from recsys.data.loader import BatchLoader
    from recsys.data.schema import ProcessedDataset, embedding_tables
    from recsys.training.trainer import Trainer, TrainerConfig

    ds = ProcessedDataset.open(root)
    out = {}
    for name in methods:

        def run(name: str = name) -> dict[str, Any]:
            torch.manual_seed(0)
            tabs = embedding_tables(ds.schema, 16)
            config = compression.config_class(name)().with_budget(Budget(ratio=ratio))  # none ignores it
            cfg = TrainerConfig(epochs=epochs, batch_size=512, device=device.type, progress="off", patience=epochs)
            trainer = Trainer(cfg)
            module = compress(tabs, config, device=trainer.device, seed=0)
            model = DLRMConfig(embedding_dim=16).build(module, len(ds.schema.dense))
            loaders = [BatchLoader(ds, s, cfg.batch_size if s == "train" else cfg.eval_batch_size,
                                   shuffle=s == "train", seed=0) for s in ("train", "val", "test")]  # fmt: skip
            t0 = time.perf_counter()
            result = trainer.run(model, module, *loaders)
            fit = result.fit
            return {
                "test_auc": result.test["auc"],
                "samples_per_s": fit.samples_per_s if fit else None,
                "step_ms": fit.step_time_ms if fit else None,
                "wall_s": time.perf_counter() - t0,
            }

        out[name] = attempt(run)
    return out


def fbgemm_cuda_paths(device: torch.device) -> dict[str, dict[str, Any]]:
    """Sharded training (DMP, fused TBE) and post-training int8 on ``device``."""
    from recsys.training import distributed as D

    tabs = tables(1)
    data = [tuple(x.to(device) for x in b) for b in synthetic(tabs, 256, 2)]

    def sharded() -> dict[str, Any]:
        runtime = D.start(D.DistributedConfig(mode="on"), device.type)
        config = compression.config_class("hashing")(budget=Budget(ratio=10))
        module = compress(tabs, config, device=device, seed=0, table_device="meta")
        model = DLRMConfig(embedding_dim=16).build(module, N_DENSE)
        s = D.shard(model, module, runtime, D.DistributedConfig(), sparse_lr=0.05, batch_size=256)
        dense, kjt, labels = data[0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(s.dmp(dense, kjt).reshape(-1), labels)
        loss.backward()
        return {"plan": s.plan.sharding_types(), "loss": float(loss.detach())}

    def int8() -> dict[str, Any]:
        module, model, step = build("hashing", device, tabs, 10)
        step(*data[0])
        compression.quantize_(module, compression.Quantization("int8"))
        with torch.no_grad():
            logits = model(data[1][0], data[1][1])
        return {"bytes": compression.memory_report(module).bytes, "finite": bool(torch.isfinite(logits).all())}

    return {"sharded_dmp_world1": attempt(sharded), "ptq_int8": attempt(int8)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--data", type=Path, default=None, help="a processed dataset directory for real training")
    parser.add_argument("--methods", nargs="*", default=["none", "hashing", "qr", "unified_embedding"])
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--scale", type=int, default=100, help="vocabularies: the Criteo sample's times this")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    report: dict[str, Any] = {"stack": stack(), "args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=1, default=str))

    for d in devices:
        t = str(d)
        report[f"kjt_probe.{t}"] = kjt_probe(d)
        save()
        report[f"method_step.{t}"] = method_steps(d, sorted(compression.registered_methods()), args.ratio)
        save()
    for d in devices:
        report[f"throughput.{d}"] = throughput(d, args.methods, args.ratio, args.scale, args.batch, args.steps)
        save()
    if args.data is not None:
        for d in devices:
            report[f"real_training.{d}"] = real_training(d, args.data, args.methods, args.ratio, args.epochs)
            save()
    for d in devices[1:]:
        report[f"fbgemm_cuda.{d}"] = fbgemm_cuda_paths(d)
        save()
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
