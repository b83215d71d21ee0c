"""Input validation: every problem a user can fix becomes a `QinError` naming file, column and row.

Row checks are polars expressions that are True on a bad row. `raise_first_bad` evaluates all of
them in one pass as ``min(row index where bad)`` reductions, so it runs on an in-memory chunk or
on a streaming LazyFrame alike; `write.py` calls it on each row chunk it reads anyway, which keeps
validation of the 3.6M-row train split bounded in memory without decoding the file twice.
Row numbers in messages are 0-based row indices in the named file.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import polars as pl

from qin.errors import QinError
from qin.features.raw import (
    ID,
    ITEM_EMB,
    ITEM_ID,
    ITEM_SEQ,
    ITEM_TAGS,
    LABEL,
    LIKES_LEVEL,
    USER_ID,
    VIEWS_LEVEL,
    read_schema,
    reading_parquet,
)

ROW = "__row"  # row-index column added by `raise_first_bad`; checks may refer to it
TAGS_PER_ITEM = 5
MAX_LEVEL = 9
# A tag id indexes the model's tag embedding table, which has max-id + 2 rows (`steps.tag_vocab`),
# so one stray huge id (2e9) makes training try to allocate a table of hundreds of GB. MicroLens has
# 11,740 tags; 10M leaves room for any real tag set while keeping the table a few GB at worst (and the
# ids inside the int32 the items table stores them as).
MAX_TAG_ID = 10_000_000
# item_emb.npy is float32: a larger magnitude, finite in the float64 input, would be stored as inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class ColumnKind(Enum):
    """What a raw column must hold (any integer / float width is accepted)."""

    INTEGER = "an integer column"
    INT_LIST = "a list of integers"
    FLOAT_LIST = "a list of floats"
    BINARY = "a numeric 0/1 column"

    def accepts(self, dtype: pl.DataType) -> bool:
        """Whether ``dtype`` is acceptable for this kind (Array = parquet fixed_size_list, also fine)."""
        match self:
            case ColumnKind.INTEGER:
                return dtype.is_integer()
            case ColumnKind.INT_LIST:
                return isinstance(dtype, pl.List | pl.Array) and dtype.inner.is_integer()
            case ColumnKind.FLOAT_LIST:
                return isinstance(dtype, pl.List | pl.Array) and dtype.inner.is_float()
            case ColumnKind.BINARY:
                return dtype.is_integer() or dtype.is_float() or dtype == pl.Boolean


# Label is handled per split: required on train/valid, ignored on test (absent or a constant there).
SPLIT_COLUMNS: dict[str, ColumnKind] = {
    USER_ID: ColumnKind.INTEGER,
    ITEM_SEQ: ColumnKind.INT_LIST,
    ITEM_ID: ColumnKind.INTEGER,
    LIKES_LEVEL: ColumnKind.INTEGER,
    VIEWS_LEVEL: ColumnKind.INTEGER,
}
ITEM_INFO_COLUMNS: dict[str, ColumnKind] = {
    ITEM_ID: ColumnKind.INTEGER,
    ITEM_TAGS: ColumnKind.INT_LIST,
    ITEM_EMB: ColumnKind.FLOAT_LIST,
}


@dataclass(frozen=True)
class Check:
    """One row-level rule.

    Attributes:
        column: the column named in the message.
        problem: what is wrong, completing "column '<column>' ...".
        bad: boolean expression, True on rows that break the rule.
        shown: optional expression whose value at the first bad row is quoted in the message.
    """

    column: str
    problem: str
    bad: pl.Expr
    shown: pl.Expr | None = None


def check_columns(path: Path, required: dict[str, ColumnKind]) -> pl.Schema:
    """Check that ``path`` exists, is parquet and has every required column with an accepted dtype.

    Returns:
        The file's schema (by name; the column order does not matter).
    """
    schema = read_schema(path)
    for column, kind in required.items():
        if column not in schema:
            raise QinError(f"{path}: missing column '{column}' (has: {', '.join(schema.names())})")
        if not kind.accepts(schema[column]):
            raise QinError(f"{path}: column '{column}' has dtype {schema[column]}, expected {kind.value}")
    return schema


def check_not_empty(path: Path, n_rows: int) -> None:
    """An empty split cannot be trained on or submitted."""
    if n_rows == 0:
        raise QinError(f"{path}: file has 0 rows")


def raise_first_bad(
    path: Path, frame: pl.DataFrame | pl.LazyFrame, checks: list[Check], offset: int = 0
) -> None:
    """Raise a `QinError` for the earliest row (in file order) that fails any check.

    Args:
        path: the file the frame was read from (named in the message).
        frame: rows ``[offset, offset + n)`` of that file; a LazyFrame is evaluated streaming.
        checks: the rules; on a tie (one row breaking two rules) the first listed wins.
        offset: file row index of the frame's first row, so messages give rows in the file.
    """
    if not checks:
        return
    indexed = frame.lazy().with_row_index(ROW, offset=offset)
    # A LazyFrame may scan the file, so a corrupt page surfaces here; on a frame already in memory
    # an error is a bug in a check and keeps its traceback.
    with reading_parquet(path) if isinstance(frame, pl.LazyFrame) else nullcontext():
        firsts = (
            indexed.select(
                [pl.col(ROW).filter(check.bad).min().alias(str(i)) for i, check in enumerate(checks)]
            )
            .collect(engine="streaming")
            .row(0)
        )
    failing = [(row, i) for i, row in enumerate(firsts) if row is not None]
    if not failing:
        return
    row, i = min(failing)
    check = checks[i]
    where = f"first bad row {row}, 0-based"
    if check.shown is not None:
        with reading_parquet(path) if isinstance(frame, pl.LazyFrame) else nullcontext():
            value = indexed.filter(pl.col(ROW) == row).select(check.shown).collect().item()
        if isinstance(value, pl.Series):  # a list cell
            value = value.to_list()
        where += f": {value!r}"
    raise QinError(f"{path}: column '{check.column}' {check.problem} ({where})")


def first_list_len(path: Path, column: str, dtype: pl.DataType) -> int | None:
    """Length of the list in the file's first row (the stored length S every row must share)."""
    if isinstance(dtype, pl.Array):
        return dtype.size
    with reading_parquet(path):
        value = pl.scan_parquet(path).head(1).select(pl.col(column).list.len()).collect().item()
    return None if value is None else int(value)


