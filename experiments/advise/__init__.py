"""``make advise``: which method loses the least accuracy at your budget, on your data,
within the compute you give it.

1. Candidates: every registered method (or those named) at every table precision
   allowed, sized against the budget before anything trains; the user's constraints
   (step time, shardable, exportable) checked on each (``candidates``).
2. Search: an Optuna study (RDB storage: resumable after a kill, shared by several
   workers) of every candidate's points, each trial stopped early when it falls behind
   its candidate's other settings (successive halving over epochs, on validation AUC),
   candidates that fall behind the others given no more trials (``search``).
3. Finalists: the best candidates' best settings and the tuned full table, retrained
   with fresh seeds and evaluated once on the test split; the answer is the best mean
   validation AUC, ties marked, its test AUC against the tuned full table (``answer``).

Every trial and finalist is an MLflow run nested under one parent run per study.

Example::

    from experiments.advise import AdviseConfig, advise

    advice = advise(["dataset=movielens_100k", "budget=10x"], AdviseConfig(epochs=200))
    print(advice.line)          # use qr (combine=add sparse_lr=0.15 ...) at 10x: ...
    advice.yaml_path            # python -m experiments.run -cd <its folder>/.. experiment=advised
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf, open_dict

from compression import BudgetError
from experiments.advise.answer import Finalist, answer_line, decide
from experiments.advise.candidates import Found, JobContext, Point, find_candidates, job_context
from experiments.advise.config import AdviseConfig
from experiments.advise.report import (
    advice_markdown,
    experiment_yaml,
    grid_rows,
    summarise_search,
    write_grid,
    write_json,
)
from experiments.advise.search import (
    PARENT_ATTR,
    AdviseError,
    Budget,
    Search,
    best_by_candidate,
    finished,
    open_study,
    plan_study,
    spawn_workers,
    spent_samples,
    wait_for_plan,
)
from experiments.config import PROJECT_ROOT, register_configs
from experiments.interrupts import interrupted
from experiments.job import JobSkipped, JobUnreachable, run_job
from experiments.job_summary import JobSummary
from experiments.tracking import check_tracking, use_experiment
from experiments.validate import check_job
from recsys.training.callbacks import Callback

__all__ = ["Advice", "AdviseConfig", "AdviseError", "advise"]

EXPERIMENT = "advise"


@dataclass
class Advice:
    """What ``advise`` found: the answer line, the finalists, where it is written."""

    line: str
    answer: Finalist | None
    finalists: list[Finalist]
    found: Found
    cost: dict[str, float]
    study: str
    report_dir: Path
    parent_run_id: str
    yaml_path: Path | None = None
    markdown: str = ""
    grid: list[dict[str, Any]] = field(default_factory=list)


class _Composer:
    """Hydra's compose API over ``experiments/conf`` (the job config ``experiments.run`` gets),
    caching each distinct override list."""

    def __init__(self) -> None:
        register_configs()
        self._cache: dict[tuple[str, ...], DictConfig] = {}

    def __call__(self, overrides: Sequence[str]) -> DictConfig:
        key = tuple(overrides)
        if key not in self._cache:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(PROJECT_ROOT / "experiments" / "conf"), version_base="1.3"):
                self._cache[key] = compose(config_name="config", overrides=list(overrides))
        out = self._cache[key].copy()
        OmegaConf.set_readonly(out, False)
        return out


def advise(job: Sequence[str], config: AdviseConfig | None = None, *, argv: Sequence[str] | None = None,
           say: Callable[[str], None] = print) -> Advice | None:  # fmt: skip
    """Find the method and settings that lose the least at the job's ``budget``.

    ``job``: Hydra overrides of the job (``dataset=...``, ``model=...``, ``trainer=...``,
    ``budget=10x``). ``argv``: the command line, to start more workers with
    (``config.workers``). Returns None in a ``worker_only`` process (it only trains)."""
    config = config or AdviseConfig()
    started = time.monotonic()
    composer = _Composer()
    base = [*job, *([] if any(o.startswith("mlflow.experiment_name=") for o in job) else [f"mlflow.experiment_name={EXPERIMENT}"])]
    threads = max(1, (os.cpu_count() or 1) // config.workers)
    if config.workers > 1 and not any(o.startswith("trainer.num_threads=") for o in job):
        base.append(f"trainer.num_threads={threads}")  # the cores shared among the workers
    cfg = composer(base)
    if cfg.get("budget") is None:
        raise AdviseError("advise needs the memory budget to answer for: budget=10x (a ratio) or budget=2MiB (bytes)")
    check_job(cfg)
    ctx = job_context(cfg)
    found = find_candidates(composer, base, config, ctx)
    if not [c for c in found.candidates if not c.reference]:
        reasons = "; ".join(f"{k}: {v}" for k, v in found.refused.items() if k != "none")
        raise AdviseError(f"no candidate meets {cfg.budget}" + (" and the constraints" if _constrained(config) else "")
                          + f": {reasons or 'no methods to consider'}")  # fmt: skip
    budget = _compute_budget(config, ctx, found, composer, base, started)
    name = config.study or "-".join([cfg.dataset.name, cfg.model.name, str(cfg.budget), *config.precisions[1:],
                                     *(["grid"] if config.grid else []), *(["defaults"] if config.defaults_only else [])])  # fmt: skip
    root = Path(_resolve(config.dir)) / name
    url = config.storage or f"sqlite:///{root}/study.db"
    study = open_study(url, name, config)
    plan = found.plan()
    points = {p.key: p for p in plan}
    check_tracking(cfg.mlflow.tracking_uri, cfg.mlflow.connect_timeout_s)
    exp_id = use_experiment(cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name)
    if config.worker_only:
        study = wait_for_plan(study)
        parent = study.user_attrs[PARENT_ATTR]
    else:
        parent = _parent_run(study, exp_id, name, base, config)
    plan_study(study, plan, _digest(plan, config))  # (a worker: refuses a study planned otherwise)
    runner = _runner(composer, base, root, parent, config, ctx)
    say(f"[advise] study '{name}' ({url}): {len(found.candidates)} candidates, {len(plan)} points, "
        f"{len(found.refused)} refused" + "".join(f"\n[advise]   refused {k}: {v}" for k, v in found.refused.items()))  # fmt: skip
    workers = []
    if config.workers > 1 and not config.worker_only:
        workers = spawn_workers(list(argv) if argv is not None else command_line(job, config), config.workers - 1, threads)
    search = Search(study, points, runner, config, budget, say)
    status = "FAILED"
    try:
        search.run()
        for w in workers:
            w.wait()
        if config.worker_only:
            status = "FINISHED"
            return None
        advice = _conclude(study, found, base, cfg, config, composer, root, parent, ctx, started, say, name)
        status = "FINISHED"
        return advice
    except BaseException as e:
        status = "KILLED" if interrupted(e) else "FAILED"
        raise
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        if not config.worker_only:
            mlflow.MlflowClient().set_terminated(parent, RunStatus.to_string(getattr(RunStatus, status)))


def command_line(job: Sequence[str], config: AdviseConfig) -> list[str]:
    """The arguments of ``python -m experiments.advise`` that run this search."""
    def value(v: Any) -> str:
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(map(str, v)) + "]"
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return [*job, *(f"advise.{f.name}={value(getattr(config, f.name))}" for f in dataclasses.fields(config))]


def _constrained(config: AdviseConfig) -> bool:
    return config.max_step_ratio is not None or config.shardable or config.exportable


def _resolve(path: str) -> str:
    return path.replace("${project_root:}", str(PROJECT_ROOT))


def _digest(plan: list[Point], config: AdviseConfig) -> str:
    text = json.dumps([[p.key for p in plan], config.grid, config.seeds, config.min_epochs, config.reduction_factor,
                       config.epoch_fraction], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compute_budget(config: AdviseConfig, ctx: JobContext, found: Found, composer: Any, base: list[str],
                    started: float) -> Budget:  # fmt: skip
    """The budget in samples and seconds, refused in one line when it cannot pay one rung
    of every candidate and one rung of each finalist's seeds (checked before any training)."""
    samples = config.samples if config.samples is not None else (config.epochs * ctx.train_rows if config.epochs else None)
    seconds = config.minutes * 60 if config.minutes is not None else None
    if config.grid:
        return Budget(None, None, started)
    rung = config.min_epochs * ctx.train_rows * (config.epoch_fraction or 1.0)
    finals = min(config.finalists, len(found.candidates) - 1) + 1
    need = rung * (len(found.candidates) + config.seeds * finals)
    what = (f"one rung ({config.min_epochs} epoch(s) of {ctx.train_rows:,} rows) of each of the {len(found.candidates)} "
            f"candidates and of {config.seeds} seeds of {finals} finalists")  # fmt: skip
    if samples is not None and samples < need:
        raise AdviseError(f"advise.samples={samples:,.0f} is below {what}: {need:,.0f} samples at least")
    if seconds is not None:
        rate = _samples_per_s(composer, base, found)
        if seconds < need / rate:
            raise AdviseError(f"advise.minutes={config.minutes:g} is below {what}: about {need / rate / 60:.1f} minutes "
                              f"at the full table's {rate:,.0f} samples/s on this machine")  # fmt: skip
    return Budget(samples, seconds, started)


