"""What a job is: its compression config resolved from the job config, the tags that name
it in MLflow and the report, and the key of its result (what resume and de-duplication
compare)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from compression import Budget, BudgetError, CompressionConfig


def parse_budget(text: str, scope: str = "model") -> Budget:
    """'10x' -> a ratio; '2MiB', '500KB', '123456' -> bytes."""
    t = str(text).strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    try:
        if t.lower().endswith("x"):
            return Budget(ratio=float(t[:-1]), scope=scope)
        for suffix, mult in units.items():
            if t.lower().endswith(suffix):
                return Budget(bytes=int(float(t[: -len(suffix)]) * mult), scope=scope)
        return Budget(bytes=int(t), scope=scope)
    except ValueError:
        raise BudgetError(f"budget '{text}' is neither a ratio like '10x' nor bytes like '2MiB'") from None


def resolve_compression(cfg: DictConfig) -> CompressionConfig:
    """The method's config object with the job-level ``budget`` applied (a method without
    one ignores it), told when the model needs one output dim for every feature (DLRM)."""
    comp = OmegaConf.to_object(cfg.compression)
    assert isinstance(comp, CompressionConfig), comp
    if cfg.get("budget") is not None:
        comp = comp.with_budget(parse_budget(cfg.budget, cfg.get("budget_scope", "model")))
    model: Any = OmegaConf.to_object(cfg.model)
    if model.needs_uniform_dims():
        comp = comp.with_uniform_output()
    return comp


def _variant(cfg: DictConfig, method: str) -> str:
    """The compression config's name in conf/compression/ (e.g. qr_int4), else the method."""
    try:
        return HydraConfig.get().runtime.choices.get("compression") or method
    except ValueError:
        return method


def _task_overrides() -> str:
    """The job's Hydra overrides (what a sweep varies), '' outside a Hydra app."""
    try:
        return " ".join(HydraConfig.get().overrides.task)[:5000]
    except ValueError:
        return ""


def describe_job(cfg: DictConfig, comp: Any | None = None, variant: str | None = None) -> dict[str, str]:
    """Tags that name a job in the MLflow UI: method, budget, model, dataset (and the
    job's Hydra overrides, which the report uses to tell apart settings a sweep varies)."""
    comp = comp if comp is not None else resolve_compression(cfg)
    quant = comp.quantization
    method = type(comp).method
    if quant is not None:
        method = f"{method}+{quant.label()}"  # int4, or int4-qat when quantization-aware
    variant = variant or _variant(cfg, method)
    return {
        "method": method,
        "variant": variant,
        # what reports and run names call it: the config's name when it is a variant
        "label": method if variant in (method, type(comp).method) else variant,
        "budget": comp.budget_label(),
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "embcomp.overrides": _task_overrides(),
    }


def job_key(cfg: DictConfig, comp: Any, with_seed: bool = True) -> str:
    """Digest of what determines a job's result (a method without a budget ignores one);
    ``with_seed=False``: of what its seeds share (the key of a multi-seed job's group)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    # distributed: how a job is run, not what it computes (one step is the same update)
    for k in ("mlflow", "checkpoint_dir", "budget", "budget_scope", "cache_dir", "distributed", "export", "seeds"):
        container.pop(k, None)
    if not with_seed:
        container.pop("seed", None)
    container["compression"] = {"type": type(comp).__name__, **_as_plain(comp)}
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_plain(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else dict(obj)
