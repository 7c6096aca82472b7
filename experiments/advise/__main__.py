"""``python -m experiments.advise dataset=<...> budget=10x advise.samples=2e7``: see the package.

Arguments ``advise.<key>=<value>`` set ``AdviseConfig``; every other argument is a Hydra
override of the job (as ``python -m experiments.run`` takes them). Bad input (a config
that cannot be right, no candidate at the budget, a compute budget too small for one
rung) ends with one line on stderr and exit status 1, before any training.
"""

from __future__ import annotations

import signal
import sys

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compression.config_checks import ConfigError
from experiments.advise import AdviseConfig, AdviseError, advise
from experiments.config import register_configs
from experiments.interrupts import interrupted, terminated
from experiments.run import USER_ERRORS, _quiet_libraries

PREFIX = "advise."


def parse(argv: list[str]) -> tuple[list[str], AdviseConfig]:
    """Split ``argv`` into the job's Hydra overrides and the search's config."""
    mine = [a[len(PREFIX):] for a in argv if a.startswith(PREFIX)]
    job = [a for a in argv if not a.startswith(PREFIX)]
    register_configs()  # (the ${project_root:} resolver of advise.dir)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(AdviseConfig), OmegaConf.from_dotlist(mine))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else None
        raise AdviseError(str(cause) if cause else f"advise: {str(e).splitlines()[0]}") from None
    assert isinstance(config, AdviseConfig)
    return job, config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    _quiet_libraries()
    signal.signal(signal.SIGTERM, terminated)  # a scheduler's cancel: the trial's point goes back in the queue
    try:
        job, config = parse(argv)
        advise(job, config, argv=argv)
    except BaseException as e:
        if interrupted(e):
            print("interrupted: run the same command again to resume the study", file=sys.stderr)
            return 130
        if isinstance(e, USER_ERRORS):  # AdviseError among them
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
