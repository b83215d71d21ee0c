"""Typed model inputs: one `Batch` of impressions, the `ItemTables` every item vector needs and the
`Vocab` (table sizes) the embeddings are built with.

Notation: B batch rows, L history slots (max_len), V item vocabulary (rows of item_info),
T tags per item (5), M multimodal width (128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qin.errors import QinError

# Raw likes/views levels are stored shifted by this (raw 0..9 -> 1..10) so that 0 is free for padding;
# encoded level LEVEL_SHIFT is therefore raw level 0 (see ModelConfig.level_zero).
LEVEL_SHIFT = 1


@dataclass(frozen=True)
class Batch:
    """B impressions. Ids are int64 on the model's device; 0 is padding everywhere."""

    target_item: torch.Tensor  # (B,) int64 item ids >= 1
    history: torch.Tensor  # (B, L) int64 item ids, 0 = padding, most recent last
    likes_level: torch.Tensor  # (B,) int64 encoded level (raw level + 1, 0 = padding)
    views_level: torch.Tensor  # (B,) int64
    label: torch.Tensor | None = None  # (B,) float32 0/1, None for test rows

    @property
    def size(self) -> int:
        return int(self.target_item.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, non_blocking=non_blocking)

        return Batch(
            target_item=move(self.target_item),
            history=move(self.history),
            likes_level=move(self.likes_level),
            views_level=move(self.views_level),
            label=None if self.label is None else move(self.label),
        )


@dataclass(frozen=True)
class ItemTables:
    """Side information per item, row i = item i (row 0 = padding item)."""

    tags: torch.Tensor  # (V, T) int64 tag ids, 0 = padding
    mm_emb: torch.Tensor  # (V, M) float32 frozen multimodal vectors

    @property
    def num_items(self) -> int:
        return int(self.tags.shape[0])


@dataclass(frozen=True)
class Vocab:
    """Table sizes, from the feature manifest (item_vocab, tag_vocab, level_vocab); 0 is padding in each."""

    items: int  # rows of the item table, padding row included (91718 on the challenge data)
    tags: int  # 11740
    levels: int  # likes_level / views_level vocabulary (11)

    def __post_init__(self) -> None:
        for key in ("items", "tags", "levels"):
            if getattr(self, key) < 1:
                raise QinError(f"vocab.{key} must be >= 1, got {getattr(self, key)}")
