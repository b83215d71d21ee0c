"""One typed, frozen config tree: YAML -> `Config` -> (DataConfig, ModelConfig, TrainConfig).

A YAML file has up to three sections (`data`, `model`, `train`) and an optional `base:` key naming
another YAML file (relative to this one) whose values it overrides, so variants in `configs/` are
small diffs over `qin.yaml`. Unknown keys and wrongly typed values are errors that name the key
(`train.learnig_rate`), never silently ignored: FuxiCTR's flat `**kwargs` dict swallowed typos.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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


class DeviceChoice(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    auto = "auto"  # CUDA when present, else CPU
    cpu = "cpu"
    cuda = "cuda"


@dataclass(frozen=True)
class DataConfig:
    """Where the raw challenge files are and how features are cut."""

    raw_dir: str = "data/MicroLens_1M_x1"  # train/valid/test/item_info parquet files
    item_info: str | None = None  # alternative item table (same schema) in place of raw_dir/item_info.parquet
    features_root: str = "features"  # `qin preprocess` writes <features_root>/<name>/
    max_len: int = 64  # most recent history items kept per row
    # Scaling of item_emb_d128 at load time (the feature folder keeps the raw values). Quadratic towers
    # multiply their inputs, so an input scale of several units slows their training badly; see README.
    mm_normalize: MMNormalize = MMNormalize.none

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise QinError(f"data.max_len must be >= 1, got {self.max_len}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. The defaults are QIN_variety_v9 as published (model.md section 4)."""

    name: ModelName = ModelName.qin
    embedding_dim: int = 128  # every field's embedding width (item vector = 3x this)
    num_layers: int = 4  # quadratic (or MLP) tower depth
    num_row: int = 4  # R: rows of the Khatri-Rao product per layer
    num_heads: int = 1  # QNN-alpha heads (H); QIN's own tower has none
    net_dropout: float = 0.1
    batch_norm: bool = True
    attention_dim: int | None = None  # ASTA width; None = 2 x item vector width (768 in the reference)
    mlp_hidden: list[int] = field(default_factory=lambda: [1024, 512, 256])  # DIN DNN and the MLP ablation
    din_attention_hidden: list[int] = field(default_factory=lambda: [512, 256])
    din_attention_dropout: float = 0.1
    # Runtime, not math: compute item vectors / key-value projections once per unique item in the
    # batch (fast) or once per history slot (the reference's way). Both give the same logits.
    unique_items: bool = True
    bce: BCEForm = BCEForm.probabilities  # the reference's loss form; `logits` is the stable one
    level_zero: LevelZero = LevelZero.padding  # the reference maps raw level 0 to the untrained zero row
    # QNN-alpha only, not the published math: per-field LayerNorm (GroupNorm) on the tower input and
    # BatchNorm after each Khatri-Rao product (QIN's place), so the degree-2^L tower stays bounded
    # when ASTA's unnormalised output p is large. False = the published tower.
    qnn_alpha_bounded: bool = False

    def __post_init__(self) -> None:
        positive = {"embedding_dim": self.embedding_dim, "num_layers": self.num_layers,
                    "num_row": self.num_row, "num_heads": self.num_heads}
        for key, value in positive.items():
            if value < 1:
                raise QinError(f"model.{key} must be >= 1, got {value}")
        for key, value in {"net_dropout": self.net_dropout,
                           "din_attention_dropout": self.din_attention_dropout}.items():
            if not 0.0 <= value < 1.0:
                raise QinError(f"model.{key} must be in [0, 1), got {value}")
        if self.attention_dim is not None and self.attention_dim < 1:
            raise QinError(f"model.attention_dim must be >= 1 or null, got {self.attention_dim}")
        if not self.mlp_hidden or not self.din_attention_hidden:
            raise QinError("model.mlp_hidden and model.din_attention_hidden need at least one width")
        if any(width < 1 for width in self.mlp_hidden + self.din_attention_hidden):
            raise QinError("model.mlp_hidden and model.din_attention_hidden need positive widths")
        if self.embedding_dim % self.num_heads:
            raise QinError(f"model.num_heads ({self.num_heads}) must divide model.embedding_dim "
                           f"({self.embedding_dim}): QNN-alpha slices every field embedding into heads")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the FuxiCTR-style loop (model.md section 5)."""

    learning_rate: float = 2e-3
    batch_size: int = 8192
    embedding_regularizer: float = 2e-4  # lambda: adds lambda/2 * ||W||^2 for the embedding module
    regularization: Regularization = Regularization.full
    net_regularizer: float = 0.0  # lambda/2 * ||W||^2 over the non-embedding weights
    epochs: int = 100  # upper bound; early stopping usually ends sooner
    patience: int = 8  # consecutive non-improving evaluations before stopping
    lr_decay_factor: float = 0.5  # LR multiplied by this on a non-improving evaluation
    min_lr: float = 1e-6
    min_delta: float = 1e-6  # an evaluation improves when AUC >= best + min_delta
    max_grad_norm: float = 10.0
    warmup_steps: int = 0  # linear LR ramp over the first N optimizer steps (0 = none, the reference)
    eval_steps: int | None = None  # evaluate every N steps; None = once per epoch
    eval_batch_size: int = 8192  # ASTA gathers (B, L, A) keys and values: 65536 rows would need ~26 GB on CPU
    seed: int = 20242025
    device: DeviceChoice = DeviceChoice.auto
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the model (CUDA only)
    threads: int | None = None  # torch CPU threads; None = torch's default
    max_steps: int | None = None  # stop after this many optimizer steps (benchmarks, smoke runs)
    # A step loss above this means the run diverged: stop with an error rather than train on garbage.
    # BCE at chance is 0.69 and the reference's clamped BCE costs at most 100 per row (QNN-alpha's
    # self-ensemble sums three such terms); null = no limit (NaN and inf always stop a run).
    max_loss: float | None = 1000.0
    run_root: str = "runs"  # runs go to <run_root>/<run name>/

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise QinError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if self.min_lr > self.learning_rate:
            raise QinError(f"train.min_lr ({self.min_lr:g}) must not exceed train.learning_rate "
                           f"({self.learning_rate:g}): the plateau decay would raise the learning rate")
        if not -(2**63) <= self.seed < 2**63:
            raise QinError(f"train.seed must fit in 64 bits, got {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise QinError(f"train.threads must be >= 1 or null (torch's default), got {self.threads}")
        if self.max_loss is not None and self.max_loss <= 0:
            raise QinError(f"train.max_loss must be > 0 or null, got {self.max_loss}")
        for key in ("batch_size", "epochs", "patience", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise QinError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.lr_decay_factor <= 1.0:
            raise QinError(f"train.lr_decay_factor must be in (0, 1], got {self.lr_decay_factor}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise QinError(f"train.eval_steps must be >= 1 or null, got {self.eval_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise QinError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        for key in ("embedding_regularizer", "net_regularizer", "min_lr", "max_grad_norm", "warmup_steps",
                    "min_delta"):
            if getattr(self, key) < 0:
                raise QinError(f"train.{key} must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

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
        overridden = {_apply_override(raw, item) for item in overrides or []}
        source = " + ".join(str(item) for item in paths)
        return Config.from_dict(raw, source=source, overridden=frozenset(overridden))

    @staticmethod
    def from_dict(raw: dict[str, Any], source: str = "<dict>",
                  overridden: frozenset[str] = frozenset()) -> Config:
        """Build and validate. An error about a key in `overridden` (e.g. "train.epochs") names --set,
        not `source`, as where the bad value came from."""
        sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
        unknown = set(raw) - set(sections)
        if unknown:
            raise QinError(f"{source}: unknown config section(s) {sorted(unknown)}; "
                           f"expected {sorted(sections)}")
        built = {}
        for name, cls in sections.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise QinError(f"{source}: section '{name}' must be a mapping, got {type(values).__name__}")
            built[name] = _build_section(cls, values, prefix=name, source=source, overridden=overridden)
        return Config(**built)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe dict (enums as their values); `from_dict` inverts it."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in ("data", "model", "train")}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_absolute_paths(self) -> Config:
        """A copy whose folder and file paths are absolute (resolved against the current folder)."""
        data = dataclasses.replace(
            self.data, raw_dir=_absolute(self.data.raw_dir), features_root=_absolute(self.data.features_root),
            item_info=_absolute(self.data.item_info) if self.data.item_info is not None else None)
        train = dataclasses.replace(self.train, run_root=_absolute(self.train.run_root))
        return dataclasses.replace(self, data=data, train=train)

    def replace(self, section: str, **changes: Any) -> Config:
        """A copy with some fields of one section changed, converted and validated like YAML values."""
        raw = self.to_dict()
        raw[section] = {**raw[section], **_plain(changes)}
        return Config.from_dict(raw, source="Config.replace")


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


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _read_yaml_with_base(path: Path, seen: tuple[Path, ...], follow_base: bool = True) -> dict[str, Any]:
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


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Apply one `section.key=value` to the raw tree; returns "section.key"."""
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise QinError(f"override '{item}' must look like section.key=value (e.g. train.learning_rate=1e-3)")
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise QinError(f"override '{item}': section '{section}' is not a mapping")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise QinError(f"override '{item}': the value is not valid YAML ({error})") from error
    # A path such as data.raw_dir=2024 is text even when YAML reads it as a number.
    if _is_text_field(section, name) and value is not None and not isinstance(value, list | dict):
        value = text.strip()
    raw[section][name] = value
    return f"{section}.{name}"


def _is_text_field(section: str, name: str) -> bool:
    """Whether `section.name` is a str (or str | None) config field."""
    cls = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}.get(section)
    if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
        return False
    hint = typing.get_type_hints(cls)[name]
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and str in typing.get_args(hint))


def _build_section(cls: type, values: dict[str, Any], prefix: str, source: str,
                   overridden: frozenset[str] = frozenset()) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise QinError(f"{source}: unknown config key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
                       f"valid keys of '{prefix}': {', '.join(sorted(names))}")
    converted = {key: _convert(value, hints[key], f"{prefix}.{key}",
                               "--set" if f"{prefix}.{key}" in overridden else source)
                 for key, value in values.items()}
    return cls(**converted)


def _convert(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation; ints are accepted for floats, '1e-3' strings too."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _convert(value, inner, key, source)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise QinError(f"{source}: {key} must be a list, got {value!r}")
        return [_convert(item, inner, key, source) for item in value]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(member.value for member in hint)
            raise QinError(f"{source}: {key} must be one of {choices}; got {value!r}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # NaN would slip past every `< 0` check below
                raise QinError(f"{source}: {key} must be a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key} has unsupported annotation {hint!r}")
    raise QinError(f"{source}: {key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
