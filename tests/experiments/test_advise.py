"""``make advise``: candidates, the search (a real Optuna study in SQLite, real training on
the Criteo sample, a real MLflow store), the answer, resuming and sharing a study, and
the one-line refusals of what cannot be searched."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from optuna.trial import TrialState

from experiments.advise import AdviseConfig, AdviseError, advise
from experiments.advise.__main__ import main, parse
from experiments.advise.search import storage
from experiments.job_summary import JobSummary
from tests.experiments.conftest import CONF, REPO

TINY = ["model.deep_layers=[32]", "model.cross_layers=1", "trainer.batch_size=512"]


def job(tmp: Path, *extra: str) -> list[str]:
    return ["dataset=criteo_sample", "model=dcnv2", "trainer=smoke", "trainer.epochs=3", *TINY, "budget=10x",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"cache_dir={tmp}/cache", *extra]  # fmt: skip


def where(tmp: Path, **kw) -> AdviseConfig:
    return AdviseConfig(dir=str(tmp / "out"), report_dir=str(tmp / "reports"), **kw)


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "experiments.advise", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def trials(tmp: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    s = optuna.load_study(study_name=study, storage=f"sqlite:///{tmp}/out/{study}/study.db")
    return s.get_trials(deepcopy=False)


def test_advise_answers_on_validation_with_its_evidence(tmp_path):
    config = where(tmp_path, methods=["hashing", "qr"], epochs=40, seeds=2, finalists=2)
    said: list[str] = []
    advice = advise(job(tmp_path), config, say=said.append)
    assert advice is not None and advice.answer is not None
    # progress a person can follow: each trial's round and result, rungs, the best so far, the spend
    assert any(x.startswith("[advise] trial 1 (") and "round 0" in x and "samples" in x for x in said)
    assert any("(a rung): validation AUC" in x for x in said) and any(" · best " in x for x in said)
    assert advice.answer.name in ("hashing", "qr") and advice.answer.rank == "answer"
    ref = next(f for f in advice.finalists if f.point.candidate.reference)
    assert ref.name == "none" and advice.answer.delta is not None and advice.answer.delta.n == 2
    # the answer is the best mean validation AUC among the finalists that learned
    others = [f for f in advice.finalists if f is not advice.answer and not f.point.candidate.reference]
    assert all(f.val.mean <= advice.answer.val.mean for f in others)
    assert advice.line.startswith(f"use {advice.answer.name} (") and "against the tuned full table" in advice.line
    assert "10x" in advice.line and "bytes" in advice.line
    # the budget was kept, the finalists included (they train on fresh seeds 1, 2)
    assert advice.cost["total_samples"] <= 40 * 8000 * 1.05
    assert sorted(advice.answer.per_seed) == ["1", "2"]
    md = (advice.report_dir / "advice.md").read_text()
    assert advice.line in md and "## The search" in md and "## Cost" in md and "full grid" in md

    # the search never read the test split; the finalists did, once per seed
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["advise"], output_format="list", max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("embcomp.kind") == "advise")
    assert parent.info.status == "FINISHED" and parent.data.tags["embcomp.answer"] == advice.answer.name
    search = [r for r in runs if r.data.tags.get("embcomp.role") == "search"]
    assert search and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in search)
    assert all("test_auc" not in r.data.metrics for r in search)
    assert {r.data.tags.get("embcomp.status") for r in search} <= {"complete", "pruned"}
    finals = [r for r in runs if r.data.tags.get("embcomp.role") == "finalist" and r.data.tags.get("seed")]
    assert finals and all("test_auc" in r.data.metrics for r in finals)
    study = trials(tmp_path, advice.study)
    pruned = [t for t in study if t.state == TrialState.PRUNED and "skipped" not in t.user_attrs]
    for t in pruned:  # a pruned trial's run says so, and its reason
        run = next(r for r in search if r.data.tags.get("embcomp.trial") == str(t.number))
        assert run.data.tags["embcomp.status"] == "pruned" and "stopped after epoch" in run.data.tags["embcomp.reason"]

    # the winning config is a Hydra experiment file that experiments.run composes as the answer
    assert advice.yaml_path is not None
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=advised", f"hydra.searchpath=[file://{advice.yaml_path.parent.parent}]"])
    GlobalHydra.instance().clear()
    settings = dict(kv.split("=", 1) for kv in advice.answer.point.settings().split())
    assert cfg.compression.budget.ratio == 10 and cfg.dataset.name == "criteo_sample" and cfg.seeds == 2
    assert float(cfg.trainer.sparse_lr) == float(settings["sparse_lr"])
    assert str(cfg.compression.get("combine", "")) == settings.get("combine", "")


def test_a_constant_predictor_is_never_the_answer(tmp_path):
    """A model that learned nothing (validation AUC within noise of 0.5) is not a finalist."""
    from experiments.advise.answer import Finalist, decide
    from experiments.advise.candidates import Candidate, Point

    def fin(name, aucs, reference=False):
        m = [{"final_val_auc": a, "final_val_logloss": 0.69 if a < 0.51 else 0.5, "final_val_base_logloss": 0.66,
              "final_val_rows": 5000.0, "final_val_positives": 1500.0, "test_auc": a} for a in aucs]  # fmt: skip
        point = Point(Candidate(name, name, reference=reference), (), 0)
        return Finalist.of(point, JobSummary(run_id="", run_name="", experiment="", parent_run_id=None, tags={}, metrics={},
                                             per_seed={str(i): x for i, x in enumerate(m)}))  # fmt: skip

    constant, learned, ref = fin("optembed", [0.5001, 0.4999, 0.5000]), fin("hashing", [0.70, 0.71, 0.69]), fin("none", [0.75] * 3, True)
    assert constant.failed and "within noise of 0.5" in constant.failed and learned.failed is None
    assert decide([constant, learned, ref]) is learned
    assert decide([constant, ref]) is None


@pytest.mark.parametrize(
    "extra, advise_args, says",
    [
        (["budget=100000x"], ["advise.methods=[hashing,qr]"], "no candidate meets 100000x: hashing: hashing cannot reach"),
        ([], ["advise.methods=[]"], "no candidate meets 10x: no methods to consider"),
        ([], ["advise.methods=[hashing]", "advise.exclude=[hashing]"], "no methods to consider"),
        ([], ["advise.methods=[no_such_method]"], "no_such_method: "),
        ([], ["advise.methods=[hashing]", "advise.samples=100"], "advise.samples=100 is below one rung"),
        ([], ["advise.methods=[hashing]", "advise.max_step_ratio=0.01"],
         "no candidate meets 10x and the constraints: hashing: training step"),
        ([], ["advise.seeds=1"], "advise.seeds: must be >= 2, got 1"),
        ([], ["advise.precisions=[int3]"], "advise.precisions: each must be one of"),
        ([], ["advise.nope=1"], "advise: Key 'nope' not in 'AdviseConfig'"),
    ],
)
def test_what_cannot_be_searched_is_refused_in_one_line_before_training(tmp_path, capsys, extra, advise_args, says):
    code = main([*job(tmp_path, *extra), f"advise.dir={tmp_path}/out", f"advise.report_dir={tmp_path}/reports", *advise_args])
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and says in lines[0], err[-2000:]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("trials"))  # nothing trained


def test_advise_needs_a_memory_budget(tmp_path, capsys):
    args = [a for a in job(tmp_path) if not a.startswith("budget=")]
    assert main([*args, f"advise.dir={tmp_path}/out", "advise.methods=[hashing]"]) == 1
    assert "error: advise needs the memory budget to answer for" in capsys.readouterr().err


def _wait_for(pred, timeout: float, what: str, every: float = 0.5) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def _finished(tmp: Path, study: str) -> int:
    db = tmp / "out" / study / "study.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return con.execute("select count(*) from trials where state in ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.OperationalError:  # (the tables are not created yet)
        return 0


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_search_resumes_without_training_a_finished_trial_again(tmp_path, how):
    args = [*job(tmp_path), f"advise.dir={tmp_path}/out", f"advise.report_dir={tmp_path}/reports",
            "advise.methods=[hashing,qr]", "advise.epochs=200", "advise.seeds=2", "advise.finalists=1",
            "advise.heartbeat_s=1", "advise.defaults_only=true"]  # fmt: skip
    study = "criteo_sample-dcnv2-10x-defaults"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # its output to files, not pipes: a pipe nobody reads while the search runs fills up (64 KiB)
    # and blocks the search on its next write, so no trial would ever finish
    with open(tmp_path / "stdout", "w") as out_file, open(tmp_path / "stderr", "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.advise", *args], cwd=REPO, env=env,
                                stdout=out_file, stderr=err_file, text=True)  # fmt: skip
        try:
            # the kill as soon as the first trial is recorded: the rest of the search takes
            # seconds, and a kill after its end tests nothing
            _wait_for(lambda: _finished(tmp_path, study) >= 1, 300, "a finished trial", every=0.05)
            ended_first = proc.poll()
            os.kill(proc.pid, how)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = (tmp_path / "stderr").read_text()
    assert ended_first is None, f"the search ended (exit {ended_first}) before the kill:\n{err[-6000:]}"
    before = {t.number: t for t in trials(tmp_path, study)}
    done_before = {t.user_attrs["point"] for t in before.values() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert done_before
    if how == signal.SIGTERM:
        assert proc.returncode == 130 and "run the same command again to resume" in err, err[-6000:]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-8000:]
    after = trials(tmp_path, study)
    finished = [t for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    points = [t.user_attrs["point"] for t in finished]
    assert len(points) == len(set(points)) == 3  # none, hashing, qr: each once, none lost
    for t in finished:  # what had finished before the kill was not trained again
        if t.user_attrs["point"] in done_before:
            assert t.number in before and before[t.number].state == t.state
    assert (tmp_path / "reports" / study / "advice.md").is_file()


def test_a_stop_while_a_trained_trial_is_recorded_loses_no_point(tmp_path):
    """Ctrl-C after a trial trained, while its results are written (here: as its progress
    line is said), before Optuna records it: its point goes back in the queue, and the
    next run trains every point once."""
    config = where(tmp_path, methods=["hashing", "qr"], epochs=200, seeds=2, finalists=1, defaults_only=True)
    study = "criteo_sample-dcnv2-10x-defaults"

    def say(line: str) -> None:
        if line.startswith("[advise] trial 2 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        advise(job(tmp_path), config, say=say)
    stopped = [t for t in trials(tmp_path, study) if t.number == 1]
    assert stopped and stopped[0].state == TrialState.FAIL and "trained_samples" in stopped[0].user_attrs
    queued = [t for t in trials(tmp_path, study) if t.state == TrialState.WAITING]
    assert stopped[0].user_attrs["point"] in {t.user_attrs["point"] for t in queued}
    advise(job(tmp_path), config, say=lambda _: None)
    finished = [t for t in trials(tmp_path, study) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    points = [t.user_attrs["point"] for t in finished]
    assert len(points) == len(set(points)) == 3  # none, hashing, qr: each once, none lost


def _open_storages(root, rounds, barrier, results):
    for i in range(rounds):  # every process opens the same new file at once, round after round
        barrier.wait()
        try:
            storage(f"sqlite:///{root}/{i}/study.db")
            results.put("ok")
        except Exception as e:  # noqa: BLE001 (the test reports what each process met)
            results.put(f"{type(e).__name__}: {str(e).splitlines()[0]}")


def test_processes_opening_a_new_study_file_at_once_all_open_it(tmp_path):
    """Workers started together on a new SQLite file each create Optuna's schema; without
    one-at-a-time creation most rounds end with 'table ... already exists' in all but one."""
    ctx = multiprocessing.get_context("spawn")
    n, rounds = 4, 12
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_storages, args=(tmp_path, rounds, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in range(n * rounds)]
    for p in procs:
        p.join(60)
    assert [g for g in got if g != "ok"] == []


def _pop_queue(url, barrier, results):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="q", storage=storage(url))
    barrier.wait()
    got = []
    try:
        while True:
            trial = study.ask()  # the next queued trial, or a new one when the queue is empty
            if "q" not in trial.user_attrs:
                study.tell(trial, state=TrialState.FAIL)
                break
            got.append(trial.user_attrs["q"])
            study.tell(trial, 1.0)
    except Exception as e:  # noqa: BLE001 (the test reports what each process met)
        got.append(f"{type(e).__name__}: {e}")
    results.put(got)


def test_workers_popping_one_queue_each_get_different_trials(tmp_path):
    """Four processes take queued trials from one SQLite study at once: each trial goes to
    one of them (with SQLite's deferred transactions two read it waiting and both ran it,
    and one then failed: 'Cannot tell a COMPLETE trial')."""
    url = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="q", storage=storage(url))
    for i in range(40):
        study.enqueue_trial({}, user_attrs={"q": i})
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_pop_queue, args=(url, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [x for _ in procs for x in results.get(timeout=300)]
    for p in procs:
        p.join(60)
    assert all(isinstance(x, int) for x in got), [x for x in got if not isinstance(x, int)]
    assert sorted(got) == list(range(40))  # each queued trial once


def test_workers_share_one_study_with_no_trial_lost_or_run_twice(tmp_path):
    """A worker started on its own (as on another machine, same storage) waits for the plan
    and joins; the main process adds one more of its own (advise.workers=2)."""
    args = [*job(tmp_path, "trainer.epochs=2"), f"advise.dir={tmp_path}/out", f"advise.report_dir={tmp_path}/reports",
            "advise.methods=[hashing,qr]", "advise.epochs=2000", "advise.seeds=2", "advise.finalists=1"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open(tmp_path / "worker.out", "w") as out_file, open(tmp_path / "worker.err", "w") as err_file:
        joined = subprocess.Popen([sys.executable, "-m", "experiments.advise", *args, "advise.worker_only=true"],
                                  cwd=REPO, env=env, stdout=out_file, stderr=err_file, text=True)  # (files: a pipe fills)
        try:
            r = cli(*args, "advise.workers=2")
            joined.wait(timeout=300)
        finally:
            if joined.poll() is None:
                joined.kill()
    out, err = (tmp_path / "worker.out").read_text(), (tmp_path / "worker.err").read_text()
    assert r.returncode == 0, r.stderr[-3000:]
    assert joined.returncode == 0, err[-3000:]
    ts = [t for t in trials(tmp_path, "criteo_sample-dcnv2-10x") if "point" in t.user_attrs]
    done = [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    points = [t.user_attrs["point"] for t in done]
    assert len(points) == len(set(points)), "a point was trained twice"
    assert len(points) == 30, "a point was lost"  # hashing 6, qr 18, the full table 6
    assert not [t for t in ts if t.state in (TrialState.WAITING, TrialState.RUNNING)], "a trial was left behind"
    assert len({t.user_attrs["worker"] for t in done if "worker" in t.user_attrs}) >= 2
    assert "[advise] use " in r.stdout and "[advise] use " not in out  # the answer is the main process's


def test_command_line_splits_advise_keys_from_the_job():
    job_args, config = parse(["dataset=movielens_100k", "budget=10x", "advise.samples=2e6", "advise.precisions=[fp32,int4]"])
    assert job_args == ["dataset=movielens_100k", "budget=10x"]
    assert config.samples == 2e6 and config.precisions == ["fp32", "int4"] and config.minutes is None
    assert parse(["budget=10x"])[1].minutes == 60  # a budget when none is given


def test_an_unknown_method_name_is_refused_with_the_others_kept(tmp_path):
    from experiments.advise import _Composer
    from experiments.advise.candidates import find_candidates, job_context

    composer = _Composer()
    base = job(tmp_path)
    found = find_candidates(composer, base, where(tmp_path, methods=["hashing", "nope"], precisions=["fp32", "int4"]),
                            job_context(composer(base)))  # fmt: skip
    names = [c.name for c in found.candidates]
    assert names[0] == "none" and "hashing" in names and "hashing+int4" in names
    assert "nope" in found.refused and "none+int4" in found.refused  # int4 tables hold 8x at dim 16, not 10x
    plan = found.plan()
    assert [p.round for p in plan[: len(names)]] == [0] * len(names)  # every candidate's defaults first
    assert all(p.default for p in plan[: len(names)])
    int4 = found.points["hashing+int4"][0].overrides()
    assert "+compression.quantization.precision=int4" in int4


def test_a_study_planned_for_other_candidates_is_refused(tmp_path):
    from experiments.advise.candidates import Candidate, Point
    from experiments.advise.search import open_study, plan_study

    config = where(tmp_path, methods=["hashing"])
    study = open_study(f"sqlite:///{tmp_path}/study.db", "s", config)
    plan = [Point(Candidate("hashing", "hashing", space=(("trainer.sparse_lr", (0.1, 0.2)),)), (("trainer.sparse_lr", v),), i)
            for i, v in enumerate((0.1, 0.2))]  # fmt: skip
    plan_study(study, plan, "digest-a")
    plan_study(study, plan, "digest-a")  # a resumed search queues nothing again
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2
    with pytest.raises(AdviseError, match="was planned for other candidates"):
        plan_study(study, plan[:1], "digest-b")


def test_only_epochs_of_a_model_at_its_budget_are_ranked():
    """A supernet's or a full-size search's validation AUC is not the method's at the
    budget (AutoSrh's search stage scored 0.8708 on frappe_shaped, its deployed model
    0.8638): those epochs count toward the cost but are not reported to the pruner."""
    from compression.stages import Stage
    from experiments.advise.pruner import PerCandidateHalving
    from experiments.advise.search import _Report

    study = optuna.create_study(direction="maximize", pruner=PerCandidateHalving(1, 3))
    trial = study.ask()
    report = _Report(trial, prune=True, say=lambda _: None)
    report.on_stage_start(Stage("search", at_budget=False), 3)
    for e, auc in enumerate([0.87, 0.871]):
        report.on_epoch_end(e, {"val_auc": auc, "trained_samples": 100.0 * (e + 1)}, 0)
    report.on_stage_start(Stage("select"), 3)
    report.on_stage_start(Stage("retrain"), 3)
    report.on_epoch_end(0, {"val_auc": 0.86, "trained_samples": 300.0}, 0)
    frozen = study.trials[0]
    assert frozen.intermediate_values == {3: 0.86} and frozen.user_attrs["trained_samples"] == 300.0


def test_successive_halving_ranks_a_trial_against_its_rivals_only():
    from experiments.advise.pruner import PerCandidateHalving

    pruner = PerCandidateHalving(min_resource=1, reduction_factor=3)
    assert [s for s in range(1, 30) if pruner.is_rung(s)] == [1, 3, 9, 27]
    study = optuna.create_study(direction="maximize", pruner=pruner)

    def trial(candidate, group, curve):
        study.enqueue_trial({"candidate": candidate}, user_attrs={"group": group})  # as the search queues points
        t = study.ask({"candidate": optuna.distributions.CategoricalDistribution(["a", "b", "none"])})
        assert t.params["candidate"] == candidate
        pruned_at = None
        for step, v in enumerate(curve, 1):
            t.report(v, step)
            if t.should_prune():
                pruned_at = step
                break
        study.tell(t, state=TrialState.PRUNED) if pruned_at else study.tell(t, max(curve))
        return pruned_at

    assert trial("a", "defaults", [0.70, 0.72, 0.74]) is None  # the first goes on: no rival yet
    assert trial("b", "defaults", [0.60, 0.61, 0.62]) == 1  # another default, behind at epoch 1
    assert trial("none", "none", [0.50, 0.55, 0.60]) is None  # the full table is nobody's rival
    assert trial("b", "b", [0.65, 0.70, 0.71]) is None  # b's tuning meets b's default only, and leads it
    assert trial("a", "a", [0.69, 0.73, 0.75]) == 1  # a's tuning is behind a's default at epoch 1


def test_constraints_refuse_what_cannot_shard_and_keep_what_exports(tmp_path):
    from experiments.advise import _Composer
    from experiments.advise.candidates import find_candidates, job_context

    composer = _Composer()
    base = job(tmp_path)
    ctx = job_context(composer(base))
    found = find_candidates(composer, base, where(tmp_path, methods=["hashing", "itep"], shardable=True), ctx)
    assert [c.name for c in found.candidates] == ["none", "hashing"]
    assert found.refused["itep"].startswith("not shardable: itep")
    found = find_candidates(composer, base, where(tmp_path, methods=["hashing"], exportable=True), ctx)
    assert [c.name for c in found.candidates] == ["none", "hashing"] and not found.refused
