"""What a search may spend and consider: ``advise.*`` on the command line.

Everything else of a job (dataset, model, trainer, budget) is the job's own Hydra
config, composed as ``experiments.run`` composes it; these keys say how much compute
the search may use, which candidates it may consider, and how it stops trials early.

Example::

    python -m experiments.advise dataset=movielens_100k budget=10x advise.samples=2e7
    AdviseConfig(samples=2e7, precisions=["fp32", "int8"], max_step_ratio=1.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from compression.config_checks import ConfigError, bounded, check_fields

PRECISIONS = ("fp32", "fp16", "int8", "int4", "int2")
# the compute budget when none is given
DEFAULT_MINUTES = 60.0


@dataclass
class AdviseConfig:
    """How a search (``make advise``) spends its compute.

    The compute budget covers the whole answer (search trials, the finalists' seeds, the
    tuned full table): ``samples`` (training samples), ``epochs`` (the same in passes over
    the training split) and ``minutes`` (wall time of this invocation; 60 when none of the
    three is set); the search stops at whichever comes first and keeps what the
    finalists will need.
    """

    samples: Optional[float] = bounded(None, gt=0)
    epochs: Optional[float] = bounded(None, gt=0)
    minutes: Optional[float] = bounded(None, gt=0)
    # table precisions a candidate may deploy: fp32 plus any of fp16/int8/int4/int2 (a
    # method under a 10x budget with int4 rows then needs only about 2.5x of its own)
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    # compression configs (conf/compression/<name>.yaml) to consider; None: every
    # registered method under its own name. `exclude` drops some of them.
    methods: Optional[list[str]] = None
    exclude: list[str] = field(default_factory=list)
    # constraints: training step at most this many times the full table's (measured
    # interleaved in one process), shardable by TorchRec's DMP, exportable (torch.export)
    max_step_ratio: Optional[float] = bounded(None, gt=0)
    shardable: bool = False
    exportable: bool = False
    # candidates retrained with `seeds` fresh seeds at the end, beside the tuned full table
    finalists: int = bounded(3, ge=1)
    seeds: int = bounded(3, ge=2)
    # successive halving: a trial reports validation AUC after each epoch; at epoch
    # min_epochs * reduction_factor^k it goes on only if it is in the top 1/reduction_factor
    # of its candidate's trials there. epoch_fraction: an "epoch" is this share of the
    # training split (big data: validate and decide more often than once a pass)
    min_epochs: int = bounded(1, ge=1)
    reduction_factor: int = bounded(3, ge=2)
    epoch_fraction: Optional[float] = bounded(None, gt=0, le=1)
    # the Optuna study: its name (default <dataset>-<model>-<budget>[-precisions]), its
    # storage (an RDB URL, e.g. postgresql://...; default SQLite under dir/<study>/)
    study: Optional[str] = None
    storage: Optional[str] = None
    dir: str = "${project_root:}/outputs/advise"
    report_dir: str = "${project_root:}/reports/advise"
    # worker processes on this machine sharing the study; worker_only: join a study
    # another process planned (another machine, same storage) and run trials, no answer
    workers: int = bounded(1, ge=1)
    worker_only: bool = False
    # seconds between a running trial's heartbeats; after 6 missed ones (a worker killed
    # outright) the trial is failed and its point queued again
    heartbeat_s: int = bounded(10, ge=1)
    # the brute-force comparison: every planned point, `seeds` seeds each, to convergence,
    # no early stopping and no compute budget, the test split read for each
    grid: bool = False
    # only each candidate's default settings (no tuning): with grid, the default grid
    defaults_only: bool = False
    # orders the plan (which settings of a candidate are tried first)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "advise")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ConfigError(f"advise.precisions: each must be one of {', '.join(PRECISIONS)}, got {self.precisions}")
        if not self.grid and self.samples is None and self.epochs is None and self.minutes is None:
            self.minutes = DEFAULT_MINUTES
