"""The organisers' DIN baseline, assembled from FuxiCTR's own layers and trained by FuxiCTR's `BaseModel.fit`.

Runs in benchmarks/work/fuxictr-venv (created by benchmarks/peer_fuxictr.py), never in the qin venv:

    fuxictr-venv/bin/python benchmarks/peer/fuxictr_din.py --raw DATA/MicroLens_1M_x1 --work DIR \
        --max-len 64 --epochs 2 --batch-size 8192 --json OUT.json

What is FuxiCTR's and what is this file's:
- FuxiCTR (PyPI `fuxictr`, the challenge used 2.3.7): `FeatureProcessor` and
  `build_dataset(rebuild_dataset=False)` turn the dataset config into `feature_map.json` (as the organisers'
  run_expid.py did); `FeatureEmbedding` (item id / tag embeddings, tag mean pooling, the 128->128
  projection of the frozen multimodal vector), `DIN_Attention`, `MLP_Block`, and the whole training loop
  `BaseModel.fit` (Adam, BCE, clip-norm 10, evaluate once per epoch, LR x0.1 on plateau, keep the best
  weights).
- This file: the DIN class (the organisers' `src/DIN.py` is not in the PyPI package; it is re-typed here in
  its few lines: item vectors of [history ..., target] from one embedding call, DIN attention, DNN) and the
  data loader. The organisers' MMCTRDataLoader gathers item_info rows for [item_seq[-max_len:], item_id]
  per batch; this loader does the same gather but indexes a whole batch at once with numpy (their
  collate went row by row through pandas), so loading is cheaper than theirs; the timing below is of the
  training step only either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import polars as pl
import torch
from fuxictr.features import FeatureMap
from fuxictr.preprocess import FeatureProcessor, build_dataset
from fuxictr.pytorch.layers import DIN_Attention, FeatureEmbedding, MLP_Block
from fuxictr.pytorch.models import BaseModel
from fuxictr.pytorch.torch_utils import seed_everything
from fuxictr.utils import not_in_whitelist
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

DATASET_ID = "MicroLens_1M_x1"


# ------------------------------------------------------------------------------------------------ the model
class DIN(BaseModel):
    """The challenge's DIN (reczoo WWW2025_MMCTR_Challenge src/DIN.py), from FuxiCTR layers."""

    def __init__(self, feature_map, model_id="DIN", gpu=-1, dnn_hidden_units=(1024, 512, 256),
                 dnn_activations="ReLU", attention_hidden_units=(512, 256),
                 attention_hidden_activations="ReLU", attention_output_activation=None, attention_dropout=0.1,
                 learning_rate=1e-3, embedding_dim=64,
                 net_dropout=0.1, batch_norm=True, din_use_softmax=False, embedding_regularizer=None,
                 net_regularizer=None, **kwargs):
        super().__init__(feature_map, model_id=model_id, gpu=gpu, embedding_regularizer=embedding_regularizer,
                         net_regularizer=net_regularizer, **kwargs)
        self.item_info_dim = sum(spec.get("embedding_dim", embedding_dim)
                                 for spec in feature_map.features.values() if spec.get("source") == "item")
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.attention_layers = DIN_Attention(self.item_info_dim,
                                              attention_units=list(attention_hidden_units),
                                              hidden_activations=attention_hidden_activations,
                                              output_activation=attention_output_activation,
                                              dropout_rate=attention_dropout, use_softmax=din_use_softmax)
        input_dim = feature_map.sum_emb_out_dim() + self.item_info_dim
        self.dnn = MLP_Block(input_dim=input_dim, output_dim=1, hidden_units=list(dnn_hidden_units),
                             hidden_activations=dnn_activations, output_activation=self.output_activation,
                             dropout_rates=net_dropout, batch_norm=batch_norm)
        self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
        self.reset_parameters()
        self.model_to_device()
        self.step_seconds: list[float] = []
        self.evaluations: list[dict] = []

    def forward(self, inputs):
        batch_dict, item_dict, mask = self.get_inputs(inputs)
        emb_list = []
        if batch_dict:
            emb_list.append(self.embedding_layer(batch_dict, flatten_emb=True))  # (B, 2 d_e)
        item_feat_emb = self.embedding_layer(item_dict, flatten_emb=True)  # (B (L+1), d_i)
        item_feat_emb = item_feat_emb.view(mask.shape[0], -1, self.item_info_dim)  # (B, L+1, d_i)
        target_emb = item_feat_emb[:, -1, :]
        sequence_emb = item_feat_emb[:, 0:-1, :]
        pooling_emb = self.attention_layers(target_emb, sequence_emb, mask)
        emb_list += [target_emb, pooling_emb]
        return {"y_pred": self.dnn(torch.cat(emb_list, dim=-1))}

    def get_inputs(self, inputs, feature_source=None):
        batch_dict, item_dict, mask = inputs
        x_dict = {}
        for feature, value in batch_dict.items():
            if feature in self.feature_map.labels:
                continue
            spec = self.feature_map.features[feature]
            if spec["type"] == "meta":
                continue
            if feature_source and not_in_whitelist(spec["source"], feature_source):
                continue
            x_dict[feature] = value.to(self.device)
        return x_dict, {k: v.to(self.device) for k, v in item_dict.items()}, mask.to(self.device)

    def get_labels(self, inputs):
        return inputs[0][self.feature_map.labels[0]].to(self.device).float().view(-1, 1)

    def train_step(self, batch_data):  # BaseModel.train_step, timed
        started = time.perf_counter()
        loss = super().train_step(batch_data)
        value = loss.item()
        self.step_seconds.append(time.perf_counter() - started)
        self._rows = getattr(self, "_rows", 0) + int(batch_data[2].shape[0])
        return torch.tensor(value)

    def evaluate(self, data_generator, metrics=None):
        started = time.perf_counter()
        logs = super().evaluate(data_generator, metrics)
        self.evaluations.append({"epoch": self._epoch_index + 1 if hasattr(self, "_epoch_index") else None,
                                 "lr": self.optimizer.param_groups[0]["lr"],
                                 **{k: float(v) for k, v in logs.items()},
                                 "seconds": round(time.perf_counter() - started, 2)})
        return logs


