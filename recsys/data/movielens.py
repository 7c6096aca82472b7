"""MovieLens-100K as a CTR dataset: a rating >= 4 is a click.

Sparse fields: ``user_id``, ``item_id``, ``age``, ``gender``, ``occupation``,
``zip_code``, ``release_year`` and ``genre`` (multi-hot); no dense features. Ids
follow the schema contract (train vocabulary, 1.. by descending count, 0 = OOV); a
release year that is not four digits is empty -> id 0 (GroupLens has no date for item
267; RecBole writes 'unkonwn' for it and 'V' for item 1412).

Two sources of the same 100,000 ratings:

* ``recbole`` (default): the RecBole 1.2.1 wheel from PyPI, fetched with
  ``pip download`` (works wherever pip does) and checked by sha256, wheel and files;
  ``ml-100k.{inter,user,item}`` are RecBole atomic files (tab-separated, typed headers).
* ``grouplens``: ``ml-100k.zip`` from files.grouplens.org (``u.data``, ``u.user``,
  ``u.item`` in their own formats). GroupLens publishes no checksums and we have none
  on record, so these files are not verified.

Downloads and extraction go to a temporary name that is renamed when complete.

Example::

    ds = MovieLensConfig(raw_dir="data/raw").prepare(Path("data/cache"))
    ds.schema.rows    # 100,000 rows over train/val/test
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import polars as pl

from compression.config_checks import bounded, one_of
from recsys.data.base import DatasetConfig
from recsys.data.common import (
    assign_splits,
    build_vocab,
    cached_dataset,
    ordered_splits,
    sha256_file,
    write_counts,
)
from recsys.data.ids import RawTextIds
from recsys.data.schema import (
    COUNTS_FILE,
    SPLITS,
    DataError,
    DatasetSchema,
    ProcessedDataset,
    SparseField,
)

CODE_VERSION = 1
RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_FILES = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
RECBOLE_MEMBER = "recbole/dataset_example/ml-100k/"
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_FILES = ("u.data", "u.user", "u.item")
# u.item's 19 genre flags, in column order (names as in u.genre and in RecBole's files)
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
SINGLE = ["user_id", "item_id", "age", "gender", "occupation", "zip_code", "release_year"]
FIELDS = [*SINGLE, "genre"]


@dataclass
class MovieLensConfig(DatasetConfig):
    """MovieLens-100K as CTR: where the raw files live, which source, click threshold.

    ``raw_dir`` is relative to the current directory unless absolute.

    Example::

        MovieLensConfig(source="recbole", raw_dir="data/raw", min_count=1).prepare(Path("data/cache"))
    """

    ordered_by: ClassVar[Optional[str]] = "the ratings' timestamps"
    raw_ids: ClassVar[bool] = True

    name: str = "movielens-100k"
    source: str = one_of("recbole", "recbole", "grouplens")
    raw_dir: str = "data/raw"
    min_count: int = bounded(1, ge=1)
    min_rating: int = bounded(4, ge=1, le=5)  # a rating >= min_rating is a click

    def raw_files(self) -> dict[str, Path]:
        """The verified (recbole) or found (grouplens) raw files, fetching them if needed."""
        if self.source == "recbole":
            return fetch_recbole(Path(self.raw_dir))
        if self.source == "grouplens":
            return fetch_grouplens(Path(self.raw_dir))
        raise ValueError(f"MovieLens source must be 'recbole' or 'grouplens', got '{self.source}'")

    def prepare(self, cache_root: Path) -> ProcessedDataset:
        files = self.raw_files()
        digests = (
            dict(RECBOLE_FILES) if self.source == "recbole" else {n: sha256_file(p) for n, p in files.items()}
        )
        key = {
            "format": "movielens-100k",
            "code_version": CODE_VERSION,
            "source": self.source,
            "files": digests,
            "seed": self.seed,
            "split": list(self.split),
            "min_count": self.min_count,
            "min_rating": self.min_rating,
            **self.split_key(),
        }

        def build(out: Path) -> DatasetSchema:
            frames = read_recbole(files) if self.source == "recbole" else read_grouplens(files)
            schema = write_processed(
                *frames, out, name=self.name, seed=self.seed, split=list(self.split),
                min_count=self.min_count, min_rating=self.min_rating, split_by=self.split_by, ids=self.ids,
            )
            schema.source = {"format": "movielens-100k", "source": self.source, "sha256": digests}
            return schema

        return cached_dataset(Path(cache_root), self.name, key, build)


def _check_sha(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"{path}: sha256 mismatch: expected {expected}, found {actual}; delete it to refetch")


def _pip_download(dest: Path) -> None:
    """``pip download`` the RecBole wheel (no dependencies) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", f"recbole=={RECBOLE_VERSION}", "-d", str(dest)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)