def _samples_per_s(composer: Any, base: list[str], found: Found) -> float:
    """The full table's training speed here, from a few timed steps (no training run)."""
    from experiments.overhead import build, time_steps

    timed = build(composer([*base, *found.points["none"][0].overrides()]), 10)
    assert timed is not None
    time_steps([timed], 10)
    batch = len(timed.batches[0].labels)
    return batch / (sorted(timed.times)[len(timed.times) // 2] / 1e3)


def _parent_run(study: Any, exp_id: str, name: str, base: list[str], config: AdviseConfig) -> str:
    """The study's MLflow parent run: made once, reopened by a resumed search."""
    client = mlflow.MlflowClient()
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent is not None:
        client.update_run(parent, status="RUNNING")
        return parent
    run = client.create_run(exp_id, run_name=f"advise-{name}", tags={
        "embcomp.kind": "advise", "embcomp.study": name, "embcomp.overrides": " ".join(base)[:5000]})  # fmt: skip
    for k, v in {"advise." + k: v for k, v in config.__dict__.items()}.items():
        client.log_param(run.info.run_id, k, str(v)[:500])
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    return run.info.run_id


def _trial_cfg(composer: Any, base: list[str], point: Point, config: AdviseConfig, ctx: JobContext,
               role: str, number: int | None) -> DictConfig:  # fmt: skip
    cfg = composer([*base, *point.overrides()])
    cfg.mlflow.log_system_metrics = False
    cfg.trainer.progress = "off"
    cfg.checkpoint_dir = None
    tags = {"label": point.candidate.name, "embcomp.role": role, "embcomp.point": point.key,
            "embcomp.settings": point.settings(), **({"embcomp.trial": str(number)} if number is not None else {})}
    with open_dict(cfg.mlflow.tags):
        cfg.mlflow.tags.update(tags)
    cfg.mlflow.run_name = f"{point.candidate.name}-{cfg.budget}-" + (f"trial{number}" if number is not None else role)
    if config.epoch_fraction is not None:
        steps = math.ceil(config.epoch_fraction * ctx.train_rows / cfg.trainer.batch_size)
        cfg.trainer.max_steps_per_epoch = max(1, steps)
    if role == "search" and not config.grid:
        cfg.evaluate_test = False
        cfg.seeds = None
    else:  # finalists: fresh seeds; the grid: seed, seed+1, ...
        first = int(cfg.seed) + (0 if config.grid else 1)
        cfg.seeds = [first + i for i in range(config.seeds)]
        cfg.evaluate_test = True
    return cfg


def _run(cfg: DictConfig, out: Path, parent: str, callbacks: list[Callback]) -> JobSummary:
    """``run_job``, a job out of reach said as a ``BudgetError``, a job the store already
    holds complete (a retried trial, a resumed finalist) given from its summary on disk."""
    try:
        summary = run_job(cfg, out, parent_run_id=parent, callbacks=callbacks)
        assert summary is not None  # (one process)
        return summary
    except JobUnreachable as e:
        raise BudgetError(str(e)) from None
    except JobSkipped as e:
        path = out / "summary.json"
        if not path.is_file():
            raise BudgetError(f"{e}, but its summary {path} is missing") from None
        return JobSummary.from_json(json.loads(path.read_text()))


def _runner(composer: Any, base: list[str], root: Path, parent: str, config: AdviseConfig, ctx: JobContext) -> Any:
    def run(point: Point, number: int, callbacks: list[Callback]) -> JobSummary:
        cfg = _trial_cfg(composer, base, point, config, ctx, "search", number)
        return _run(cfg, root / "trials" / point.key, parent, callbacks)

    return run


def _conclude(study: Any, found: Found, base: list[str], cfg: DictConfig, config: AdviseConfig, composer: Any,
              root: Path, parent: str, ctx: JobContext, started: float, say: Callable[[str], None],
              name: str) -> Advice:  # fmt: skip
    """Finalists retrained with seeds, the answer decided, the report written and logged."""
    trials = study.get_trials(deepcopy=False)
    points = {p.key: p for ps in found.points.values() for p in ps}
    report_dir = Path(_resolve(config.report_dir)) / name
    summary = summarise_search(found, trials, config.seeds)
    if config.grid:
        rows = grid_rows(found, trials)
        cost = {"total_samples": spent_samples(study), "wall_s": time.monotonic() - started}
        text = write_grid(report_dir, rows, cost)
        say(text)
        _log(parent, report_dir, {"grid_samples": cost["total_samples"], "wall_s": cost["wall_s"]})
        return Advice("grid", None, [], found, cost, name, report_dir, parent, markdown=text, grid=rows)
    best = best_by_candidate(finished(study), reference=True)
    ref_trial = best.pop("none", None)
    chosen = sorted(best.values(), key=lambda t: float(t.value or 0.0), reverse=True)[: config.finalists]
    if ref_trial is not None:
        chosen.append(ref_trial)
    if not [t for t in chosen if t.params["candidate"] != "none"]:
        raise AdviseError("no candidate finished a trial that learned anything: give the search more compute "
                          "(advise.samples / advise.minutes) or fewer candidates")  # fmt: skip
    finals = []
    for i, t in enumerate(chosen):
        point = points[t.user_attrs["point"]]
        say(f"[advise] finalist {i + 1}/{len(chosen)}: {point.candidate.name} {point.settings()}, {config.seeds} seeds")
        fcfg = _trial_cfg(composer, base, point, config, ctx, "finalist", None)
        finals.append(Finalist.of(point, _run(fcfg, root / "finalists" / point.key, parent, []), float(t.value or 0.0)))
    answer = decide(finals)
    line = answer_line(answer, finals, str(cfg.budget))
    search_samples = spent_samples(study)
    final_samples = sum(f.samples() for f in finals)
    cost = {"search_samples": search_samples, "finalist_samples": final_samples,
            "total_samples": search_samples + final_samples, "wall_s": time.monotonic() - started,
            "grid_samples": summary.grid_samples, "seeds": float(config.seeds),
            "budget_samples": config.samples or (config.epochs * ctx.train_rows if config.epochs else 0.0)}  # fmt: skip
    md = advice_markdown(line, finals, summary, found, cost, str(cfg.budget), name)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "advice.md").write_text(md)
    yaml_path = None
    if answer is not None:
        yaml_path = report_dir / "experiment" / "advised.yaml"
        yaml_path.parent.mkdir(parents=True, exist_ok=True)
        yaml_path.write_text(experiment_yaml(base, answer.point, config.seeds, line))
    write_json(report_dir / "advice.json", {
        "line": line, "study": name, "budget": str(cfg.budget), "target_bytes": found.target_bytes, "cost": cost,
        "answer": answer.name if answer else None, "refused": found.refused,
        "finalists": [{"candidate": f.name, "settings": f.point.settings(), "rank": f.rank, "failed": f.failed,
                       "val_auc": f.val.__dict__, "test_auc": f.test.__dict__,
                       "delta_test_auc": f.delta.__dict__ if f.delta else None, "per_seed": f.per_seed} for f in finals],
        "search": summary.rows,
    })  # fmt: skip
    metrics = {k: v for k, v in cost.items() if isinstance(v, float)}
    if answer is not None:
        metrics.update(answer_test_auc=answer.test.mean, answer_val_auc=answer.val.mean)
        if answer.delta is not None:
            metrics.update(answer_delta_auc=answer.delta.mean, answer_delta_auc_ci95=answer.delta.ci95)
    _log(parent, report_dir, metrics, answer.name if answer else None)
    say(md)
    say(f"[advise] {line}")
    if yaml_path is not None:
        say(f"[advise] config: {yaml_path}  (python -m experiments.run -cd {yaml_path.parent.parent} experiment=advised)")
    return Advice(line, answer, finals, found, cost, name, report_dir, parent, yaml_path, md)


def _log(parent: str, report_dir: Path, metrics: dict[str, float], answer: str | None = None) -> None:
    client = mlflow.MlflowClient()
    for k, v in metrics.items():
        if v == v:
            client.log_metric(parent, k, float(v))
    if answer is not None:
        client.set_tag(parent, "embcomp.answer", answer)
    for path in sorted(report_dir.rglob("*")):
        if path.is_file():
            client.log_artifact(parent, str(path), artifact_path="report" + ("/" + str(path.parent.relative_to(report_dir))
                                                                            if path.parent != report_dir else ""))  # fmt: skip
