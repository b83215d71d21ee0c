"""One typed, frozen config tree: YAML -> `Config` -> (DataConfig, ModelConfig, TrainConfig).

A YAML file has up to three sections (`data`, `model`, `train`) and an optional `base:` key naming
another YAML file (relative to this one) whose values it overrides, so variants in `configs/` are
small diffs over `qin.yaml`. Unknown keys and wrongly typed values are errors that name the key
(`train.learnig_rate`), never silently ignored: FuxiCTR's flat `**kwargs` dict swallowed typos.

The sections are pydantic models whose field types and bounds are the one statement of what a valid
config is: pydantic checks a config against them, and `Config.json_schema()` turns them into
docs/qin.schema.json, so that an editor can check qin.yaml as it is typed. pydantic reports problems
over several lines; `_one_line` makes the first one qin's `<source>: <section>.<key> <problem>`.
"""

from __future__ import annotations

import enum
import json
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from qin.errors import QinError


class ModelName(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    """Every model `qin train` can build; each is a small class in `qin/model/`."""

    qin = "qin"  # the published QIN: ASTA + QIN's quadratic tower (reference configuration)
    qin_softmax = "qin_softmax"  # ablation: ASTA scores normalised with a softmax
    qin_no_asta = "qin_no_asta"  # ablation: no attention; the tower sees the other fields and the target
    qin_mlp = "qin_mlp"  # ablation: an MLP in place of the quadratic tower
    qin_no_prelu = "qin_no_prelu"  # ablation: quadratic tower without its PReLU
    qnn_alpha = "qnn_alpha"  # ASTA + the QNN-alpha tower (mid-activation, heads) with Self-Ensemble loss
    din = "din"  # the organisers' DIN baseline (FuxiCTR DIN_default)
    mean_pool_mlp = "mean_pool_mlp"  # baseline: mean of the history item vectors, then an MLP
    qin_plus = "qin_plus"  # softmax ASTA + history mean + similarity block, quadratic tower + MLP (best.yaml)
    dcnv2 = "dcnv2"  # ASTA (as QIN) + a DCNv2 tower: cross network v2 beside a DNN (FuxiCTR 'parallel')
    din_sa = "din_sa"  # DIN with a self-attention (Transformer encoder) layer over the history first
    transformer_dcn = "transformer_dcn"  # 1st place: Transformer over [history ‖ target] + DCNv2
    dlf = "dlf"  # ASTA (as QIN) + a DLF tower: low-order interaction layers with attention fusion


class Regularization(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    """How the embedding L2 term is computed."""

    full = "full"  # reference: lambda/2 * ||W||^2 over the whole tables every step
    batch = "batch"  # cheaper, NOT the reference math: only rows used in the batch (plus W_mm)


class MMNormalize(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    """How the frozen multimodal vectors are scaled before the model sees them."""

    none = "none"  # as stored (the reference: raw PCA outputs, whose top components have std of
    #                several units)
    l2 = "l2"  # each item's vector to unit L2 norm (row 0 stays zero)


class BCEForm(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    """How the binary cross-entropy of a training step is computed."""

    # The reference: BCE on the float32 sigmoid (F.binary_cross_entropy). Its log terms clamp at -100,
    # so a row whose sigmoid rounds to exactly 0 or 1 adds a constant and NO gradient.
    probabilities = "probabilities"
    logits = "logits"  # BCE-with-logits: numerically stable; every row keeps its gradient


class LevelZero(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    """What the likes/views embeddings do with raw level 0 (a real value in the data)."""

    padding = "padding"  # the reference: level 0 reads the padding row (zero, never trained)
    embedded = "embedded"  # level 0 gets a trained row of its own, like levels 1..9


class TransformerMask(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    """transformer_dcn's src_key_padding_mask (True = a key attention ignores)."""

    correct = "correct"  # True on the PADDING slots: attention sees the real history items
    as_published = "as_published"  # the published bug: True on the REAL slots, so attention sees padding


class DeviceChoice(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    """Where training runs."""

    auto = "auto"  # CUDA when present, else CPU
    cpu = "cpu"
    cuda = "cuda"


# Value types. Strict, because YAML is loose: `true` is not the int 1, `2.5` is not the int 2, `1` is
# not the bool true, and a path written `2024` is not text unless quoted (--set keeps it text, see
# `_apply_override`). A float field takes ints and numeric text (see `_Section._floats_from_text`) but
# never NaN or inf: NaN would pass every bound, since each comparison with it is False.
Real = Annotated[float, Strict(), AllowInfNan(False)]
Widths = Annotated[list[Annotated[StrictInt, Field(ge=1)]], Field(min_length=1)]  # layer widths of an MLP


class _Section(BaseModel):
    # frozen: a config is stored in checkpoints and compared on resume, so it never changes in place
    # (`Config.replace` makes a validated copy). extra="forbid": a misspelt key is an error, not ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _floats_from_text(cls, values: Any) -> Any:
        """PyYAML reads YAML 1.1, in which `1e-3` (no dot) is the string '1e-3': a float field takes such
        text as the number it spells. Only float fields: a path written `2024` stays a type error."""
        if not isinstance(values, dict):
            return values  # pydantic says "must be a mapping"
        floats = {name for name, info in cls.model_fields.items() if float in _types_in(info.annotation)}
        return {key: _as_float(value) if key in floats else value for key, value in values.items()}


class DataConfig(_Section):
    """Where the raw challenge files are and how features are cut."""

    raw_dir: StrictStr = Field(
        "data/MicroLens_1M_x1",
        description="Folder with the challenge's train/valid/test/item_info parquet files (MicroLens_1M_x1).")
    item_info: StrictStr | None = Field(
        None, description="Another item table (same schema, e.g. from `qin embed`) used in place of "
                          "raw_dir/item_info.parquet; null = raw_dir's own.")
    features_root: StrictStr = Field(
        "features", description="`qin preprocess` writes <features_root>/<name>/.")
    max_len: StrictInt = Field(
        64, ge=1, description="Most recent history items kept per row (the reference's item_seq[:, -64:]).")
    mm_normalize: MMNormalize = Field(
        MMNormalize.none,
        description="Scaling of item_emb_d128 at load time (the feature folder keeps the raw values): none = "
                    "as stored (the reference) | l2 = each item's vector to unit norm. Quadratic towers "
                    "multiply their inputs, so an input scale of several units slows their training badly; "
                    "see docs/quality.md.")


class ModelConfig(_Section):
    """Architecture. The defaults are QIN_variety_v9 as published (docs/model.md section 4)."""

    name: ModelName = Field(
        ModelName.qin,
        description="The model to build: qin (the published QIN) | qin_softmax, qin_no_asta, qin_mlp, "
                    "qin_no_prelu (ablations) | qnn_alpha | din (the organisers' baseline) | mean_pool_mlp | "
                    "qin_plus | dcnv2 | transformer_dcn | din_sa | dlf.")
    embedding_dim: StrictInt = Field(
        128, ge=1, description="Every field's embedding width; an item vector is 3x this (id, tags, "
                               "multimodal).")
    num_layers: StrictInt = Field(4, ge=1, description="Quadratic (or MLP) tower depth.")
    num_row: StrictInt = Field(
        4, ge=1, description="R: rows of the Khatri-Rao product per layer; docs/model.md section 2.4 notes 3 "
                             "as the stable fallback.")
    num_heads: StrictInt = Field(
        1, ge=1, description="QNN-alpha heads (H); must divide embedding_dim. QIN's own tower has none.")
    net_dropout: Real = Field(
        0.1, ge=0, lt=1, description="Dropout on the tower's linear branch and after its activation.")
    batch_norm: StrictBool = Field(True, description="BatchNorm1d after each Khatri-Rao product.")
    attention_dim: StrictInt | None = Field(
        None, ge=1, description="ASTA width; null = 2 x the item vector width (768 in the reference).")
    mlp_hidden: Widths = Field(
        [1024, 512, 256], description="Layer widths of DIN's DNN and the MLP ablation.")
    din_attention_hidden: Widths = Field([512, 256], description="Layer widths of DIN's attention MLP.")
    din_attention_dropout: Real = Field(0.1, ge=0, lt=1, description="DIN's attention dropout.")
    unique_items: StrictBool = Field(
        True, description="Runtime, not math: compute item vectors and key/value projections once per "
                          "unique item in the batch (fast) or once per history slot (the reference's way). "
                          "Both give the same logits.")
    bce: BCEForm = Field(
        BCEForm.probabilities,
        description="probabilities = the reference: BCE of the float32 sigmoid, whose logs clamp at -100, so "
                    "saturated rows get no gradient | logits = the stable BCE-with-logits.")
    level_zero: LevelZero = Field(
        LevelZero.padding,
        description="padding = the reference: raw likes/views level 0 reads the zero padding row, never "
                    "trained | embedded = level 0 trains a row of its own.")
    qnn_alpha_bounded: StrictBool = Field(
        False, description="qnn_alpha only, not the published math: per-field LayerNorm (GroupNorm) on the "
                           "tower input and BatchNorm after each Khatri-Rao product (QIN's place), so the "
                           "degree-2^L tower stays bounded when ASTA's unnormalised output is large. false = "
                           "the published tower.")
    cross_layers: StrictInt = Field(
        3, ge=1, description="dcnv2 / transformer_dcn: layers of the cross network v2 (full-rank W per "
                             "layer unless cross_rank is set); its DNN beside it is mlp_hidden.")
    cross_rank: StrictInt = Field(
        0, ge=0, description="dcnv2 / transformer_dcn: 0 = full-rank cross layers W_l (D x D, as "
                             "published) | r > 0 = the DCNv2 paper's low-rank cross W_l = U_l V_l^T (D x r "
                             "each), 2 D r instead of D^2 weights per layer.")
    transformer_mask: TransformerMask = Field(
        TransformerMask.correct,
        description="transformer_dcn: correct = the key padding mask is True on padding slots | "
                    "as_published = the published bug, True on the real slots (attention sees padding; a "
                    "row with every key masked gets zeros).")
    dlf_layers: StrictInt = Field(3, ge=1, description="dlf: DLF layers (the authors' attention_layers).")
    dlf_tokens: StrictInt = Field(
        16, ge=1, description="dlf: tokens each block of a layer emits (linear, FM, FM with the input, "
                              "attention); a layer outputs 4x this.")
    dlf_rank: StrictInt = Field(24, ge=1, description="dlf: rank of the factorization blocks.")
    dlf_hidden: StrictInt = Field(
        512, ge=1, description="dlf: hidden width of every MLP in the DLF layers and of its head.")
    dlf_heads: StrictInt = Field(
        2, ge=1, description="dlf: heads of the attention fusion; must divide embedding_dim.")

    @model_validator(mode="after")
    def _heads_divide_embedding(self) -> ModelConfig:
        if self.embedding_dim % self.num_heads:
            raise _Invalid("num_heads", f"({self.num_heads}) must divide model.embedding_dim "
                                        f"({self.embedding_dim}): QNN-alpha slices every field embedding "
                                        f"into heads")
        if self.name is ModelName.dlf and self.embedding_dim % self.dlf_heads:
            raise _Invalid("dlf_heads", f"({self.dlf_heads}) must divide model.embedding_dim "
                                        f"({self.embedding_dim}): DLF's attention splits every token into "
                                        f"heads")
        return self


class TrainConfig(_Section):
    """Optimisation and the FuxiCTR-style loop (docs/model.md section 5)."""

    learning_rate: Real = Field(2e-3, gt=0, description="Adam's learning rate (torch defaults otherwise).")
    batch_size: StrictInt = Field(
        8192, ge=1, description="Rows per training step; the last, smaller batch of an epoch is kept.")
    embedding_regularizer: Real = Field(
        2e-4, ge=0, description="lambda: adds lambda/2 * ||W||^2 of every embedding table and W_mm.")
    regularization: Regularization = Field(
        Regularization.full,
        description="full = the reference: the embedding L2 term over the whole tables every step | batch = "
                    "only the rows used in the batch (plus W_mm): cheaper, different math.")
    net_regularizer: Real = Field(0.0, ge=0, description="lambda/2 * ||W||^2 over the non-embedding weights.")
    epochs: StrictInt = Field(
        100, ge=1, description="Upper bound; early stopping usually ends the run sooner.")
    patience: StrictInt = Field(8, ge=1, description="Consecutive non-improving evaluations before stopping.")
    lr_decay_factor: Real = Field(
        0.5, gt=0, le=1, description="The learning rate is multiplied by this after each non-improving "
                                     "evaluation.")
    min_lr: Real = Field(1e-6, ge=0, description="Learning-rate floor; must not exceed learning_rate.")
    min_delta: Real = Field(1e-6, ge=0, description="An evaluation improves when AUC >= best + min_delta.")
    max_grad_norm: Real = Field(10.0, ge=0, description="Gradient-norm clipping.")
    warmup_steps: StrictInt = Field(
        0, ge=0, description="Linear learning-rate ramp over the first N optimizer steps (0 = none, the "
                             "reference).")
    eval_steps: StrictInt | None = Field(
        None, ge=1, description="Evaluate every N steps; null = once per epoch.")
    eval_batch_size: StrictInt = Field(
        8192, ge=1, description="Rows per forward pass when scoring. ASTA gathers (B, L, A) keys and values: "
                                "65536 rows would need ~26 GB on CPU.")
    # torch.manual_seed takes a 64-bit integer.
    seed: StrictInt = Field(20242025, ge=-(2**63), le=2**63 - 1, description="Random seed (the reference's).")
    device: DeviceChoice = Field(
        DeviceChoice.auto, description="auto = CUDA when present, else CPU | cpu | cuda.")
    bf16: StrictBool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    cpu_bf16: StrictBool = Field(
        False, description="bf16 autocast on CPU too, training and scoring; about 1.6x faster steps on CPUs "
                           "with native bf16 (AVX512-BF16 or AMX), slower elsewhere; bf16-tolerance logits.")
    compile: StrictBool = Field(False, description="torch.compile the model (CUDA only).")
    threads: StrictInt | None = Field(None, ge=1, description="Torch CPU threads; null = torch's default.")
    max_steps: StrictInt | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (benchmarks, smoke runs); null = none.")
    max_loss: Real | None = Field(
        1000.0, gt=0,
        description="A step loss above this means the run diverged: stop with an error rather than train "
                    "on garbage. BCE at chance is 0.69 and the reference's clamped BCE costs at most 100 per "
                    "row (QNN-alpha's self-ensemble sums three such terms); null = no limit (NaN and inf "
                    "always stop a run).")
    run_root: StrictStr = Field("runs", description="Runs go to <run_root>/<run name>/.")
    tensorboard: StrictBool = Field(
        False, description="Also write every evaluation to <run>/tensorboard/ for TensorBoard (needs the "
                           "tensorboard package); metrics.jsonl stays the record qin reads.")

    @model_validator(mode="after")
    def _min_lr_within_learning_rate(self) -> TrainConfig:
        if self.min_lr > self.learning_rate:
            raise _Invalid("min_lr", f"({self.min_lr:g}) must not exceed train.learning_rate "
                                     f"({self.learning_rate:g}): the plateau decay would raise the learning "
                                     f"rate")
        return self


class Config(BaseModel):
    """A qin config: its three sections."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="qin config")

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, raw: Any) -> Any:
        """`train:` with nothing under it is YAML's null: the section's defaults, like leaving it out."""
        if isinstance(raw, dict):
            return {name: {} if values is None else values for name, values in raw.items()}
        return raw

    @staticmethod
    def from_yaml(path: str | Path | Sequence[str | Path], overrides: list[str] | None = None) -> Config:
        """Load one YAML file or several layered ones, apply `section.key=value` overrides, validate.

        The first file is read with its `base:` chain; each later file then sets only the keys written
        in it (its own `base:` is not followed), so `-c configs/din.yaml -c configs/budget.yaml` is DIN
        with the budget's sizes, not the budget's base undoing DIN's settings.
        """
        paths = [Path(path)] if isinstance(path, str | Path) else [Path(item) for item in path]
        if not paths:
            raise QinError("no config file given")
        raw = _read_yaml_with_base(paths[0], seen=())
        for layer in paths[1:]:
            own = _read_yaml_with_base(layer, seen=(), follow_base=False)
            for section, values in own.items():
                if isinstance(values, dict) and isinstance(raw.get(section), dict):
                    raw[section] = {**raw[section], **values}
                else:
                    raw[section] = values
        overridden = {_apply_override(raw, item, source=" + ".join(str(item) for item in paths))
                      for item in overrides or []}
        source = " + ".join(str(item) for item in paths)
        return Config.from_dict(raw, source=source, overridden=frozenset(overridden))

    @staticmethod
    def from_dict(raw: dict[str, Any], source: str = "<dict>",
                  overridden: frozenset[str] = frozenset()) -> Config:
        """Build and validate. An error about a key in `overridden` (e.g. "train.epochs") names --set,
        not `source`, as where the bad value came from."""
        if not isinstance(raw, dict):
            raise QinError(f"{source}: top level must be a mapping of sections")
        try:
            return Config.model_validate(raw)
        except ValidationError as error:
            raise _one_line(error, source, overridden) from error

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe dict (enums as their values), in field order; `from_dict` inverts it."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_absolute_paths(self) -> Config:
        """A copy whose folder and file paths are absolute (resolved against the current folder)."""
        data = self.data.model_copy(update={
            "raw_dir": _absolute(self.data.raw_dir), "features_root": _absolute(self.data.features_root),
            "item_info": _absolute(self.data.item_info) if self.data.item_info is not None else None})
        train = self.train.model_copy(update={"run_root": _absolute(self.train.run_root)})
        return self.model_copy(update={"data": data, "train": train})

    def replace(self, section: str, **changes: Any) -> Config:
        """A copy with some fields of one section changed, converted and validated like YAML values."""
        raw = self.to_dict()
        raw[section] = {**raw[section], **changes}
        return Config.from_dict(raw, source="Config.replace")

    @staticmethod
    def json_schema() -> dict[str, Any]:
        """The JSON schema of a config file: docs/qin.schema.json (`python -m qin.config` prints it)."""
        schema = Config.model_json_schema()
        # `base:` is read (and removed) before validation, so the models have no such field; a file may.
        properties = {"base": {"type": "string", "title": "Base", "description": _BASE_HELP},
                      **schema.pop("properties")}
        rest = {key: value for key, value in schema.items() if key not in ("title", "description")}
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": schema["title"],
                "description": _SCHEMA_HELP, "properties": properties, **rest}


_BASE_HELP = ("Another config file, relative to this one, whose values this file overrides section by "
              "section (configs/*.yaml use `base: ../qin.yaml`).")
_SCHEMA_HELP = (
    "A qin config file: qin.yaml or a variant in configs/. Generated from qin/config.py by "
    "`python -m qin.config > docs/qin.schema.json`; do not edit it by hand. To have an editor check a config "
    "while you type (VS Code with the YAML extension, or any editor that runs yaml-language-server), make "
    "this the file's first line, with the path relative to the YAML file: "
    "`# yaml-language-server: $schema=docs/qin.schema.json` in qin.yaml, "
    "`# yaml-language-server: $schema=../docs/qin.schema.json` in configs/*.yaml.")

_SECTIONS: dict[str, type[_Section]] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


PATH_KEYS = (("data", "raw_dir"), ("data", "features_root"), ("data", "item_info"), ("train", "run_root"))


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """`Config.to_dict()` output with its paths absolute, so configs written from different folders
    or before paths were stored absolute compare by what they point at."""
    result = {section: dict(values) for section, values in config.items()}
    for section, key in PATH_KEYS:
        value = result.get(section, {}).get(key)
        if isinstance(value, str):
            result[section][key] = _absolute(value)
    return result


def _read_yaml_with_base(path: Path, seen: tuple[Path, ...], follow_base: bool = True) -> dict[str, Any]:
    if path.exists() and not path.is_file():
        raise QinError(f"{path}: is a folder or a device, not a YAML config file")
    if not path.is_file():
        raise QinError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise QinError(f"{path}: 'base:' chain loops back to itself")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise QinError(f"{path}: not valid YAML{_yaml_where(error)}") from error
    except UnicodeDecodeError as error:
        raise QinError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from error
    if not isinstance(raw, dict):
        raise QinError(f"{path}: top level must be a mapping of sections")
    base_name = raw.pop("base", None)
    if base_name is None or not follow_base:
        return raw
    if not isinstance(base_name, str) or not base_name.strip():
        raise QinError(f"{path}: base: must name one YAML file (relative to this one), got {base_name!r}")
    base = _read_yaml_with_base((path.parent / str(base_name)), seen + (path.resolve(),))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    return base


def _yaml_where(error: yaml.YAMLError) -> str:
    """' at line L, column C: problem' in one line (PyYAML's own text spans several, with a caret)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one
    silently, so a stray second `learning_rate:` would win unnoticed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given a second time in the same mapping", key_node.start_mark)
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


def _apply_override(raw: dict[str, Any], item: str, source: str = "the config") -> str:
    """Apply one `section.key=value` to the raw tree (read from `source`); returns "section.key"."""
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise QinError(f"override '{item}' must look like section.key=value (e.g. train.learning_rate=1e-3)")
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}  # `train:` with nothing under it: the defaults
    if not isinstance(raw[section], dict):
        raise QinError(f"{source}: section '{section}' must be a mapping of keys, got {raw[section]!r} "
                       f"(so --set {key.strip()} has nowhere to go)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise QinError(f"override '{item}': the value is not valid YAML ({error})") from error
    # A path such as data.raw_dir=2024 is text even when YAML reads it as a number.
    if _is_text_field(section, name) and value is not None and not isinstance(value, list | dict):
        value = text.strip()
    raw[section][name] = value
    return f"{section}.{name}"


class _Invalid(ValueError):
    """A rule over several fields broken, blamed on `key` (a field of the section being checked), so the
    error names one key like every other config error."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key, self.problem = key, problem


def _as_float(value: Any) -> Any:
    """`value` as a float where it spells one; anything else (a bool, 'abc') is left for pydantic."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return value
    try:
        return float(value)
    except ValueError:
        return value
    except OverflowError:  # an int beyond a float's range: refused as not finite
        return math.inf


def _types_in(hint: Any) -> set[Any]:
    """The plain types an annotation allows: `Annotated[str, Strict()] | None` -> {str, NoneType}."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _types_in(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_types_in(option) for option in typing.get_args(hint)))
    return {hint}


def _is_text_field(section: str, name: str) -> bool:
    """Whether `section.name` is a str (or str | None) config field."""
    info = _SECTIONS[section].model_fields.get(name) if section in _SECTIONS else None
    return info is not None and str in _types_in(info.annotation)


# pydantic's error types -> qin's words. Only the kinds the fields above can raise are named; any other
# keeps pydantic's own message, still on one line after the key.
_TYPE_NAMES = {"int_type": "int", "bool_type": "bool", "float_type": "float", "string_type": "str"}
_BOUND_KINDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_BOUND_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_INT64 = {"ge": -(2**63), "le": 2**63 - 1}


def _one_line(error: ValidationError, source: str, overridden: frozenset[str]) -> QinError:
    """The first problem pydantic found, as `<source>: <section>.<key> <problem>`.

    Unknown sections, then unknown keys, are reported first and all together, naming `source`, since a
    typo is best fixed in one go. Any other problem names --set when its key was given there.
    """
    problems = error.errors(include_url=False)
    # "invalid_key": a key YAML read as something other than text (`1:`), so no field's name either.
    extra = [problem["loc"] for problem in problems if problem["type"] in ("extra_forbidden", "invalid_key")]
    sections = sorted(str(loc[0]) for loc in extra if len(loc) == 1)
    if sections:
        from_set = all(any(key.startswith(f"{section}.") for key in overridden) for section in sections)
        return QinError(f"{'--set' if from_set else source}: unknown config section(s) {sections}; "
                        f"expected {sorted(_SECTIONS)}")
    if extra:
        section = str(extra[0][0])  # a section's name: a key at the top level was reported just above
        keys = sorted(f"{section}.{loc[1]}" for loc in extra if loc[0] == section)
        # A typo given with --set is the command line's, not the file's.
        where = "--set" if keys and all(key in overridden for key in keys) else source
        return QinError(f"{where}: unknown config key(s) {', '.join(keys)}; valid keys of '{section}': "
                        f"{', '.join(sorted(_SECTIONS[section].model_fields))}")
    problem = problems[0]
    loc = problem["loc"]
    if len(loc) == 1 and problem["type"] in ("model_type", "dict_type"):
        got = type(problem["input"]).__name__
        return QinError(f"{source}: section '{loc[0]}' must be a mapping, got {got}")
    cause = problem.get("ctx", {}).get("error")
    if isinstance(cause, _Invalid):  # a rule over several fields: blame the key it names
        loc = (*loc, cause.key)
    where = "--set" if ".".join(str(part) for part in loc[:2]) in overridden else source
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return QinError(f"{where}: {key} {_problem(problem, loc)}")


def _problem(problem: Any, loc: tuple[Any, ...]) -> str:
    """What is wrong with the value at `loc`, in the words qin's messages have always used."""
    kind, value = problem["type"], problem.get("input")
    section = _SECTIONS.get(loc[0])
    info = section.model_fields.get(loc[1]) if section is not None and len(loc) > 1 else None
    if kind in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[kind]}, got {value!r} ({type(value).__name__})"
    if kind == "list_type":
        return f"must be a list, got {value!r}"
    if kind == "enum" and info is not None:
        (choices,) = [hint for hint in _types_in(info.annotation)
                      if isinstance(hint, type) and issubclass(hint, enum.Enum)]
        return f"must be one of {', '.join(member.value for member in choices)}; got {value!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r}"
    if kind in _BOUND_KINDS:
        if info is not None and len(loc) == 2:  # the field's whole range, not just the bound it broke
            bounds = {name: getattr(item, name) for item in info.metadata for name in _BOUND_SIGNS
                      if getattr(item, name, None) is not None}
            nullable = type(None) in _types_in(info.annotation)
        else:  # an item of a list
            bounds, nullable = problem["ctx"], False
        return f"must {_range(bounds)}{' or null' if nullable else ''}, got {value!r}"
    if kind == "too_short":  # the only lists are MLP layer widths (`Widths`)
        return f"needs at least one width, got {value!r}"
    if isinstance(problem.get("ctx", {}).get("error"), _Invalid):
        return problem["ctx"]["error"].problem
    return f"is invalid: {problem['msg']}"


def _range(bounds: dict[str, Any]) -> str:
    """{"ge": 0, "lt": 1} -> "be in [0, 1)"; {"gt": 0} -> "be > 0"."""
    if bounds == _INT64:
        return "fit in 64 bits"
    lower = {name: value for name, value in bounds.items() if name in ("ge", "gt")}
    upper = {name: value for name, value in bounds.items() if name in ("le", "lt")}
    if lower and upper:
        ((low_name, low),), ((high_name, high),) = lower.items(), upper.items()
        return f"be in {'[' if low_name == 'ge' else '('}{low:g}, {high:g}{']' if high_name == 'le' else ')'}"
    return "be " + " and ".join(f"{_BOUND_SIGNS[name]} {value:g}" for name, value in bounds.items())


def schema_json() -> str:
    """docs/qin.schema.json's text."""
    return json.dumps(Config.json_schema(), indent=2) + "\n"


if __name__ == "__main__":  # python -m qin.config > docs/qin.schema.json
    print(schema_json(), end="")