# ------------------------------------------------------------------------------------------------- the data
class Batches(Dataset):
    """Indexed by a list of row numbers: (batch_dict, item_dict, mask), as MMCTRDataLoader's collate."""

    def __init__(self, path: Path, items: dict[str, np.ndarray], max_len: int):
        frame = pl.read_parquet(path)
        seq = frame["item_seq"]
        width = seq.list.len().max()
        self.history = np.asarray(seq.explode().to_numpy(), dtype=np.int64).reshape(frame.height, width)
        self.history = np.ascontiguousarray(self.history[:, -max_len:])  # as the organisers: item_seq[:, -L:]
        self.columns = {c: frame[c].to_numpy() for c in ("likes_level", "views_level", "label")
                        if c in frame.columns}
        self.item_id = frame["item_id"].to_numpy().astype(np.int64)
        self.items = items
        self.rows = frame.height

    def __len__(self):
        return self.rows

    def __getitem__(self, index):
        index = np.asarray(index)
        history = self.history[index]  # (B, L)
        batch_dict = {c: torch.from_numpy(np.ascontiguousarray(v[index])) for c, v in self.columns.items()}
        mask = torch.from_numpy(history > 0).float()
        flat = np.hstack([history, self.item_id[index, None]]).reshape(-1)  # (B (L+1),) target last
        item_dict = {name: torch.from_numpy(table[flat]) for name, table in self.items.items()}
        return batch_dict, item_dict, mask


def loader(dataset: Batches, batch_size: int, shuffle: bool) -> DataLoader:
    sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None,
                      num_workers=0)


def read_items(path: Path) -> dict[str, np.ndarray]:
    frame = pl.read_parquet(path).sort("item_id")
    assert (frame["item_id"].to_numpy() == np.arange(frame.height)).all(), "item_info must hold ids 0..V-1"
    return {
        "item_id": frame["item_id"].to_numpy().astype(np.int64),
        "item_tags": np.asarray(frame["item_tags"].explode().to_numpy(),
                                dtype=np.int64).reshape(frame.height, -1),
        "item_emb_d128": np.asarray(frame["item_emb_d128"].explode().to_numpy(),
                                    dtype=np.float32).reshape(frame.height, -1),
    }