def _null_or(expr: pl.Expr) -> pl.Expr:
    """A comparison is null on null input; a null is bad here, so count it as True."""
    return expr.fill_null(True)


def split_checks(n_items: int, seq_len: int | None, has_label: bool) -> list[Check]:
    """Row rules for a train/valid/test chunk (``item_seq`` already cast to List).

    Args:
        n_items: V, rows of item_info; valid ids are 0..V-1 (0 = padding, so targets are 1..V-1).
        seq_len: S, the length of the first row's history (None when that row is null).
        has_label: check ``label`` (train/valid). Test labels are never read.
    """
    seq = pl.col(ITEM_SEQ)
    last = n_items - 1
    checks = [
        Check(USER_ID, "is null", pl.col(USER_ID).is_null()),
        Check(ITEM_SEQ, "is null or an empty list", _null_or(seq.list.len() == 0)),
        # Encoding would drop a null item like a padding 0 and shift the row's history: refuse it.
        Check(
            ITEM_SEQ,
            "holds a null item id",
            (seq.list.drop_nulls().list.len() != seq.list.len()).fill_null(False),
        ),
        _length_check(ITEM_SEQ, seq_len, "the length of row 0 (all histories share one stored length)"),
        # list.min/max skip nulls; an all-null list gives null, which is not a range error.
        Check(
            ITEM_SEQ,
            f"holds an item id outside [0, {last}] (item_info has {n_items} rows)",
            ((seq.list.min() < 0) | (seq.list.max() > last)).fill_null(False),
            pl.when(seq.list.min() < 0).then(seq.list.min()).otherwise(seq.list.max()),
        ),
        Check(
            ITEM_ID,
            f"is null or outside [1, {last}] (0 is the padding item; item_info has {n_items} rows)",
            _null_or(~pl.col(ITEM_ID).is_between(1, last)),
            pl.col(ITEM_ID),
        ),
    ]
    for level in (LIKES_LEVEL, VIEWS_LEVEL):
        checks.append(
            Check(
                level,
                f"is null or outside 0..{MAX_LEVEL}",
                _null_or(~pl.col(level).is_between(0, MAX_LEVEL)),
                pl.col(level),
            )
        )
    if has_label:
        label = pl.col(LABEL).cast(pl.Float64)
        # polars compares NaN as a value (NaN != 0 and NaN != 1 are True), so NaN is caught here.
        checks.append(
            Check(LABEL, "is null, NaN or not 0/1", _null_or((label != 0) & (label != 1)), pl.col(LABEL))
        )
    return checks


