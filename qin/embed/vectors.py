"""Vector maths on item matrices: modality fusion, PCA (faiss), L2 normalisation and a cosine index.

Notation: N items, D input width, d output width.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import faiss
import numpy as np

from qin.errors import QinError


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


def check_pca_dim(dim: int, n_items: int, width: int, width_name: str = "input width") -> None:
    """QinError unless 1 <= dim <= min(n_items, width): PCA of N points in D dimensions has at most
    min(N, D) output dimensions worth keeping (N centred points span at most N - 1 directions)."""
    bound = min(n_items, width)
    if not 1 <= dim <= bound:
        raise QinError(f"PCA to {dim} dimensions needs 1 <= dim <= {bound}, the smaller of the number of "
                       f"items ({n_items}) and the {width_name} ({width})")


def pca_reduce(matrix: np.ndarray, dim: int = 128, use_gpu: bool | None = None) -> PCAResult:
    """Plain PCA (centred, no whitening) with faiss.PCAMatrix, like the organisers' sklearn PCA(128).

    GPU choice: ``use_gpu=None`` picks the GPU when ``faiss.get_num_gpus() > 0``, and True without a GPU
    raises. faiss has no GPU PCA, though: even faiss-gpu trains PCAMatrix on the CPU (a D x D covariance
    and its eigen-decomposition, about a second at D=1792), so the choice is only resolved and checked
    here, with the same rule as `build_index`.

    Args:
        matrix: (N, D) vectors, any float dtype (computed in float32, as faiss does).
        dim: d, the number of components kept; at most min(N, D).
        use_gpu: see above.

    Returns:
        PCAResult with (N, d) float32 vectors. Each component's sign is fixed so that its largest
        |loading| is positive, so the result does not depend on the eigen-solver's sign choice.

    Raises:
        QinError: matrix is not 2-D, has fewer than 2 rows, holds NaN/inf, or dim is not in 1..min(N, D).
    """
    _resolve_gpu(use_gpu)
    if matrix.ndim != 2:
        raise QinError(f"PCA input must be 2-D (items x features), got shape {matrix.shape}")
    n, width = matrix.shape
    if n < 2:
        raise QinError(f"PCA needs at least 2 items, got {n}")
    check_pca_dim(dim, n, width)
    x = np.ascontiguousarray(matrix, dtype=np.float32)  # (N, D)
    if not np.isfinite(x).all():
        raise QinError("PCA input holds NaN or inf values")
    # N centred points span at most N - 1 directions: later components carry no variance and project
    # every point to 0. faiss cannot output more than N (and its N-th is noise), so it fits
    # min(d, N - 1) components; with d = N the last is a zero column, which is the exact PCA result.
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


def as_fusion(value: Fusion | str) -> Fusion:
    """value as a Fusion ("concat" or "mean"); QinError naming the choices otherwise."""
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
    fusion = as_fusion(fusion)
    weights = np.array([w for _, w in parts], dtype=np.float64)
    if not parts or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise QinError(f"modality weights must be >= 0 with a positive sum, got {weights.tolist()}")
    if fusion is Fusion.concat:
        return np.concatenate([np.float32(np.sqrt(w)) * v for v, w in parts], axis=1).astype(np.float32)
    if fusion is Fusion.mean:
        widths = {v.shape[1] for v, _ in parts}
        if len(widths) != 1:
            raise QinError(f"fusion 'mean' needs modalities of one width, got {sorted(widths)}; use 'concat'")
        # sum() is typed to maybe return its start 0; `parts` is non-empty (checked above), so it is an array.
        total = cast(np.ndarray, sum(np.float32(w) * v for v, w in parts))
        return (total / np.float32(weights.sum())).astype(np.float32)
    raise QinError(f"unknown fusion {fusion!r}")
