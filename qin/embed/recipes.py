"""The two recipes that write an item table: `embed_from_precomputed` and `embed_from_content`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from qin.embed.cache import (
    CACHE_VERSION,
    cache_path,
    cached_vectors,
    encoder_name,
    images_fingerprint,
    model_fingerprint,
)
from qin.embed.encoders import check_model_dir, console, default_text_model, encode_images, encode_texts
from qin.embed.tables import (
    IMG_EMB,
    ITEM_TITLE,
    TXT_EMB,
    check_columns,
    check_embed_output,
    item_rows,
    read_checked_parquet,
    read_item_info,
    vector_column,
    vector_width,
    write_item_table,
)
from qin.embed.vectors import Fusion, as_fusion, check_pca_dim, fuse, pca_reduce
from qin.errors import QinError
from qin.features.raw import ITEM_ID, sha256_file


@dataclass(frozen=True)
class EmbedResult:
    """What an embedding run wrote.

    Attributes:
        out: the written item table (item_info schema).
        items: N, the number of real items (the table has N + 1 rows).
        missing_titles: items whose title is empty or absent (zero text vector before fusion).
        missing_images: items with no readable cover image (zero image vector before fusion).
        explained_variance: share of the fused vectors' variance kept by the PCA.
        seconds: wall time of the whole call.
    """

    out: Path
    items: int
    missing_titles: int
    missing_images: int
    explained_variance: float
    seconds: float


# ---------------------------------------------------------------------------------------------------------
# Recipe 1: the organisers' baseline


def embed_from_precomputed(item_feature: Path, item_info: Path, out: Path, dim: int = 128) -> EmbedResult:
    """The organisers' recipe: PCA(dim) of txt_emb_BERT (768) concatenated with img_emb_CLIPRN50 (1024).

    Args:
        item_feature: item_feature.parquet (item_id 1..N in any order, every item present once).
        item_info: item_info.parquet (item_id 0..N); its item_tags and other columns are kept.
        out: the item table to write (item_info schema, item_emb_d128 = list<float32>[dim]).
        dim: PCA width (the challenge requires 128); at most min(N, 1792).

    Returns:
        EmbedResult; missing_titles and missing_images are 0 (this recipe reads neither).

    Raises:
        QinError: a file or column is missing, ids do not match item_info, vectors differ in length, out
            does not end in .parquet, or dim exceeds min(N, the fused input width).
    """
    start = time.perf_counter()
    check_embed_output(Path(out), [Path(item_feature), Path(item_info)])
    info = read_item_info(Path(item_info))
    n_items = info.height - 1
    item_feature = Path(item_feature)
    check_columns(item_feature, [ITEM_ID, TXT_EMB, IMG_EMB])
    ids = pl.read_parquet(item_feature, columns=[ITEM_ID])[ITEM_ID].to_numpy()
    rows = item_rows(ids, n_items, item_feature)
    if rows.size != n_items:
        raise QinError(f"{item_feature}: has {rows.size} items, item_info has {n_items}; every item needs "
                       "its precomputed vectors")
    # One column at a time, written straight into its block of the fused matrix: peak memory is the fused
    # matrix plus one column (about 2 x 650 MB for the real 91,717 items), not several 1792-d copies.
    widths = [vector_width(item_feature, column) for column in (TXT_EMB, IMG_EMB)]
    check_pca_dim(dim, n_items, sum(widths), "fused input width")
    fused = np.empty((n_items, sum(widths)), dtype=np.float32)  # (N, 768 + 1024), row i-1 = item i
    offset = 0
    for column, width in zip((TXT_EMB, IMG_EMB), widths, strict=True):
        block = vector_column(pl.read_parquet(item_feature, columns=[column]), column, item_feature)
        if block.shape[1] != width:
            raise QinError(f"{item_feature}: column {column!r} must hold vectors of one length")
        fused[rows, offset : offset + width] = block
        offset += width
        del block
    pca = pca_reduce(fused, dim)
    write_item_table(info, pca.vectors, Path(out))
    return EmbedResult(out=Path(out), items=n_items, missing_titles=0, missing_images=0,
                       explained_variance=pca.total_explained, seconds=time.perf_counter() - start)


def check_cache_dir(cache_dir: Path) -> None:
    """QinError when ``cache_dir``, or the nearest of its parents that exists, is not a folder.

    Checked before anything is encoded: otherwise the first cache write, after all the encoding, fails.
    """
    for candidate in (cache_dir, *cache_dir.parents):
        if candidate.exists():
            if not candidate.is_dir():
                shown = "" if candidate == cache_dir else f" ({candidate} is a file)"
                raise QinError(f"{cache_dir}: cache dir exists and is not a folder{shown}; "
                               "choose another --cache-dir")
            return


# ---------------------------------------------------------------------------------------------------------
# Recipe 2: encode content with local transformers models


def embed_from_content(item_feature: Path, item_info: Path, images_dir: Path | None, out: Path,
                       text_model: Path | None = None, image_model: Path | None = None,
                       text_weight: float = 0.5, image_weight: float = 0.5, dim: int = 128,
                       batch_size: int = 64, cache_dir: Path = Path("features/embed_cache"),
                       progress: bool = True, fusion: Fusion = Fusion.concat) -> EmbedResult:
    """Encode titles (and covers), fuse the L2-normalised modalities, PCA to ``dim``, write an item table.

    Items without a title (empty, blank or absent from item_feature) get a zero text vector, and items
    without a readable ``<images_dir>/<item_id>.jpg`` a zero image vector, before fusion; both are
    counted. Encoded vectors are cached as ``<cache_dir>/<encoder>-<hash>.npy`` (one per encoder; the hash
    covers the model folder's config files and weight sizes, the item_feature file's sha256, and for
    images the cover files' names, sizes and times), so changing weights, fusion or dim re-uses them.

    Args:
        item_feature: item_feature.parquet (item_id in 1..N, item_title).
        item_info: item_info.parquet (item_id 0..N); its item_tags and other columns are kept.
        images_dir: folder of <item_id>.jpg covers; None = <item_feature's folder>/item_images. Only read
            when image_model is given.
        out: the item table to write (item_info schema, item_emb_d128 = list<float32>[dim]).
        text_model: local transformers text model folder; None = the shipped all-MiniLM-L6-v2.
        image_model: local transformers vision or CLIP model folder; None = text only.
        text_weight, image_weight: per-modality weights (see `fuse`); a 0 weight skips that encoder.
        dim: PCA width (the challenge requires 128); at most min(N, the fused width).
        batch_size: items per encoder forward pass.
        cache_dir: where encoded vectors are cached.
        progress: show progress bars and print the missing counts.
        fusion: concat (default, any widths) or mean (equal widths).

    Returns:
        EmbedResult with the missing counts and the PCA's explained variance.

    Raises:
        QinError: a model folder, file or column is missing, weights are invalid, cache_dir is not a
            folder, out does not end in .parquet, or dim exceeds min(N, the fused width).
    """
    start = time.perf_counter()
    fusion = as_fusion(fusion)
    item_feature, item_info, out, cache_dir = Path(item_feature), Path(item_info), Path(out), Path(cache_dir)
    check_embed_output(out, [item_feature, item_info])
    check_cache_dir(cache_dir)
    use_text = text_weight > 0
    use_image = image_model is not None and image_weight > 0
    if not use_text and not use_image:
        raise QinError("nothing to encode: give text_weight > 0, or an image_model with image_weight > 0")
    text_dir = check_model_dir(Path(text_model) if text_model else default_text_model(), "text") \
        if use_text else None
    image_dir = check_model_dir(Path(image_model), "image") if use_image and image_model else None
    if batch_size < 1:
        raise QinError(f"batch_size must be >= 1, got {batch_size}")

    info = read_item_info(item_info)
    n_items = info.height - 1
    if not 1 <= dim <= n_items:  # the fused width is known after encoding; the item count already
        raise QinError(f"PCA to {dim} dimensions needs 1 <= dim <= min(number of items, fused input width); "
                       f"there are {n_items} items")
    feature = read_checked_parquet(item_feature, [ITEM_ID, ITEM_TITLE])
    rows = item_rows(feature[ITEM_ID].to_numpy(), n_items, item_feature)
    titles: list[str | None] = [None] * n_items  # row i-1 = item i
    for row, title in zip(rows.tolist(), feature[ITEM_TITLE].to_list(), strict=True):
        titles[row] = title
    data_hash = sha256_file(item_feature)

    parts: list[tuple[np.ndarray, float]] = []
    missing_titles = missing_images = 0
    if text_dir is not None:
        key = {"v": CACHE_VERSION, "role": "text", "model": model_fingerprint(text_dir), "data": data_hash}
        name = encoder_name(text_dir, "text")
        vectors = cached_vectors(cache_path(cache_dir, name, key), n_items, lambda: encode_texts(
            text_dir, titles, batch_size, progress, name.removeprefix("text-")))
        missing_titles = int((~vectors.any(axis=1)).sum())
        parts.append((vectors, text_weight))
    if image_dir is not None:
        images_dir = Path(images_dir) if images_dir is not None else item_feature.parent / "item_images"
        if not images_dir.is_dir():
            raise QinError(f"images folder not found: {images_dir}")
        paths = [images_dir / f"{item}.jpg" for item in range(1, n_items + 1)]
        key = {"v": CACHE_VERSION, "role": "image", "model": model_fingerprint(image_dir),
               "data": data_hash, "images": images_fingerprint(paths)}
        name = encoder_name(image_dir, "image")
        vectors = cached_vectors(cache_path(cache_dir, name, key), n_items, lambda: encode_images(
            image_dir, paths, batch_size, progress, name.removeprefix("image-")))
        missing_images = int((~vectors.any(axis=1)).sum())
        parts.append((vectors, image_weight))
    if progress:
        console.print(f"{n_items} items: {missing_titles} without a title, "
                      + (f"{missing_images} without a readable image" if image_dir else "images not used"))

    fused = fuse(parts, fusion) if len(parts) > 1 else parts[0][0]  # (N, D)
    check_pca_dim(dim, n_items, fused.shape[1], "fused width")
    pca = pca_reduce(fused, dim)
    write_item_table(info, pca.vectors, out)
    return EmbedResult(out=out, items=n_items, missing_titles=missing_titles, missing_images=missing_images,
                       explained_variance=pca.total_explained, seconds=time.perf_counter() - start)
