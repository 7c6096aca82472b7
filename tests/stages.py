"""A callback the resume tests share: interrupt training at one step of one stage."""

from __future__ import annotations

from typing import Any

from recsys.training import Callback


class StopAt(Callback):
    """Raise ``KeyboardInterrupt`` (as Ctrl-C would) at ``(stage name, step)``."""

    def __init__(self, at: tuple[str, int]) -> None:
        self.at, self.stage = at, None

    def on_stage_start(self, stage: Any, n: int) -> None:
        self.stage = stage.name

    def on_step(self, step: int, metrics: Any) -> None:
        if (self.stage, step) == self.at:
            raise KeyboardInterrupt
