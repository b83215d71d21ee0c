"""Config: YAML round trip, base inheritance, overrides, errors that name the key, and the JSON schema."""

import json
import re
from pathlib import Path

import pytest
import yaml

from qin.config import Config, ModelName, Regularization, TrainConfig, _read_yaml_with_base, schema_json
from qin.errors import QinError

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "docs" / "qin.schema.json"
SHIPPED = [ROOT / "qin.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reference_yaml_is_the_default_config():
    assert Config.from_yaml(ROOT / "qin.yaml") == Config()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Each variant loads and differs from the reference in exactly the keys its own file (and its base
    files below qin.yaml) write: a key that silently failed to apply would leave the reference value."""
    cfg = Config.from_yaml(path)
    written: dict[str, dict] = {}
    current = path
    while current.name != "qin.yaml":
        raw = yaml.safe_load(current.read_text()) or {}
        for section, values in raw.items():
            if section != "base":
                written.setdefault(section, {}).update({k: v for k, v in values.items()
                                                        if k not in written.get(section, {})})
        current = (current.parent / raw["base"]).resolve()
    plain, reference = cfg.to_dict(), Config().to_dict()
    for section, values in written.items():
        for key, value in values.items():
            expected = float(value) if isinstance(reference[section][key], float) else value
            assert plain[section][key] == expected, f"{path.name}: {section}.{key}"
    changed = {(s, k) for s in plain for k in plain[s] if plain[s][k] != reference[s][k]}
    assert changed <= {(s, k) for s, values in written.items() for k in values}, path.name


def test_round_trip_through_yaml(tmp_path):
    cfg = Config.from_yaml(ROOT / "configs" / "din.yaml")
    again = Config.from_yaml(write(tmp_path / "c.yaml", cfg.to_yaml()))
    assert again == cfg
    assert again.model.name is ModelName.din


def test_base_is_overridden_section_by_section(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  num_row: 3\n  embedding_dim: 16\ntrain:\n  seed: 1\n")
    cfg = Config.from_yaml(write(tmp_path / "child.yaml", "base: base.yaml\nmodel:\n  num_row: 2\n"))
    assert (cfg.model.num_row, cfg.model.embedding_dim, cfg.train.seed) == (2, 16, 1)


def test_overrides_are_typed():
    cfg = Config.from_yaml(ROOT / "qin.yaml", ["train.learning_rate=1e-3", "model.name=qin_mlp",
                                                "train.regularization=batch", "train.eval_steps=5"])
    assert cfg.train.learning_rate == 1e-3 and cfg.model.name is ModelName.qin_mlp
    assert cfg.train.regularization is Regularization.batch and cfg.train.eval_steps == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  learnig_rate: 0.1\n", "train.learnig_rate"),
        ("modle:\n  num_row: 3\n", "modle"),
        ("model:\n  num_row: three\n", "model.num_row must be int"),
        ("model:\n  num_row: 2.5\n", "model.num_row must be int"),
        ("model:\n  batch_norm: 1\n", "model.batch_norm must be bool"),
        ("model:\n  name: qinn\n", "model.name must be one of"),
        ("train:\n  batch_size: 0\n", "train.batch_size must be >= 1"),
        ("model:\n  net_dropout: 1.5\n", "model.net_dropout"),
        ("model:\n  mlp_hidden: 5\n", "model.mlp_hidden must be a list"),
        ("data:\n  max_len: 0\n", "data.max_len"),
        ("train: [1, 2]\n", "section 'train' must be a mapping"),
        ("model: {num_heads: 3}\n", "model.num_heads"),
        ("model:\n  num_row: true\n", "model.num_row must be int"),
        ("model:\n  mlp_hidden: [16, 0]\n", "model.mlp_hidden[1] must be >= 1"),
        ("model:\n  din_attention_hidden: []\n", "model.din_attention_hidden needs at least one width"),
        ("train:\n  learning_rate: true\n", "train.learning_rate must be float"),
        ("train:\n  learning_rate: .nan\n", "train.learning_rate must be a finite number"),
        ("train:\n  max_loss: .inf\n", "train.max_loss must be a finite number"),
        ("train:\n  lr_decay_factor: 1.5\n", "train.lr_decay_factor must be in (0, 1]"),
        ("train:\n  seed: -9223372036854775809\n", "train.seed must fit in 64 bits"),
        ("train:\n  min_lr: 0.1\n", "train.min_lr (0.1) must not exceed train.learning_rate"),
        ("data:\n  raw_dir: 2024\n", "data.raw_dir must be str"),
        ("train:\n  device: gpu\n", "train.device must be one of auto, cpu, cuda"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(QinError, match=re.escape(message)) as error:
        Config.from_yaml(write(tmp_path / "bad.yaml", text))
    assert "\n" not in str(error.value) and str(error.value).startswith(str(tmp_path / "bad.yaml"))


def test_numbers_are_read_the_way_yaml_writes_them(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as text; an int is a float's value, but never an int's 2.0 or a bool.
    cfg = Config.from_yaml(write(tmp_path / "c.yaml", "train:\n  learning_rate: 1e-3\n  max_grad_norm: 5\n"))
    assert cfg.train.learning_rate == 1e-3 and cfg.train.max_grad_norm == 5.0
    assert type(cfg.train.max_grad_norm) is float
    with pytest.raises(QinError, match="model.num_row must be int, got 2.0"):
        Config.from_dict({"model": {"num_row": 2.0}})
    assert Config.from_dict({"train": None}) == Config()  # `train:` with nothing under it


def test_an_overridden_key_names_set_as_the_source(tmp_path):
    with pytest.raises(QinError, match=r"^--set: train\.min_lr \(0\.5\) must not exceed"):
        Config.from_yaml(ROOT / "qin.yaml", ["train.min_lr=0.5"])
    with pytest.raises(QinError, match=r"^--set: model\.num_heads \(3\) must divide"):
        Config.from_yaml(ROOT / "qin.yaml", ["model.num_heads=3"])
    with pytest.raises(QinError, match=r"c\.yaml: model\.num_heads \(3\) must divide"):  # from the file
        Config.from_yaml(write(tmp_path / "c.yaml", "model:\n  num_heads: 3\n"), ["model.num_row=2"])


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(QinError, match="config file not found"):
        Config.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(QinError, match="section.key=value"):
        Config.from_yaml(ROOT / "qin.yaml", ["learning_rate=1"])
    with pytest.raises(QinError, match="train.nope"):
        Config.from_yaml(ROOT / "qin.yaml", ["train.nope=1"])


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(QinError, match="loops"):
        Config.from_yaml(tmp_path / "a.yaml")


# --------------------------------------------------------------------------------------------------
# What checkpoints store and compare


FIELD_ORDER = {
    "data": "raw_dir item_info features_root max_len mm_normalize",
    "model": "name embedding_dim num_layers num_row num_heads net_dropout batch_norm attention_dim "
             "mlp_hidden din_attention_hidden din_attention_dropout unique_items bce level_zero "
             "qnn_alpha_bounded cross_layers cross_rank transformer_mask dlf_layers dlf_tokens dlf_rank "
             "dlf_hidden dlf_heads",
    "train": "learning_rate batch_size embedding_regularizer regularization net_regularizer epochs "
             "patience lr_decay_factor min_lr min_delta max_grad_norm warmup_steps eval_steps "
             "eval_batch_size seed device bf16 cpu_bf16 compile threads max_steps max_loss run_root "
             "tensorboard",
}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_to_dict_is_plain_and_in_field_order(path):
    """Checkpoints store `to_dict()` and a resume compares it, key order included: it must not change."""
    cfg = Config.from_yaml(path)
    plain = cfg.to_dict()
    assert {section: " ".join(values) for section, values in plain.items()} == FIELD_ORDER
    assert json.loads(json.dumps(plain)) == plain and plain["model"]["name"] == cfg.model.name.value
    assert Config.from_dict(plain) == cfg and Config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_configs_are_frozen_values():
    cfg = Config()
    with pytest.raises(ValueError, match="frozen"):
        cfg.train.epochs = 5  # type: ignore[misc]
    assert hash(TrainConfig()) == hash(TrainConfig(learning_rate=2e-3)) and TrainConfig() == TrainConfig()
    changed = cfg.replace("train", epochs=5, device="cpu")
    assert (changed.train.epochs, cfg.train.epochs, changed.model) == (5, 100, cfg.model)
    with pytest.raises(QinError, match="Config.replace: train.epochs must be >= 1"):
        cfg.replace("train", epochs=0)
    absolute = Config.from_yaml(ROOT / "qin.yaml").with_absolute_paths()
    assert Path(absolute.data.raw_dir).is_absolute() and Path(absolute.train.run_root).is_absolute()
    assert absolute.model == cfg.model


# --------------------------------------------------------------------------------------------------
# The JSON schema editors validate qin.yaml with


def test_the_schema_file_is_the_configs_own_schema():
    assert SCHEMA.read_text(encoding="utf-8") == schema_json(), (
        "docs/qin.schema.json is out of date: python -m qin.config > docs/qin.schema.json")
    assert json.loads(SCHEMA.read_text(encoding="utf-8")) == Config.json_schema()
    assert "yaml-language-server: $schema=" in Config.json_schema()["description"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_satisfy_the_schema(path):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(Config.json_schema())
    validator.check_schema(Config.json_schema())
    validator.validate(yaml.safe_load(path.read_text(encoding="utf-8")))  # as an editor sees it
    validator.validate(_read_yaml_with_base(path, seen=()))  # through its base chain
    validator.validate(Config.from_yaml(path).to_dict())


@pytest.mark.parametrize("raw", [
    {"train": {"learnig_rate": 0.1}}, {"modle": {}}, {"model": {"num_row": 2.5}},
    {"model": {"batch_norm": 1}}, {"model": {"name": "qinn"}}, {"train": {"batch_size": 0}},
    {"model": {"net_dropout": 1.0}},
    {"model": {"mlp_hidden": []}}, {"model": {"mlp_hidden": [0]}}, {"train": {"threads": 0}},
    {"train": {"max_loss": 0}}, {"train": {"seed": 2**63}}, {"data": {"raw_dir": 2024}}, {"base": 3},
], ids=str)
def test_the_schema_refuses_what_the_config_refuses(raw):
    jsonschema = pytest.importorskip("jsonschema")
    assert not jsonschema.Draft202012Validator(Config.json_schema()).is_valid(raw)
    if "base" not in raw:
        with pytest.raises(QinError):
            Config.from_dict(raw)