def _length_check(column: str, length: int | None, which: str) -> Check:
    """Rows whose list in `column` is not `length` long (`which` says where that length comes from).

    length=None (row 0's list is null, reported by another check) flags nothing.
    """
    lengths = pl.col(column).list.len()
    flagged = (lengths != length).fill_null(False) if length is not None else pl.lit(False)
    return Check(column, f"has a length other than {length}, {which}", flagged, lengths)


def id_checks() -> list[Check]:
    """Row rules for the test split's submission key.

    The challenge's submission lists IDs 0..n-1 in test-row order (the baseline writes
    ``ID = range(len(test))``), and `qin predict` writes the stored IDs in row order. Any other ID
    would pass here and fail only at predict, after training; requiring ID == row index catches
    duplicated, shuffled and offset IDs alike.
    """
    return [
        Check(ID, "is null", pl.col(ID).is_null()),
        Check(
            ID,
            "must equal the row index (IDs 0..n-1 in test-row order, as the submission needs; "
            "duplicated, shuffled or offset IDs are refused)",
            _null_or(pl.col(ID) != pl.col(ROW)),
            pl.col(ID),
        ),
    ]


def item_info_checks(emb_dim: int | None) -> list[Check]:
    """Row rules for item_info (``item_tags`` / ``item_emb_d128`` already cast to List).

    Args:
        emb_dim: D, the embedding length in row 0 (None when row 0's embedding is null).
    """
    tags = pl.col(ITEM_TAGS)
    emb = pl.col(ITEM_EMB)
    return [
        # item_id is used as the row index into this table by the model: row i must be item i.
        Check(
            ITEM_ID,
            "is not the row index (row i must hold item i, row 0 = padding)",
            _null_or(pl.col(ITEM_ID) != pl.col(ROW)),
            pl.col(ITEM_ID),
        ),
        Check(
            ITEM_TAGS,
            f"is null or not a list of {TAGS_PER_ITEM} tag ids",
            _null_or(tags.list.len() != TAGS_PER_ITEM),
            tags,
        ),
        Check(
            ITEM_TAGS,
            "holds a null tag id",
            tags.list.eval(pl.element().is_null()).list.any().fill_null(False),
        ),
        Check(ITEM_TAGS, "holds a negative tag id", (tags.list.min() < 0).fill_null(False), tags),
        Check(
            ITEM_TAGS,
            f"holds a tag id above {MAX_TAG_ID:,} (the model's tag embedding table has max-id + 2 rows; "
            "re-index the tags densely as 1..K, 0 = no tag)",
            (tags.list.max() > MAX_TAG_ID).fill_null(False),
            tags.list.max(),
        ),
        Check(ITEM_EMB, "is null or an empty list", _null_or(emb.list.len() == 0)),
        _length_check(ITEM_EMB, emb_dim, "the length of row 0"),
        Check(
            ITEM_EMB,
            "holds a null, NaN or infinite value",
            emb.list.eval((~pl.element().is_finite()).fill_null(True)).list.any().fill_null(False),
        ),
        Check(
            ITEM_EMB,
            f"holds a value that overflows float32 (absolute value above {FLOAT32_MAX:.6g}; "
            "item_emb.npy stores float32, where it would become inf)",
            emb.list.eval(pl.element().abs() > FLOAT32_MAX).list.any().fill_null(False),
            emb.list.eval(pl.element().filter(pl.element().abs() > FLOAT32_MAX)).list.first(),
        ),
    ]