def _tmp_sibling(final: Path) -> Path:
    return final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fetch_recbole(raw_dir: Path) -> dict[str, Path]:
    """``ml-100k.{inter,user,item}`` under ``raw_dir/ml-100k-recbole``, downloaded if absent.

    Example::

        files = fetch_recbole(Path("data/raw"))   # {"ml-100k.inter": Path(...), ...}
    """
    target = raw_dir / "ml-100k-recbole"
    files = {name: target / name for name in RECBOLE_FILES}
    if not target.is_dir():
        wheel = raw_dir / RECBOLE_WHEEL
        if not wheel.is_file():
            raw_dir.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_sibling(raw_dir / "pip-download")
            try:
                _pip_download(tmp)
                os.replace(tmp / RECBOLE_WHEEL, wheel)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
                detail = getattr(e, "stderr", None) or str(e)
                raise DataError(
                    f"MovieLens-100K (recbole): {target} is missing and `pip download recbole=={RECBOLE_VERSION}` "
                    f"failed ({detail.strip().splitlines()[-1] if detail.strip() else e}); run "
                    f"`python -m pip download --no-deps recbole=={RECBOLE_VERSION} -d {raw_dir}` where there is "
                    f"network, or put {', '.join(RECBOLE_FILES)} into {target}"
                ) from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _check_sha(wheel, RECBOLE_WHEEL_SHA256)
        tmp = _tmp_sibling(target)
        tmp.mkdir(parents=True)
        try:
            with zipfile.ZipFile(wheel) as zf:
                for name in RECBOLE_FILES:
                    (tmp / name).write_bytes(zf.read(RECBOLE_MEMBER + name))
            for name, digest in RECBOLE_FILES.items():
                _check_sha(tmp / name, digest)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for name, path in files.items():
        if not path.is_file():
            raise DataError(f"{path}: missing; delete {target} to extract it again")
        _check_sha(path, RECBOLE_FILES[name])
    return files


