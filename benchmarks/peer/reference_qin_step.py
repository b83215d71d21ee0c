"""The published QIN's training step (salmon1802/QIN `QIN_variety_v9`, FuxiCTR 2.3.7), timed on given batches.

Runs in benchmarks/work/fuxictr-venv (created by benchmarks/peer_fuxictr.py), never in the qin venv, and
imports the model class from a checkout of the published code (`--reference-src`, the repository root; its
`src/QIN_variety_v9.py` is used as it is, nothing of it is copied here):

    fuxictr-venv/bin/python benchmarks/peer/reference_qin_step.py --reference-src benchmarks/work/QIN \
        --batches BATCHES.npz --warmup 1 --steps 3 --threads 2 --json OUT.json

The batches come from benchmarks/reference_speed.py (challenge-shaped, the same rows our step is timed on).
The model gets the challenge's dataset_config (likes/views levels vocabulary 11, item_id 91,718,
item_tags 11,740 with max_len 5 and mean pooling, item_emb_d128 through a 128x128 projection) and the
published `QIN_variety_v9` hyper-parameters (embedding 128, 4 layers, 4 rows, dropout 0.1, BatchNorm,
Adam lr 2e-3, embedding_regularizer 2e-4 over the whole tables, clip-norm 10). Timed: the reference's own
`train_step` (forward, BCE plus regulariser, backward, clip, Adam step, zero_grad). Not timed: the item_info
gather the reference's collator does per batch (done here with numpy before the clock starts), as our side
of the comparison excludes data loading too.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from fuxictr.features import FeatureMap
from fuxictr.pytorch.torch_utils import seed_everything

# The published hyper-parameters (config/qin_config/model_config.yaml, section QIN_variety_v9).
PUBLISHED = {"learning_rate": 2e-3, "embedding_regularizer": 2e-4, "net_regularizer": 0, "embedding_dim": 128,
             "num_layers": 4, "num_row": 4, "net_dropout": 0.1, "batch_norm": True}


def challenge_feature_map(items: int, tags: int, embedding_dim: int) -> FeatureMap:
    """The feature map FuxiCTR's processor builds from the challenge's dataset_config (vocabularies given)."""
    feature_map = FeatureMap("MicroLens_1M_x1", ".")
    feature_map.features = OrderedDict([
        ("user_id", {"source": "", "type": "meta"}),
        ("item_seq", {"source": "", "type": "meta"}),
        ("likes_level", {"source": "", "type": "categorical", "padding_idx": 0, "vocab_size": 11}),
        ("views_level", {"source": "", "type": "categorical", "padding_idx": 0, "vocab_size": 11}),
        ("item_id", {"source": "item", "type": "categorical", "padding_idx": 0, "vocab_size": items}),
        ("item_tags", {"source": "item", "type": "sequence", "padding_idx": 0, "vocab_size": tags,
                       "max_len": 5, "feature_encoder": "layers.MaskedAveragePooling()"}),
        ("item_emb_d128", {"source": "item", "type": "embedding", "embedding_dim": 128}),
    ])
    feature_map.labels = ["label"]
    feature_map.default_emb_dim = embedding_dim  # FeatureMap.load sets it from the run's params
    feature_map.num_fields = feature_map.get_num_fields()
    return feature_map


def reference_inputs(batch: dict[str, np.ndarray], tags: np.ndarray, mm: np.ndarray):
    """What the reference's BatchCollator hands the model: (batch_dict, item_dict, mask), item_dict over
    [history..., target] per row, flattened; mask 1.0 at real history slots."""
    history, target = batch["history"], batch["target_item"]
    items = np.hstack([history, target[:, None]]).reshape(-1)
    batch_dict = {"likes_level": torch.from_numpy(batch["likes_level"]),
                  "views_level": torch.from_numpy(batch["views_level"]),
                  "label": torch.from_numpy(batch["label"])}
    item_dict = {"item_id": torch.from_numpy(items), "item_tags": torch.from_numpy(tags[items]),
                 "item_emb_d128": torch.from_numpy(mm[items])}
    return batch_dict, item_dict, torch.from_numpy((history > 0).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-src", type=Path, required=True,
                        help="root of a checkout of https://github.com/salmon1802/QIN")
    parser.add_argument("--batches", type=Path, required=True, help=".npz from benchmarks/reference_speed.py")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=20242025)
    args = parser.parse_args()
    model_file = args.reference_src / "src" / "QIN_variety_v9.py"
    if not model_file.is_file():
        sys.exit(f"{model_file} not found: --reference-src must be the root of a salmon1802/QIN checkout")
    sys.path.insert(0, str(args.reference_src / "src"))
    from QIN_variety_v9 import QIN_variety_v9  # noqa: E402  (the published model, imported as it is)

    if args.threads:
        torch.set_num_threads(args.threads)
    data = np.load(args.batches)
    tags, mm = data["item_tags"], data["item_mm"]
    steps = int(data["steps"])
    fields = ("history", "target_item", "likes_level", "views_level", "label")
    batches = [{key: data[f"{key}_{index}"] for key in fields} for index in range(steps)]
    seed_everything(args.seed)
    feature_map = challenge_feature_map(items=tags.shape[0], tags=int(data["tag_vocab"]),
                                      embedding_dim=PUBLISHED["embedding_dim"])
    work = args.json.parent / "reference_checkpoints"
    model = QIN_variety_v9(feature_map, gpu=-1, optimizer="adam", loss="binary_crossentropy",
                           metrics=["AUC", "logloss"], model_root=str(work), verbose=0, **PUBLISHED)
    model.train()
    # What BaseModel.fit sets before its first step (its default max_gradient_norm is 10).
    model._batch_index = 0
    model._max_gradient_norm = 10.0
    times = []
    for index, batch in enumerate(batches):
        inputs = reference_inputs(batch, tags, mm)
        start = time.perf_counter()
        float(model.train_step(inputs))
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    rows = batches[0]["history"].shape[0]
    record = {"model": "QIN_variety_v9 (published code)", "reference_src": str(args.reference_src),
              "parameters": sum(p.numel() for p in model.parameters()),
              "batch_size": rows, "steps_timed": len(times), "step_seconds": times,
              "seconds_per_step": float(np.mean(times)), "samples_per_second": rows / float(np.mean(times)),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    args.json.write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "step_seconds"}))


if __name__ == "__main__":
    main()
