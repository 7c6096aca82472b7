"""Generated tables for the tabular loader: the shipped example, Frappe-shaped splits, benchmark files.

Every table has a planted logistic signal (per-value effects summed), so a model trained
on it beats AUC 0.5, and values drawn from a Zipf law, so that vocabularies and counts
look like click logs. All are pure functions of their arguments.

* ``example``: ``data/tabular-example/clicks.csv``, what ``dataset=tabular_example`` reads
  (every role: a 0/1 label, integer and string categoricals, a ``|``-separated multi-hot
  column, numeric columns with empty values, and a column to ignore);
* ``frappe``: three CSV splits with the header of the published Frappe CSV (``label,user,
  item,daytime,weekday,isweekend,homework,cost,weather,country,city``), its vocabulary
  sizes and its split sizes (202,027 / 57,722 / 28,860 rows);
* ``sparse-signal``: the same shape, the signal in ``user`` and ``item`` alone (a latent
  user-item affinity, heavy-tailed ids), the other fields noise: where row pruning must
  keep rare informative rows;
* ``bench``: one Parquet file of any size, written a row group at a time (flat memory).

Example::

    python -m recsys.data.tabular_synth example data/tabular-example/clicks.csv
    python -m recsys.data.tabular_synth frappe data/frappe-shaped
    python -m recsys.data.tabular_synth sparse-signal data/raw/sparse-signal
    python -m recsys.data.tabular_synth bench /tmp/t.parquet --rows 20000000
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.common import atomic_directory

FRAPPE_FIELDS = {  # name -> vocabulary size of the published Frappe CSV
    "user": 957, "item": 4082, "daytime": 7, "weekday": 7, "isweekend": 2,
    "homework": 3, "cost": 2, "weather": 9, "country": 80, "city": 233,
}
FRAPPE_ROWS = {"train": 202_027, "val": 57_722, "test": 28_860}
FRAPPE_FILES = {"train": "train.csv", "val": "valid.csv", "test": "test.csv"}
FRAPPE_WORDS = {
    "daytime": ["morning", "afternoon", "evening", "night", "noon", "sunrise", "sunset"],
    "weekday": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"],
    "isweekend": ["weekend", "workday"],
    "homework": ["home", "work", "unknown"],
    "cost": ["free", "paid"],
    "weather": ["sunny", "cloudy", "rainy", "foggy", "snowy", "drizzle", "stormy", "sleet", "unknown"],
}


class Field:
    """One categorical field: Zipf ranks, a value per rank, an effect per rank."""

    def __init__(self, rng: np.random.Generator, size: int, values: pa.Array, skew: float = 1.1, scale: float = 0.5):
        p = 1.0 / np.arange(1, size + 1) ** skew
        self.cdf = np.cumsum(p / p.sum())
        self.values = values
        self.effect = rng.normal(0.0, scale, size)

    @property
    def size(self) -> int:
        return len(self.cdf)

    def ranks(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(n)), self.size - 1)

    def take(self, ranks: np.ndarray) -> pa.Array:
        return pc.take(self.values, pa.array(ranks))


def _ints(rng: np.random.Generator, size: int, base: int = 0) -> pa.Array:
    """Integer values of a field, shuffled so that an id's value says nothing of its rank."""
    return pa.array(base + rng.permutation(size), type=pa.int64())


def _words(prefix: str, size: int) -> pa.Array:
    return pa.array([f"{prefix}{i}" for i in range(size)], type=pa.string())


def _labels(rng: np.random.Generator, logit: np.ndarray, bias: float = 0.0) -> np.ndarray:
    z = logit - logit.mean() + bias
    return (rng.random(len(z)) < 1.0 / (1.0 + np.exp(-z))).astype(np.int8)


