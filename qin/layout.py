"""The challenge's file layout, shared by both data generators: folder names and the impression-row schema.

    <data set>/MicroLens_1M_x1/{train,valid,test}.parquet   rows of ROW_FIELDS (test: ID first; train and
                                                             valid: label last), item_info.parquet
    <data set>/hidden/                                       a generator's truth, never read by a model
"""

from __future__ import annotations

import pyarrow as pa

DATA_SUBDIR = "MicroLens_1M_x1"
HIDDEN_SUBDIR = "hidden"

# The columns every split has, in the organisers' order (data.md section 1.1).
ROW_FIELDS = [
    pa.field("user_id", pa.int64()),
    pa.field("item_seq", pa.list_(pa.int64())),
    pa.field("item_id", pa.int64()),
    pa.field("likes_level", pa.int64()),
    pa.field("views_level", pa.int64()),
]
