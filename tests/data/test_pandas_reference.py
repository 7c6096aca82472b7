"""The pandas reference and the polars pipeline write the same data."""

from __future__ import annotations

import pytest

from recsys.data.bench import outputs_equal
from recsys.data.criteo import preprocess_criteo
from recsys.data.pandas_reference import preprocess_criteo_pandas
from tests.conftest import CRITEO_SAMPLE


@pytest.mark.parametrize(("seed", "min_count"), [(0, 1), (5, 3)])
def test_same_output_on_the_sample(tmp_path, seed, min_count):
    (tmp_path / "polars").mkdir()
    schema = preprocess_criteo(CRITEO_SAMPLE, tmp_path / "polars", seed=seed, min_count=min_count)
    rows = preprocess_criteo_pandas(CRITEO_SAMPLE, tmp_path / "pandas", seed=seed, min_count=min_count)
    assert rows == schema.rows
    assert outputs_equal(tmp_path / "polars", tmp_path / "pandas")


def test_bench_runs_end_to_end(tmp_path, capsys):
    """The benchmark script on a tiny file: every pipeline's subprocess runs and the outputs agree."""
    from recsys.data.bench import PIPELINES, main

    main(["--rows", "3000", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert all(f"| {p} |" in out for p in PIPELINES)
    assert "outputs equal: True" in out
    assert (tmp_path / "synthetic-criteo-3000-seed0.tsv").is_file()