def _tags(rng: np.random.Generator, field: Field, n: int, most: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row 0..most tag ranks: (offsets, flat ranks, per-row effect sum)."""
    lengths = rng.integers(0, most + 1, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = field.ranks(rng, int(offsets[-1]))
    effect = np.add.reduceat(np.append(field.effect[flat], 0.0), offsets[:-1]) * (lengths > 0)
    return offsets, flat, effect


def example_table(rows: int = 4000, seed: int = 0) -> pa.Table:
    """The example clicks table (see the module docstring)."""
    rng = np.random.default_rng(seed)
    user = Field(rng, 300, _ints(rng, 300, base=1000))
    item = Field(rng, 500, _words("item_", 500))
    country = Field(rng, 12, pa.array(["de", "fr", "us", "gb", "it", "es", "nl", "se", "pl", "jp", "br", "in"]))
    tag = Field(rng, 20, _words("tag", 20))
    u, i, c = user.ranks(rng, rows), item.ranks(rng, rows), country.ranks(rng, rows)
    offsets, flat, tag_effect = _tags(rng, tag, rows, 3)
    price = np.round(rng.lognormal(3.0, 1.0, rows), 2)
    age = rng.integers(18, 80, rows)
    logit = 3 * (user.effect[u] + item.effect[i] + country.effect[c] + tag_effect) + 0.02 * (age - 50)
    texts = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), tag.take(flat)), "|")
    no_country = rng.random(rows) < 0.05
    no_price = rng.random(rows) < 0.08
    return pa.table({
        "clicked": _labels(rng, logit, bias=-0.5),
        "user_id": user.take(u),
        "item": item.take(i),
        "country": pc.if_else(pa.array(no_country), pa.scalar("", pa.string()), country.take(c)),
        "tags": texts,
        "price": pa.array(price, mask=no_price),
        "age": pa.array(age),
        "session": pa.array([f"{x:08x}" for x in rng.integers(0, 2**32, rows)]),
    })


def write_example_csv(path: Path, rows: int = 4000, seed: int = 0) -> Path:
    """Write the example clicks CSV.

    Example::

        write_example_csv(Path("data/tabular-example/clicks.csv"))
    """
    import polars as pl

    df = pl.from_arrow(example_table(rows, seed))
    assert isinstance(df, pl.DataFrame)
    # an empty value as an empty field (polars quotes "" to tell it from null)
    df = df.with_columns(pl.when(pl.col(c) != "").then(pl.col(c)).alias(c) for c in ("country", "tags"))
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_csv(path)
    return path


def frappe_tables(seed: int = 0, rows: dict[str, int] | None = None) -> dict[str, pa.Table]:
    """Frappe-shaped splits; every value of every field occurs in train, so each
    vocabulary has exactly the published size."""
    rows = rows or FRAPPE_ROWS
    rng = np.random.default_rng(seed)
    fields = {}
    for name, size in FRAPPE_FIELDS.items():
        if name in FRAPPE_WORDS:
            values = pa.array(FRAPPE_WORDS[name])
        elif name == "country":
            values = _words("country_", size)
        else:
            values = _ints(rng, size)
        fields[name] = Field(rng, size, values, skew=0.9, scale=0.8)
    out = {}
    for split, n in rows.items():
        ranks = {name: f.ranks(rng, n) for name, f in fields.items()}
        if split == "train":  # each value at least once
            for name, f in fields.items():
                ranks[name][: f.size] = np.arange(f.size)
        logit = sum(fields[name].effect[r] for name, r in ranks.items())
        columns = {"label": _labels(rng, np.asarray(logit), bias=-0.8)}
        columns |= {name: fields[name].take(r) for name, r in ranks.items()}
        out[split] = pa.table(columns)
    return out


def sparse_signal_tables(seed: int = 0, rows: dict[str, int] | None = None, rank: int = 4) -> dict[str, pa.Table]:
    """Frappe-shaped splits whose signal lives in two heavy-tailed fields: a click is a
    user's affinity for an item (latent vectors of ``rank`` dims, a dot product, plus a
    bias each), ``user`` and ``item`` drawn from Zipf laws with long tails of rare ids, and
    the eight other fields (2 to 233 values) noise. What a pruning method must keep: the
    rows of rare users and items carry their few clicks, and nothing else says them."""
    rows = rows or FRAPPE_ROWS
    rng = np.random.default_rng(seed)
    fields = {}
    for name, size in FRAPPE_FIELDS.items():
        values = pa.array(FRAPPE_WORDS[name]) if name in FRAPPE_WORDS else (
            _words("country_", size) if name == "country" else _ints(rng, size))
        informative = name in ("user", "item")
        fields[name] = Field(rng, size, values, skew=1.1 if informative else 0.9, scale=0.5 if informative else 0.0)
    latent = {name: rng.normal(0.0, 1.0, (fields[name].size, rank)) for name in ("user", "item")}
    out = {}
    for split, n in rows.items():
        ranks = {name: f.ranks(rng, n) for name, f in fields.items()}
        if split == "train":  # each value at least once
            for name, f in fields.items():
                ranks[name][: f.size] = np.arange(f.size)
        u, i = ranks["user"], ranks["item"]
        logit = 1.5 * (latent["user"][u] * latent["item"][i]).sum(axis=1) / np.sqrt(rank)
        logit += fields["user"].effect[u] + fields["item"].effect[i]
        columns = {"label": _labels(rng, logit, bias=-0.8)}
        columns |= {name: fields[name].take(r) for name, r in ranks.items()}
        out[split] = pa.table(columns)
    return out


def write_frappe_csv(directory: Path, seed: int = 0, tables: Any = frappe_tables) -> dict[str, Path]:
    """Write ``train.csv``, ``valid.csv``, ``test.csv`` (atomically: all three or none).

    Example::

        write_frappe_csv(Path("data/frappe-shaped"))
    """
    import polars as pl

    paths = {s: directory / name for s, name in FRAPPE_FILES.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    with atomic_directory(directory) as tmp:
        for split, table in tables(seed).items():
            df = pl.from_arrow(table)
            assert isinstance(df, pl.DataFrame)
            df.write_csv(tmp / FRAPPE_FILES[split])
    return paths


def bench_fields(seed: int) -> dict[str, Field]:
    rng = np.random.default_rng(seed)
    return {
        "user": Field(rng, 2_000_000, _ints(rng, 2_000_000, base=10**9), skew=0.8),
        "item": Field(rng, 500_000, _ints(rng, 500_000), skew=0.9),
        "shop": Field(rng, 20_000, _ints(rng, 20_000)),
        "country": Field(rng, 200, _words("country_", 200), skew=1.3),
        "device": Field(rng, 8, _words("device_", 8), skew=1.5),
        "site": Field(rng, 100_000, _words("site_", 100_000)),
        "tags": Field(rng, 2_000, _words("t", 2_000), skew=1.0),
    }


def write_bench_parquet(path: Path, rows: int, seed: int = 0, chunk_rows: int = 1_000_000) -> Path:
    """A click-log table of ``rows`` rows: 3 integer and 3 string categoricals, a
    ``list<string>`` tags column, 3 numeric columns with 5% empty values.

    Example::

        write_bench_parquet(Path("/tmp/bench.parquet"), 2_000_000)
    """
    fields = bench_fields(seed)
    rng = np.random.default_rng(seed + 1)
    tmp = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            cols: dict[str, pa.Array] = {}
            logit = np.zeros(n)
            for name, f in fields.items():
                if name == "tags":
                    offsets, flat, effect = _tags(rng, f, n, 4)
                    cols[name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), f.take(flat))
                else:
                    r = f.ranks(rng, n)
                    cols[name] = f.take(r)
                    effect = f.effect[r]
                logit += effect
            price = rng.lognormal(3.0, 1.2, n)
            age = rng.integers(18, 90, n).astype(np.float64)
            dwell = rng.exponential(30.0, n)
            for name, x in (("price", price), ("age", age), ("dwell", dwell)):
                cols[name] = pa.array(x, mask=rng.random(n) < 0.05)
            table = pa.table({"label": _labels(rng, logit + 0.01 * (age - 50)), **cols})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=chunk_rows)
        assert writer is not None
        writer.close()
        tmp.replace(path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["example", "frappe", "sparse-signal", "bench"])
    ap.add_argument("path", type=Path)
    ap.add_argument("--rows", type=int, default=2_000_000, help="bench: rows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.what == "example":
        print(write_example_csv(args.path, seed=args.seed))
    elif args.what == "frappe":
        print(*write_frappe_csv(args.path, seed=args.seed).values())
    elif args.what == "sparse-signal":
        print(*write_frappe_csv(args.path, seed=args.seed, tables=sparse_signal_tables).values())
    else:
        print(write_bench_parquet(args.path, args.rows, seed=args.seed))


if __name__ == "__main__":
    main()
