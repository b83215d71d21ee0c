"""Config: YAML round trip, base inheritance, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from qin.config import Config, ModelName, Regularization
from qin.errors import QinError

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reference_yaml_is_the_default_config():
    assert Config.from_yaml(ROOT / "qin.yaml") == Config()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = Config.from_yaml(path)
    assert cfg.model.name in ModelName


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
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(QinError, match=message.replace(".", r"\.")):
        Config.from_yaml(write(tmp_path / "bad.yaml", text))


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