def fetch_grouplens(raw_dir: Path, url: str = GROUPLENS_URL) -> dict[str, Path]:
    """``u.data``, ``u.user``, ``u.item`` under ``raw_dir/ml-100k``, from ``ml-100k.zip`` if needed.

    Example::

        files = fetch_grouplens(Path("data/raw"))   # {"u.data": Path(...), ...}
    """
    target = raw_dir / "ml-100k"
    files = {name: target / name for name in GROUPLENS_FILES}
    if all(p.is_file() for p in files.values()):
        return files
    archive = raw_dir / "ml-100k.zip"
    if not archive.is_file():
        raw_dir.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(archive)
        try:
            with urllib.request.urlopen(url, timeout=60) as r, tmp.open("wb") as out:
                shutil.copyfileobj(r, out)
            os.replace(tmp, archive)
        except OSError as e:
            raise DataError(
                f"MovieLens-100K (grouplens): {target} is missing and {url} could not be fetched ({e}); "
                f"download it where there is network and put ml-100k.zip into {raw_dir} "
                f"(or its {', '.join(GROUPLENS_FILES)} into {target})"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
    tmp = _tmp_sibling(target)
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in GROUPLENS_FILES:
                (tmp / name).write_bytes(zf.read(f"ml-100k/{name}"))
        if target.exists():
            shutil.rmtree(target)  # partial copy by hand: the archive is complete
        os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{archive}: not a MovieLens-100K archive ({e}); delete it to download again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def _year(col: pl.Expr) -> pl.Expr:
    """A four-digit year, else null (RecBole writes 'unkonwn' where GroupLens has no date)."""
    return pl.when(col.str.contains(r"^\d{4}$")).then(col)


def read_recbole(files: dict[str, Path]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """RecBole atomic files -> (ratings, users, items) with string ids, genre as a list."""

    def atomic(path: Path) -> pl.DataFrame:
        df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False)
        return df.rename({c: c.split(":")[0] for c in df.columns})  # "user_id:token" -> "user_id"

    inter = atomic(files["ml-100k.inter"])
    ratings = inter.select("user_id", "item_id", pl.col("rating").cast(pl.Float64).alias("rating"),
                           pl.col("timestamp").cast(pl.Float64))  # fmt: skip
    users = atomic(files["ml-100k.user"]).select("user_id", "age", "gender", "occupation", "zip_code")
    items = atomic(files["ml-100k.item"]).select(
        "item_id",
        _year(pl.col("release_year")).alias("release_year"),
        pl.col("class").str.split(" ").list.eval(pl.element().filter(pl.element() != "")).alias("genre"),
    )
    return ratings, users, items


def read_grouplens(files: dict[str, Path]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """GroupLens ``u.data``/``u.user``/``u.item`` -> the same frames as ``read_recbole``."""

    def table(path: Path, sep: str, names: list[str]) -> pl.DataFrame:
        text = path.read_bytes().decode("latin-1")  # u.item is latin-1, not UTF-8
        try:
            return pl.read_csv(
                io.StringIO(text), separator=sep, has_header=False, new_columns=names,
                quote_char=None, infer_schema=False,
            )
        except pl.exceptions.PolarsError as e:
            raise DataError(f"{path}: not in the GroupLens format ({e})") from None

    data = table(files["u.data"], "\t", ["user_id", "item_id", "rating", "timestamp"])
    ratings = data.select("user_id", "item_id", pl.col("rating").cast(pl.Float64), pl.col("timestamp").cast(pl.Float64))
    users = table(files["u.user"], "|", ["user_id", "age", "gender", "occupation", "zip_code"])
    names = ["item_id", "title", "release_date", "video_date", "url", *GENRES]
    items = table(files["u.item"], "|", names).select(
        "item_id",
        _year(pl.col("release_date").str.slice(-4)).alias("release_year"),
        pl.concat_list(pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in GENRES).list.drop_nulls().alias("genre"),
    )
    return ratings, users, items


def write_processed(
    ratings: pl.DataFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    out_dir: Path,
    *,
    name: str = "movielens-100k",
    seed: int = 0,
    split: list[float] | None = None,
    min_count: int = 1,
    min_rating: int = 4,
    split_by: str = "hash",
    ids: str = "vocab",
) -> DatasetSchema:
    """Join ratings with user and item features and write the processed dataset
    (``ids="raw"``: each value as ``raw_text_id`` of its text, the vocabulary only sizing
    the full table and giving the counts).

    Example::

        write_processed(*read_recbole(fetch_recbole(Path("data/raw"))), Path("/tmp/ml"))
    """
    split = list(split) if split is not None else [0.8, 0.1, 0.1]
    df = (
        ratings.join(users, on="user_id", how="left", maintain_order="left")
        .join(items, on="item_id", how="left", maintain_order="left")
        .with_columns(pl.col("genre").fill_null(pl.lit([], dtype=pl.List(pl.String))))  # unknown item
    )
    if split_by == "order":  # by time: ties in the file's order
        position = np.empty(df.height, dtype=np.int64)
        position[np.argsort(df["timestamp"].to_numpy(), kind="stable")] = np.arange(df.height)
        codes = ordered_splits(position, df.height, split)
    else:
        codes = assign_splits(np.arange(df.height), seed, split)
    train = df.filter(pl.Series(codes == 0))
    out = [(pl.col("rating") >= min_rating).cast(pl.Float32).alias("label")]
    sparse, vocab_ids, raw = [], [], []
    for f in FIELDS:
        values = train[f].explode() if f == "genre" else train[f]
        vocab = build_vocab(values, min_count)
        to_id = pl.element() if f == "genre" else pl.col(f)
        mapped = to_id.replace_strict(vocab["value"], vocab["id"], default=0, return_dtype=pl.Int64)
        vocab_ids.append((pl.col(f).list.eval(mapped) if f == "genre" else mapped).alias(f))
        dtype = pl.List(pl.Int64) if f == "genre" else pl.Int64
        raw.append(pl.col(f).map_batches(RawTextIds(), return_dtype=dtype, is_elementwise=True).alias(f))
        sparse.append(SparseField(f, vocab.height + 1, multi_hot=f == "genre"))
    data = df.select(*out, *(raw if ids == "raw" else vocab_ids))
    train_ids = train.select(vocab_ids)  # the counts are the vocabulary ids' with raw ids too
    counts = {}
    for f in FIELDS:
        col = train_ids[f].explode().drop_nulls() if f == "genre" else train_ids[f]
        counts[f] = col.value_counts(name="count").rename({f: "id"}).sort("id")
    rows = {}
    for code, s in enumerate(SPLITS):
        part = data.filter(pl.Series(codes == code))
        part.write_parquet(out_dir / f"{s}.parquet")
        rows[s] = part.height
    write_counts(out_dir / COUNTS_FILE, counts)
    return DatasetSchema(
        name=name,
        dense=[],
        sparse=sparse,
        rows=rows,
        params={"seed": seed, "split": split, **({"split_by": split_by} if split_by != "hash" else {}),
                **({"ids": ids} if ids != "vocab" else {}),
                "min_count": min_count, "min_rating": min_rating,
                "code_version": CODE_VERSION},
    )
