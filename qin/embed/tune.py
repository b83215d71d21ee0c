"""Task 1 beyond PCA: item vectors tuned on user histories (`qin embed --tune histories`).

The challenge's Task-1 rules allow user histories to train the embedder (not the CTR model's labels, and
not end to end with it). Items a user watched one after the other tend to share what the click depends on,
including what no content encoder sees (a series, a trend). So the tuned vector of item i is

    v_i = [ a · normalise(P c_i)  ‖  b · normalise(head(c_i) + r_i) ]        (content part ‖ learned part)

    P     the top k = content_share · d principal directions of the content table (centred): the content
          part keeps what content says of the item (on the log-like suite data, its taste), which
          contrastive training on co-occurrence alone loses; a = sqrt(k / d), b = sqrt(1 - a^2), so v_i has
          unit norm and each part its share of it. k = 0 by default (see TuneSettings.content_share): then
          v_i = normalise(head(c_i) + r_i)
    c_i   the item's content vector (item_emb_d128 of a content table: the organisers' PCA of BERT + CLIP,
          or `qin embed --from content`'s), frozen
    head  a small MLP (c -> hidden -> d - k), shared by every item: what content predicts
    r_i   a free residual per item, zero at the start and kept small by an L2 term; only items that occur in
          a training history ever receive a gradient, so a cold item keeps r_i = 0 exactly and its vector
          comes from its content alone, through the tuned head (with `residual_dropout`, a share of each
          batch is scored without its residuals, so that head is trained on the task a cold item poses)

The learned part is trained with InfoNCE on pairs of items that co-occur within `window` slots of one
training history (the rows' `item_seq` only: never `label`, never the row's target item, so nothing of the
clicks leaks), the other pairs of the batch serving as negatives. Deterministic for a seed: one torch
generator draws the initialisation and every batch; the content part is a fixed function of the content.

Notation: N items (ids 1..N; tables have N + 1 rows, row 0 = padding), C content width, d output width,
H distinct training histories of L slots, B pairs per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qin.embed.tables import (
    check_columns,
    check_embed_output,
    read_item_info,
    vector_column,
    write_item_table,
)
from qin.embed.vectors import l2_normalise, pca_reduce
from qin.errors import QinError
from qin.features.raw import ITEM_EMB, ITEM_SEQ


@dataclass(frozen=True)
class TuneSettings:
    """How the table is tuned. The defaults train the full challenge (91,717 items) in minutes on CPU."""

    dim: int = 128  # output width (the challenge requires 128)
    # Of dim, the share given to the content's principal components. 0 (all learned) measured better: on
    # `logs` (seed 0) DIN reached 0.6552 with 0 and 0.6478 with 0.5, though 0.5 predicts the hidden taste
    # better (linear R^2 0.40 against 0.28 on the warm items): it dilutes how well the vectors' cosines tell
    # an item's series apart (nearest neighbour in the same series 0.77 -> 0.29).
    content_share: float = 0.0
    window: int = 3  # two items co-occur when at most this many slots apart in one history
    steps: int = 2000  # optimizer steps
    batch_size: int = 2048  # co-occurring pairs per step; the other pairs of the batch are the negatives
    learning_rate: float = 3e-3  # Adam
    temperature: float = 0.1  # InfoNCE
    hidden: int = 512  # the head's hidden width
    residual_l2: float = 1e-4  # weight of the mean squared norm of the residuals in the batch
    # Share of the batch's items whose residual is left out for the step (their vector is normalise(head(c))):
    # the head then learns to place a content-only vector where the warm items' co-occurrence puts them,
    # so a cold item's vector lies among the warm ones instead of near their common centre (cold-start
    # dropout, as in DropoutNet). Off by default: with 0.2 the Task-1 benchmark's mean margin over the
    # organisers' table is +0.0082 against +0.0078 without (benchmarks/embeddings.py, table tuned_dropout).
    residual_dropout: float = 0.0
    seed: int = 0

    @property
    def content_dims(self) -> int:
        """How many of the `dim` output dimensions hold the content's principal components."""
        return round(self.content_share * self.dim)

    def check(self) -> None:
        for name in ("dim", "window", "steps", "batch_size", "hidden"):
            if getattr(self, name) < 1:
                raise QinError(f"--tune histories: {name} must be at least 1 (got {getattr(self, name)})")
        for name in ("learning_rate", "temperature"):
            if not getattr(self, name) > 0:
                raise QinError(f"--tune histories: {name} must be positive (got {getattr(self, name)})")
        if not 0 <= self.content_share < 1 or self.content_dims >= self.dim:
            raise QinError(f"--tune histories: content_share must leave the learned part at least one of the "
                           f"{self.dim} dimensions (got {self.content_share})")
        if not 0 <= self.residual_dropout < 1:
            raise QinError("--tune histories: residual_dropout must lie in [0, 1) "
                           f"(got {self.residual_dropout})")
        if self.residual_l2 < 0:
            raise QinError(f"--tune histories: residual_l2 must not be negative (got {self.residual_l2})")


