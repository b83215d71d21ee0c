"""Nearest neighbours: which items look like this one (cosine over an item table's item_emb_d128)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from qin.embed.tables import ITEM_TITLE, read_checked_parquet, read_item_info, vector_column
from qin.embed.vectors import build_index, l2_normalise
from qin.errors import QinError
from qin.features.raw import ITEM_EMB, ITEM_ID, ITEM_TAGS


def neighbors(item_table: Path, item_feature: Path | None, item_id: int, k: int = 10) -> pl.DataFrame:
    """The k items whose item_emb_d128 is closest (cosine) to item_id's, itself and row 0 excluded.

    Args:
        item_table: an item_info-schema table (item_id 0..N, item_tags, item_emb_d128).
        item_feature: item_feature.parquet for titles and unpadded tags; None = no titles, tags from
            item_table (zeros dropped).
        item_id: the query item, in 1..N.
        k: number of neighbours (fewer when the table has fewer other items).

    Returns:
        Frame with columns rank (1..k), item_id, score (cosine), title (null without item_feature),
        tags (list of tag ids), best first.

    Raises:
        QinError: item_id out of range, its vector is all zeros, k < 1, or a file/column is missing.
    """
    item_table = Path(item_table)
    if k < 1:
        raise QinError(f"k must be >= 1, got {k}")
    info = read_item_info(item_table)
    if ITEM_EMB not in info.columns:
        raise QinError(f"{item_table}: no column {ITEM_EMB!r}")
    n_items = info.height - 1
    if not 1 <= item_id <= n_items:
        raise QinError(f"item_id {item_id} is not in 1..{n_items} ({item_table})")
    vectors = vector_column(info, ITEM_EMB, item_table)[1:]  # (N, d), row i-1 = item i
    query = vectors[item_id - 1 : item_id]  # (1, d)
    if not query.any():
        raise QinError(f"item {item_id} has an all-zero {ITEM_EMB} in {item_table}; it has no neighbours")
    index = build_index(vectors)
    scores, found = index.search(np.ascontiguousarray(l2_normalise(query)), min(k + 1, n_items))  # (1, k+1)
    keep = [(int(j) + 1, float(s)) for j, s in zip(found[0], scores[0], strict=True)
            if j >= 0 and int(j) + 1 != item_id][:k]
    ids = [i for i, _ in keep]
    result = pl.DataFrame({"rank": list(range(1, len(keep) + 1)), ITEM_ID: ids,
                           "score": [s for _, s in keep]},
                          schema={"rank": pl.Int64, ITEM_ID: pl.Int64, "score": pl.Float64})
    if item_feature is not None:
        feature = read_checked_parquet(Path(item_feature), [ITEM_ID, ITEM_TITLE, ITEM_TAGS])
        side = feature.select(pl.col(ITEM_ID).cast(pl.Int64), pl.col(ITEM_TITLE).alias("title"),
                              pl.col(ITEM_TAGS).cast(pl.List(pl.Int64)).alias("tags"))
    else:
        side = info.select(pl.col(ITEM_ID).cast(pl.Int64), pl.lit(None, dtype=pl.String).alias("title"),
                           pl.col(ITEM_TAGS).cast(pl.List(pl.Int64)).list.eval(pl.element().filter(
                               pl.element() != 0)).alias("tags"))
    return result.join(side, on=ITEM_ID, how="left", maintain_order="left")
