"""A stop (Ctrl-C, a scheduler's SIGTERM) told apart from a failure, also when it lands
inside a library's clean-up and comes out as that library's error."""

from __future__ import annotations

import pytest
from omegaconf.errors import ConfigKeyError

import experiments.advise.__main__ as advise_main
from experiments import interrupts
from experiments.interrupts import interrupted, stop_requested, terminated


def _raised(f) -> BaseException:
    try:
        f()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("nothing raised")


def _clean_up_fails_during(stop: BaseException):
    def f():
        try:
            raise stop
        finally:  # as OmegaConf's flag_override, whose restore failed on a half-built node
            raise ConfigKeyError("'NoneType' object has no attribute '_invalidate_flags_cache'")

    return f


def _wrapped(inner):
    def f():
        try:
            inner()
        except ConfigKeyError as e:
            raise RuntimeError("composing the trial's config") from e  # as Hydra's wrapper

    return f


@pytest.fixture(autouse=True)
def _no_signal_kept(monkeypatch):
    """A test that calls ``terminated`` keeps its signal to itself, not for the worker's
    later tests."""
    monkeypatch.setattr(interrupts, "_RECEIVED", [])


def test_a_stop_inside_a_clean_up_is_still_a_stop():
    assert interrupted(_raised(_wrapped(_clean_up_fails_during(KeyboardInterrupt()))))
    assert not interrupted(_raised(_wrapped(_clean_up_fails_during(ValueError("a real failure")))))
    assert not interrupted(_raised(lambda: 1 / 0))
    looped = ValueError("a")
    looped.__context__ = ValueError("b")
    looped.__context__.__context__ = looped
    assert not interrupted(looped)


def test_after_a_sigterm_any_error_is_the_stop():
    """SIGTERM's KeyboardInterrupt swallowed where it landed (a finalizer) or replaced by a
    library's error raised later with no chain to it: the error still reads as the stop."""
    failure = _raised(lambda: 1 / 0)
    assert not interrupted(failure) and not stop_requested()
    assert interrupted(_raised(lambda: terminated(15, None)))
    assert stop_requested() and interrupted(failure)


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt(), 130), (ValueError("no"), None)])
def test_advise_exits_130_for_a_stop_that_came_out_as_a_config_error(monkeypatch, capsys, stop, code):
    """The SIGTERM of a fresh-clone run landed while Hydra composed a trial's config: the
    search exited 1 with a traceback, where a stop must exit 130 and say how to resume."""

    def advise(job, config, argv):
        _wrapped(_clean_up_fails_during(stop))()

    monkeypatch.setattr(advise_main, "advise", advise)
    if code is None:  # a failure that is not a stop is not taken for one
        with pytest.raises(RuntimeError, match="composing"):
            advise_main.main(["dataset=criteo_sample"])
        return
    assert advise_main.main(["dataset=criteo_sample"]) == code
    assert "run the same command again to resume" in capsys.readouterr().err