@dataclass(frozen=True)
class TuneResult:
    out: Path
    items: int
    warm_items: int  # items that occur in a training history (the others keep their content-only vector)
    histories: int  # distinct training histories read
    final_loss: float  # InfoNCE of the last 50 steps, averaged
    seconds: float


class HistoryPairs:
    """Draws pairs of items that co-occur within `window` slots of one history.

    Args:
        histories: (H, L) int64 item ids, 0 = padding (left-padded or not: only real slots are used).
        window: the largest slot distance of a pair.
    """

    def __init__(self, histories: np.ndarray, window: int) -> None:
        real = histories != 0  # (H, L)
        # Compact every history to its real items, left-aligned, so a position and its neighbours are plain
        # indices: (H, L) ids with the real ones first, and each history's length.
        order = np.argsort(~real, axis=1, kind="stable")  # real slots first, in their order
        self.items = np.take_along_axis(histories, order, axis=1)  # (H, L)
        self.lengths = real.sum(axis=1)  # (H,)
        usable = self.lengths >= 2
        self.rows = np.flatnonzero(usable)  # histories with at least one pair
        weights = self.lengths[usable].astype(np.float64)  # a history is drawn in proportion to its items
        self.cumulative = np.cumsum(weights / weights.sum()) if weights.size else weights
        self.window = window

    def __len__(self) -> int:
        return int(self.rows.size)

    def draw(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(count,) anchor ids and (count,) co-occurring ids."""
        uniform = torch.rand(3, count, generator=generator, dtype=torch.float64).numpy()  # (3, B)
        pick = np.minimum(np.searchsorted(self.cumulative, uniform[0]), self.rows.size - 1)
        rows = self.rows[pick]  # (B,)
        lengths = self.lengths[rows]
        anchor = np.floor(uniform[1] * lengths).astype(np.int64)  # (B,) in 0..n-1
        low = np.maximum(anchor - self.window, 0)
        high = np.minimum(anchor + self.window, lengths - 1)
        # A partner uniform over [low, high] without the anchor itself: draw among high - low slots, skip it.
        partner = low + np.floor(uniform[2] * (high - low)).astype(np.int64)
        partner += partner >= anchor
        return (torch.from_numpy(self.items[rows, anchor]), torch.from_numpy(self.items[rows, partner]))


class TunedItemTable(nn.Module):
    """v_i = normalise(head(c_i) + r_i) for every item (see the module docstring). ids (B,) -> (B, d)."""

    content: torch.Tensor

    def __init__(self, content: torch.Tensor, dim: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("content", content)  # (N + 1, C), frozen
        self.head = nn.Sequential(nn.Linear(content.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.residual = nn.Embedding(content.shape[0], dim)
        nn.init.zeros_(self.residual.weight)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep: (B,) 1 where the item's residual counts, 0 where it is dropped (None: all count)."""
        residual = self.residual(ids) if keep is None else self.residual(ids) * keep[:, None]
        return F.normalize(self.head(self.content[ids]) + residual, dim=-1)

    def content_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """The content-only vectors normalise(head(c_i)): what a cold item gets. (B,) -> (B, d)."""
        return F.normalize(self.head(self.content[ids]), dim=-1)


def info_nce(anchors: torch.Tensor, partners: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of (B, d) unit vectors: row b's partner is its positive, the batch's others are its
    negatives."""
    logits = anchors @ partners.T / temperature  # (B, B)
    targets = torch.arange(anchors.shape[0])
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def principal_content(content: np.ndarray, dims: int) -> np.ndarray:
    """normalise(P c_i) for every row: the content vectors, centred, on their top `dims` principal directions
    (computed over items 1..N, `pca_reduce`). A table narrower than `dims` leaves the missing directions at
    zero.

    (N + 1, C) -> (N + 1, dims) float32; row 0 (padding) stays zero.
    """
    out = np.zeros((content.shape[0], dims), dtype=np.float32)
    if dims == 0:
        return out
    items = content[1:]  # (N, C)
    kept = min(dims, *items.shape)
    out[1:, :kept] = l2_normalise(pca_reduce(items, kept).vectors)
    return out


@dataclass(frozen=True)
class TunedVectors:
    vectors: np.ndarray  # (N, d) tuned vectors of items 1..N: [content part ‖ learned part]
    content_only: np.ndarray  # (N, d) the same with the learned part's residuals left out
    seen: np.ndarray  # (N,) bool: the item occurs in a training history
    final_loss: float  # InfoNCE of the last 50 steps, averaged


def tune_table(content: np.ndarray, histories: np.ndarray, settings: TuneSettings,
               on_step: Callable[[int, float], None] | None = None) -> TunedVectors:
    """Tune item vectors on histories.

    Args:
        content: (N + 1, C) content vectors, row i = item i (row 0 = padding, never read).
        histories: (H, L) item ids of the training histories, 0 = padding.
        settings: see TuneSettings.
        on_step: called after every step with (step, loss).

    Returns:
        TunedVectors; a cold item's row of `vectors` is its row of `content_only`, exactly.
    """
    settings.check()
    n_rows = content.shape[0]
    if histories.size and (histories.min() < 0 or histories.max() >= n_rows):
        raise QinError(f"training histories hold item ids outside 0..{n_rows - 1} (the content table's rows)")
    pairs = HistoryPairs(histories, settings.window)
    if len(pairs) == 0:
        raise QinError("no training history holds two items: nothing to tune on")
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # the Linear layers' initialisation
    learned_dims = settings.dim - settings.content_dims
    table = TunedItemTable(torch.tensor(content, dtype=torch.float32), learned_dims, settings.hidden)
    optimizer = torch.optim.Adam(table.parameters(), lr=settings.learning_rate)
    losses: list[float] = []
    for step in range(settings.steps):
        anchor_ids, partner_ids = pairs.draw(settings.batch_size, generator)
        anchor_keep = partner_keep = None  # (B,) 1 = the item keeps its residual this step
        if settings.residual_dropout > 0:
            uniform = torch.rand(2, settings.batch_size, generator=generator)  # (2, B)
            anchor_keep, partner_keep = (uniform >= settings.residual_dropout).float()
        anchors, partners = table(anchor_ids, anchor_keep), table(partner_ids, partner_keep)  # (B, d) each
        loss = info_nce(anchors, partners, settings.temperature)
        residuals = table.residual(torch.cat([anchor_ids, partner_ids]))  # (2B, d)
        total = loss + settings.residual_l2 * residuals.pow(2).sum(dim=-1).mean()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    seen = np.zeros(n_rows, dtype=bool)
    seen[np.unique(histories)] = True
    seen[0] = False
    share = np.sqrt(settings.content_dims / settings.dim)  # a: the content part's share of the unit norm
    kept = share * principal_content(content, settings.content_dims)[1:]  # (N, content_dims)
    with torch.no_grad():
        ids = torch.arange(1, n_rows)
        learned, learned_content_only = table(ids).numpy(), table.content_vectors(ids).numpy()
    weight = np.float32(np.sqrt(1 - share**2))  # b
    return TunedVectors(vectors=np.concatenate([kept, weight * learned], axis=1),
                        content_only=np.concatenate([kept, weight * learned_content_only], axis=1),
                        seen=seen[1:], final_loss=float(np.mean(losses[-50:])))


# Rows of train.parquet read at a time: bounds the padded (rows, L) block to a few hundred MiB whatever the
# file's size (polars' `unique` on the whole list column took 12 GiB for the challenge's 3.6M rows).
HISTORY_BATCH_ROWS = 262_144
MAX_HISTORY_LENGTH = 4096


def read_histories(train: Path, batch_rows: int = HISTORY_BATCH_ROWS) -> np.ndarray:
    """The distinct `item_seq` lists of train.parquet that hold two items or more, as an (H, L) int64 matrix
    (left-padded with 0), in the order of their first occurrence; reads that column and nothing else.

    Streams the file in batches of `batch_rows` rows. Two histories count as the same when two independent
    random linear 64-bit hashes of their left-padded ids both agree: a false match needs both to collide,
    with probability below 1e-25 for the challenge's 3.6M rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_columns(train, [ITEM_SEQ])
    column_type = pq.read_schema(train).field(ITEM_SEQ).type
    if not (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)) \
            or not pa.types.is_integer(column_type.value_type):
        raise QinError(f"{train}: column {ITEM_SEQ} must be a list of integer item ids, not {column_type}")
    # (2, MAX) odd 64-bit weights; a history of width w uses the last w columns, so the zeros of left padding
    # add nothing and a history hashes alike in blocks of any width.
    weights = np.random.default_rng(0).integers(0, 2**63, size=(2, MAX_HISTORY_LENGTH), dtype=np.uint64)
    weights = weights * np.uint64(2) + np.uint64(1)
    blocks: list[np.ndarray] = []  # per batch: its first occurrences of histories with 2+ items, (k, width)
    codes: list[np.ndarray] = []  # per batch: their hashes, (k, 2)
    try:
        for batch in pq.ParquetFile(train).iter_batches(batch_size=batch_rows, columns=[ITEM_SEQ]):
            block = _padded_block(batch.column(0))  # (rows, width)
            if block.shape[1] > MAX_HISTORY_LENGTH:
                raise QinError(f"{train}: an item_seq holds {block.shape[1]} items; at most "
                               f"{MAX_HISTORY_LENGTH} are supported")
            block = block[(block != 0).sum(axis=1) >= 2]
            hashes = block.astype(np.uint64) @ weights[:, MAX_HISTORY_LENGTH - block.shape[1]:].T  # (rows, 2)
            first = _first_occurrences(hashes)
            kept = block[first]
            # Item ids fit int32 (the challenge has 91,718): half the memory while the file streams by.
            blocks.append(kept.astype(np.int32) if kept.size and kept.max() < 2**31 else kept)
            codes.append(hashes[first])
    except OSError as error:
        raise QinError(f"{train}: cannot read item_seq ({error})") from error
    all_codes = np.concatenate(codes) if codes else np.zeros((0, 2), dtype=np.uint64)  # (K, 2)
    first = _first_occurrences(all_codes)
    width = max((b.shape[1] for b in blocks), default=1)
    out = np.zeros((first.size, width), dtype=np.int64)  # (H, L)
    offset, start = 0, 0
    for block in blocks:
        mine = first[(first >= offset) & (first < offset + block.shape[0])] - offset
        out[start:start + mine.size, width - block.shape[1]:] = block[mine]
        offset, start = offset + block.shape[0], start + mine.size
    return out


def _first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """Rows of a (n, 2) hash matrix that hold a hash pair for the first time, ascending."""
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))  # stable: equal pairs keep their row order
    ordered = hashes[order]
    starts = np.ones(order.size, dtype=bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    return np.sort(order[starts])


def _padded_block(column: Any) -> np.ndarray:
    """An arrow list<int> column (rows,) as a (rows, longest) int64 matrix, each list right-aligned
    (left-padded with 0); a null list or null item is 0."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count:
        column = pc.if_else(pc.is_null(column), pa.scalar([], type=column.type), column)
    offsets = column.offsets.to_numpy().astype(np.int64)  # (rows + 1,)
    offsets -= offsets[0]  # a sliced array's offsets start where its slice does
    flat = pc.fill_null(column.flatten(), 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    lengths = np.diff(offsets)  # (rows,)
    rows = lengths.size
    width = int(lengths.max()) if rows else 0
    if rows and (lengths == width).all():  # the usual file: every list stored at the same length
        return flat.reshape(rows, width).copy()
    out = np.zeros((rows, width), dtype=np.int64)  # (rows, width)
    # Item e of row r lands in column width - (offsets[r+1] - e): flat index (r+1) width - offsets[r+1] + e.
    shift = np.arange(1, rows + 1) * width - offsets[1:]  # (rows,)
    out.reshape(-1)[np.repeat(shift, lengths) + np.arange(flat.size)] = flat
    return out


def tune_on_histories(content_table: Path, train: Path, out: Path, settings: TuneSettings | None = None,
                      progress: bool = True) -> TuneResult:
    """`qin embed --tune histories`: read a content table and the training histories, tune, write `out`.

    Args:
        content_table: an item table (item_info's schema) whose item_emb_d128 are the content vectors.
        train: train.parquet; only its item_seq column is read.
        out: the tuned table (item_info's schema; the content table's other columns are kept).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    settings = settings or TuneSettings()
    started = time.perf_counter()
    check_embed_output(Path(out), [Path(content_table), Path(train)])
    info = read_item_info(Path(content_table))
    check_columns(Path(content_table), [ITEM_EMB])
    content = vector_column(info.select(ITEM_EMB), ITEM_EMB, Path(content_table))  # (N + 1, C)
    histories = read_histories(Path(train))
    with Progress(TextColumn("tuning on histories"), BarColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeRemainingColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task("tune", total=settings.steps, loss="-")

        def advance(step: int, loss: float) -> None:
            bar.update(task, advance=1, loss=f"{loss:.3f}")

        tuned = tune_table(content, histories, settings, on_step=advance)
    write_item_table(info, tuned.vectors, Path(out))
    return TuneResult(out=Path(out), items=tuned.vectors.shape[0], warm_items=int(tuned.seen.sum()),
                      histories=histories.shape[0], final_loss=tuned.final_loss,
                      seconds=time.perf_counter() - started)
