"""A job's stop by Ctrl-C or by a scheduler's SIGTERM, told apart from its failures."""

from __future__ import annotations

# the signals terminated() has taken in this process
_RECEIVED: list[int] = []


def terminated(signum: int, frame: object) -> None:
    """SIGTERM's handler: the stop Ctrl-C makes (a KeyboardInterrupt), so that a job ends
    as KILLED and a search puts its trial's point back in the queue. The signal is kept:
    a library may turn the KeyboardInterrupt into an error of its own with no trace of it."""
    _RECEIVED.append(signum)
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def stop_requested() -> bool:
    """Whether this process has been sent SIGTERM (``terminated`` took it)."""
    return bool(_RECEIVED)


def interrupted(e: BaseException) -> bool:
    """Whether ``e`` is such a stop, or an error raised while one unwound: the
    KeyboardInterrupt can land inside a library's own clean-up (in OmegaConf's, while Hydra
    composes a config, it comes out as a ConfigCompositionException whose chain holds it),
    and a stop must still be taken for a stop, not a failure. Any error after a SIGTERM
    is taken for the stop too: where the KeyboardInterrupt landed in a finalizer or was
    replaced by a library's error raised later, the chain no longer shows it."""
    if stop_requested():
        return True
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False
