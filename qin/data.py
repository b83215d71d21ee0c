"""From the preprocessed feature folder to `Batch`es: tensor slices and gathers, no Python per row.

A split is held as a few contiguous tensors (`SplitTensors`); a batch is one index gather per
tensor. Shuffling is a permutation drawn from a generator seeded by (seed, epoch), so an epoch's
order can be re-created exactly when a run resumes mid-epoch.

Notation: N rows in the split, L history slots (max_len), B batch rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from qin.batch import Batch, ItemTables, Vocab
from qin.config import MMNormalize
from qin.features.io import FeatureSet, SplitArrays


@dataclass(frozen=True)
class SplitTensors:
    """One split in memory. Ids stay int32 (half the memory of int64) until a batch is cut."""

    item_id: torch.Tensor  # (N,) int32
    history: torch.Tensor  # (N, L) int32, 0 = padding, most recent last
    likes_level: torch.Tensor  # (N,) int8
    views_level: torch.Tensor  # (N,) int8
    label: torch.Tensor | None  # (N,) float32, None for test

    @property
    def rows(self) -> int:
        return int(self.item_id.shape[0])

    @staticmethod
    def from_arrays(arrays: SplitArrays, pin_memory: bool = False) -> SplitTensors:
        def tensor(array: np.ndarray) -> torch.Tensor:
            # np.load(mmap_mode="r") arrays are read-only; copy once into owned, contiguous memory.
            out = torch.from_numpy(np.array(array, copy=True, order="C"))
            return out.pin_memory() if pin_memory else out

        return SplitTensors(
            item_id=tensor(arrays.item_id),
            history=tensor(arrays.history),
            likes_level=tensor(arrays.likes_level),
            views_level=tensor(arrays.views_level),
            label=None if arrays.label is None else tensor(arrays.label),
        )

    def to(self, device: torch.device) -> SplitTensors:
        """The same rows on `device`."""
        return SplitTensors(
            item_id=self.item_id.to(device),
            history=self.history.to(device),
            likes_level=self.likes_level.to(device),
            views_level=self.views_level.to(device),
            label=None if self.label is None else self.label.to(device),
        )

    def shard(self, rank: int, world_size: int) -> SplitTensors:
        """Rows rank, rank+W, rank+2W, ...: a disjoint share for one of W processes."""
        index = torch.arange(rank, self.rows, world_size)
        return self.take(index)

    def take(self, index: torch.Tensor) -> SplitTensors:
        return SplitTensors(
            item_id=self.item_id[index],
            history=self.history[index],
            likes_level=self.likes_level[index],
            views_level=self.views_level[index],
            label=None if self.label is None else self.label[index],
        )

    def batch(self, index: torch.Tensor | slice) -> Batch:
        """Rows `index` as a Batch with int64 ids (what nn.Embedding and the model expect)."""
        return Batch(
            target_item=self.item_id[index].long(),  # (B,)
            history=self.history[index].long(),  # (B, L)
            likes_level=self.likes_level[index].long(),  # (B,)
            views_level=self.views_level[index].long(),  # (B,)
            label=None if self.label is None else self.label[index],  # (B,)
        )


def epoch_order(rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled row order of one epoch: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(rows, generator=generator)  # (N,)


def iterate_batches(
    split: SplitTensors, batch_size: int, order: torch.Tensor | None = None, start_batch: int = 0
) -> Iterator[Batch]:
    """Batches of `batch_size` rows (the last one may be smaller, as in the reference loader).

    `order` is a permutation of the rows (None = file order); `start_batch` skips the first
    batches, which is how a resumed run continues mid-epoch.
    """
    rows = split.rows if order is None else int(order.numel())
    for start in range(start_batch * batch_size, rows, batch_size):
        if order is None:
            yield split.batch(slice(start, start + batch_size))
        else:
            yield split.batch(order[start : start + batch_size])


def num_batches(rows: int, batch_size: int) -> int:
    return (rows + batch_size - 1) // batch_size


def vocab_of(features: FeatureSet) -> Vocab:
    manifest = features.manifest
    return Vocab(items=int(manifest["item_vocab"]), tags=int(manifest["tag_vocab"]),
                 levels=int(manifest["level_vocab"]))


def item_tables_of(features: FeatureSet, mm_normalize: MMNormalize = MMNormalize.none) -> ItemTables:
    """The model's item side tables; `mm_normalize` rescales the frozen multimodal vectors."""
    mm_emb = torch.from_numpy(np.array(features.item_emb, dtype=np.float32))  # (V, M)
    match mm_normalize:
        case MMNormalize.none:
            pass
        case MMNormalize.l2:
            mm_emb = mm_emb / mm_emb.norm(dim=1, keepdim=True).clamp_min(1e-12)  # row 0 (zeros) stays zero
        case _:
            raise ValueError(f"unknown mm_normalize {mm_normalize!r}")
    return ItemTables(tags=torch.from_numpy(np.array(features.item_tags, dtype=np.int64)), mm_emb=mm_emb)