def feature_map_for(raw: Path, work: Path, items: dict[str, np.ndarray], embedding_dim: int) -> FeatureMap:
    """The organisers' dataset_config (vocabularies from this data) through FeatureProcessor/build_dataset."""
    n_items = items["item_id"].shape[0]
    n_tags = int(items["item_tags"].max()) + 2  # as 11740 for tag ids 0..11738 in the challenge's config
    feature_cols = [
        {"name": "user_id", "active": True, "dtype": "int", "type": "meta"},
        {"name": "item_seq", "active": True, "dtype": "int", "type": "meta"},
        {"name": "likes_level", "active": True, "dtype": "int", "type": "categorical", "vocab_size": 11},
        {"name": "views_level", "active": True, "dtype": "int", "type": "categorical", "vocab_size": 11},
        {"name": "item_id", "active": True, "dtype": "int", "type": "categorical", "vocab_size": n_items,
         "source": "item"},
        {"name": "item_tags", "active": True, "dtype": "int", "type": "sequence", "max_len": 5,
         "vocab_size": n_tags, "source": "item"},
        {"name": "item_emb_d128", "active": True, "dtype": "float", "type": "embedding", "embedding_dim": 128,
         "source": "item"},
    ]
    params = {"dataset_id": DATASET_ID, "data_root": str(work), "data_format": "parquet",
              "feature_cols": feature_cols, "label_col": {"name": "label", "dtype": "float"},
              "train_data": str(raw / "train.parquet"), "valid_data": str(raw / "valid.parquet"),
              "test_data": str(raw / "test.parquet"), "rebuild_dataset": False,
              "embedding_dim": embedding_dim}
    processor = FeatureProcessor(**params)
    build_dataset(processor, **params)  # rebuild_dataset=False: writes feature_map.json only
    feature_map = FeatureMap(DATASET_ID, os.path.join(str(work), DATASET_ID))
    feature_map.load(os.path.join(str(work), DATASET_ID, "feature_map.json"), params)
    return feature_map


def versions() -> dict[str, str]:
    out = {}
    for name in ("fuxictr", "torch", "numpy", "scikit-learn", "pandas", "polars"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True,
                        help="folder with train/valid/test/item_info.parquet")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--seed", type=int, default=20242025)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    items = read_items(args.raw / "item_info.parquet")
    feature_map = feature_map_for(args.raw, args.work, items, args.embedding_dim)
    train = Batches(args.raw / "train.parquet", items, args.max_len)
    valid = Batches(args.raw / "valid.parquet", items, args.max_len)
    load_seconds = time.perf_counter() - started
    model_root = args.work / "checkpoints"
    (model_root / DATASET_ID).mkdir(parents=True, exist_ok=True)
    # DIN_default (docs/model.md section 7 / docs/data.md section 4): emb 64, attention MLP [512, 256] ReLU,
    # attention dropout 0.1, no softmax, DNN [1024, 512, 256] ReLU with BN, net dropout 0.1, lr 1e-3,
    # emb_reg 0, Adam, BCE.
    model = DIN(feature_map, model_id="DIN_peer", gpu=-1, embedding_dim=args.embedding_dim,
                dnn_hidden_units=[1024, 512, 256], attention_hidden_units=[512, 256],
                attention_hidden_activations="ReLU", attention_dropout=0.1, din_use_softmax=False,
                net_dropout=0.1, batch_norm=True, learning_rate=args.learning_rate, embedding_regularizer=0,
                net_regularizer=0, optimizer="adam", loss="binary_crossentropy", metrics=["AUC", "logloss"],
                monitor={"AUC": 1, "logloss": 0}, monitor_mode="max", early_stop_patience=args.patience,
                save_best_only=True, verbose=0, model_root=str(model_root))
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fit_started = time.perf_counter()
    model.fit(loader(train, args.batch_size, shuffle=True), epochs=args.epochs,
              validation_data=loader(valid, args.batch_size, shuffle=False), max_gradient_norm=10.0)
    fit_seconds = time.perf_counter() - fit_started
    final = model.evaluate(loader(valid, args.batch_size, shuffle=False), metrics=["AUC", "logloss"])
    train_seconds = float(sum(model.step_seconds))
    steps = np.asarray(model.step_seconds)
    record = {
        "measurement": "fuxictr_din", "model": "FuxiCTR DIN (DIN_default settings)", "raw": str(args.raw),
        "max_len": args.max_len, "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "embedding_dim": args.embedding_dim, "parameters": parameters,
        "train_rows": train.rows, "valid_rows": valid.rows, "steps": len(model.step_seconds),
        "rows_trained": int(model._rows), "train_seconds": round(train_seconds, 2),
        "samples_per_second": round(model._rows / train_seconds, 1),
        "median_step_seconds_after_first": round(float(np.median(steps[1:] if steps.size > 1 else steps)), 3),
        "fit_wall_seconds": round(fit_seconds, 2), "load_seconds": round(load_seconds, 2),
        "valid_auc": float(final["AUC"]), "valid_logloss": float(final["logloss"]),
        "evaluations": model.evaluations[:-1], "feature_map": {k: v for k, v in feature_map.features.items()},
        "versions": versions(), "threads": torch.get_num_threads(), "python": platform.python_version(),
        "seconds_in_process": round(time.perf_counter() - started, 2),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    short = {k: v for k, v in record.items() if k not in ("evaluations", "feature_map")}
    print(json.dumps(short), file=sys.stderr)


if __name__ == "__main__":
    main()
