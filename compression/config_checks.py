"""Valid ranges declared in the config dataclasses themselves, checked in one walk.

A field says what it accepts where it is declared: ``epochs: int = bounded(3, ge=1)``,
``dropout: float = bounded(0.0, ge=0, lt=1)``, ``structure: str = one_of("stacked",
"stacked", "parallel")``. ``check_fields(obj)`` walks a dataclass (and the dataclasses,
lists and dicts inside it) and raises ``ConfigError`` naming the first bad key by its
dotted path, e.g. ``trainer.batch_size: must be >= 1, got 0``. The experiments layer
runs it on every job's composed config before any data is read; the library's config
classes can run it in ``__post_init__``.

Example::

    @dataclass
    class Cfg:
        epochs: int = bounded(3, ge=1)

    check_fields(Cfg(epochs=0), "trainer")   # ConfigError: trainer.epochs: must be >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from compression.errors import ConfigError

__all__ = ["ConfigError", "bounded", "check_fields", "one_of", "unknown_key"]


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    each: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field whose numbers must lie in the given range (None passes: an unset
    optional); ``each``: the field is a list and every element must."""
    meta = {"range": {"ge": ge, "gt": gt, "le": le, "lt": lt}, "each": each}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def one_of(default: Any, *choices: Any) -> Any:
    """A dataclass field that must be one of ``choices``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def _range_error(value: Any, r: Mapping[str, float | None]) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {value!r}"
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, got nan"
    for op, bound in r.items():
        if bound is None:
            continue
        ok = {"ge": value >= bound, "gt": value > bound, "le": value <= bound, "lt": value < bound}[op]
        if not ok:
            sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
            shown = f"{int(bound)}" if float(bound).is_integer() else f"{bound:g}"  # 2147483647, not 2.14748e+09
            return f"must be {sign} {shown}, got {value!r}"
    return None


def check_fields(obj: Any, prefix: str = "", error: type[ConfigError] = ConfigError) -> None:
    """Raise ``error`` (a ``ConfigError``) for the first field of ``obj`` (a dataclass,
    recursively) outside its declared range or choices."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise error(f"{key}: must be one of {', '.join(map(str, f.metadata['choices']))}, got {value!r}")
        if "range" in f.metadata and value is not None:
            values = list(value) if f.metadata.get("each") else [value]
            for i, v in enumerate(values):
                if (msg := _range_error(v, f.metadata["range"])) is not None:
                    where = f"{key}[{i}]" if f.metadata.get("each") else key
                    raise error(f"{where}: {msg}")
        _check_nested(value, key, error)


def _check_nested(value: Any, key: str, error: type[ConfigError]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        check_fields(value, key, error)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_nested(v, f"{key}[{i}]", error)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_nested(v, f"{key}.{k}", error)


def unknown_key(obj: Any, keys: list[str]) -> str | None:
    """The first of ``keys`` that is not a field of the dataclass ``obj``'s type, or None."""
    names = {f.name for f in dataclasses.fields(obj)}
    return next((k for k in keys if k not in names), None)
