"""`qin embed --tune histories`: label-free, cold items from content, deterministic, item_info's schema."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from qin.cli import app
from qin.embed.tune import HistoryPairs, TuneSettings, read_histories, tune_on_histories, tune_table
from qin.errors import QinError

FAST = TuneSettings(dim=8, steps=60, batch_size=64, hidden=16, window=2, content_share=0.5)


def planted(n_items: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Content vectors that are pure noise and histories drawn within 4 hidden groups of 10 items (ids 1..40):
    co-occurrence is the only signal. Items 37..40 never occur in a history (cold)."""
    rng = np.random.default_rng(seed)
    content = rng.standard_normal((n_items + 1, 6)).astype(np.float32)
    content[0] = 0
    histories = np.zeros((300, 6), dtype=np.int64)
    for row in range(300):
        group = row % 4
        members = [i for i in range(1 + 10 * group, 11 + 10 * group) if i <= 36]
        length = rng.integers(2, 7)
        histories[row, 6 - length:] = rng.choice(members, size=length)
    return content, histories


def test_pairs_are_real_items_within_the_window() -> None:
    histories = np.array([[0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 0, 5], [7, 8, 0, 0, 0, 0]])
    pairs = HistoryPairs(histories, window=1)
    assert len(pairs) == 2  # the one-item history has no pair
    anchors, partners = pairs.draw(500, torch.Generator().manual_seed(0))
    allowed = {(1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3), (7, 8), (8, 7)}
    assert set(zip(anchors.tolist(), partners.tolist(), strict=True)) == allowed


def test_co_occurring_items_end_up_closer() -> None:
    content, histories = planted()
    # All of the vector learned (content_share 0): the content here is noise, the groups only co-occur.
    tuned = tune_table(content, histories, TuneSettings(dim=8, steps=300, batch_size=64, hidden=16,
                                                        content_share=0.0))
    vectors, seen = tuned.vectors, tuned.seen
    group = (np.arange(1, 41) - 1) // 10
    similarity = vectors @ vectors.T
    warm = seen.copy()
    same = (group[:, None] == group[None, :]) & warm[:, None] & warm[None, :] & ~np.eye(40, dtype=bool)
    other = (group[:, None] != group[None, :]) & warm[:, None] & warm[None, :]
    assert similarity[same].mean() > similarity[other].mean() + 0.3


def test_cold_items_get_their_content_only_vector() -> None:
    content, histories = planted()
    tuned = tune_table(content, histories, FAST)
    assert not tuned.seen[36:].any() and tuned.seen[:36].all()  # items 37..40 are cold
    np.testing.assert_array_equal(tuned.vectors[36:], tuned.content_only[36:])  # no residual at all
    assert not np.allclose(tuned.vectors[:36], tuned.content_only[:36])  # warm items moved off it
    # The same run with a cold item's content changed: of the learned parts (dims 4..7), only that item's
    # moves (the content part's principal directions are the whole table's, so they may all turn a little).
    changed = content.copy()
    changed[40] = changed[40] * 3 + 1
    again = tune_table(changed, histories, FAST)
    np.testing.assert_array_equal(again.vectors[:39, 4:], tuned.vectors[:39, 4:])
    assert not np.allclose(again.vectors[39], tuned.vectors[39])


def test_residual_dropout_pulls_the_content_only_vectors_onto_the_tuned_ones() -> None:
    """With residuals dropped for part of every batch, the head must place an item from its content alone
    where co-occurrence puts it, so a warm item's content-only vector (what a cold item gets) lies nearer its
    tuned vector than without dropout; cold items still get exactly their content-only vector."""
    content, histories = planted()
    group = (np.arange(1, 41) - 1) // 10
    content[1:, :4] += 0.7 * np.eye(4, dtype=np.float32)[group]  # content that hints at the group
    base = TuneSettings(dim=8, steps=300, batch_size=64, hidden=16)
    closeness = {}
    for dropout in (0.0, 0.5):
        tuned = tune_table(content, histories, TuneSettings(**{**base.__dict__, "residual_dropout": dropout}))
        np.testing.assert_array_equal(tuned.vectors[36:], tuned.content_only[36:])
        closeness[dropout] = float((tuned.vectors[:36] * tuned.content_only[:36]).sum(axis=1).mean())
    assert closeness[0.5] > closeness[0.0] + 0.1, closeness
    with pytest.raises(QinError, match="residual_dropout"):
        tune_table(content, histories, TuneSettings(**{**base.__dict__, "residual_dropout": 1.0}))


def test_the_content_part_is_the_contents_principal_components_whatever_the_histories() -> None:
    from sklearn.decomposition import PCA

    content, histories = planted()
    tuned = tune_table(content, histories, FAST)  # dim 8, content_share 0.5: 4 content dims
    expected = PCA(n_components=4, svd_solver="full").fit_transform(content[1:].astype(np.float64))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    part = tuned.vectors[:, :4] / np.sqrt(0.5)
    signs = np.sign((part * expected).sum(axis=0))  # a principal direction's sign is arbitrary
    np.testing.assert_allclose(part, expected * signs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(tuned.vectors, axis=1), 1.0, atol=1e-5)  # unit norm
    other = tune_table(content, histories[::-1].copy(), FAST)
    np.testing.assert_array_equal(other.vectors[:, :4], tuned.vectors[:, :4])
    with pytest.raises(QinError, match="content_share"):
        tune_table(content, histories, TuneSettings(dim=8, content_share=0.95))


def test_deterministic_per_seed() -> None:
    content, histories = planted()
    first = tune_table(content, histories, FAST).vectors
    second = tune_table(content, histories, FAST).vectors
    np.testing.assert_array_equal(first, second)
    other = tune_table(content, histories, TuneSettings(**{**FAST.__dict__, "seed": 1})).vectors
    assert not np.allclose(first, other)


def test_bad_settings_and_ids_are_refused() -> None:
    content, histories = planted()
    with pytest.raises(QinError, match="steps"):
        tune_table(content, histories, TuneSettings(steps=0))
    with pytest.raises(QinError, match="outside"):
        tune_table(content, histories + 100, FAST)
    with pytest.raises(QinError, match="two items"):
        tune_table(content, np.array([[0, 0, 3]]), FAST)


@pytest.fixture()
def tuned_inputs(tiny_data: Path, tmp_path: Path) -> Path:
    """A copy of the tiny data folder's MicroLens_1M_x1 (train.parquet, item_info.parquet)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "MicroLens_1M_x1", data / "MicroLens_1M_x1")
    return data


def test_never_reads_labels_or_targets(tuned_inputs: Path, tmp_path: Path) -> None:
    raw = tuned_inputs / "MicroLens_1M_x1"
    out_a = tmp_path / "a.parquet"
    tune_on_histories(raw / "item_info.parquet", raw / "train.parquet", out_a, FAST, progress=False)
    train = pl.read_parquet(raw / "train.parquet")
    rng = np.random.default_rng(0)
    shuffled = train.with_columns(pl.Series("label", rng.permutation(train["label"].to_numpy())),
                                  pl.Series("item_id", rng.permutation(train["item_id"].to_numpy())))
    shuffled.write_parquet(raw / "train.parquet")
    out_b = tmp_path / "b.parquet"
    tune_on_histories(raw / "item_info.parquet", raw / "train.parquet", out_b, FAST, progress=False)
    assert pl.read_parquet(out_a).equals(pl.read_parquet(out_b))


def test_schema_and_the_histories_read(tuned_inputs: Path, tmp_path: Path) -> None:
    raw = tuned_inputs / "MicroLens_1M_x1"
    out = tmp_path / "tuned.parquet"
    result = tune_on_histories(raw / "item_info.parquet", raw / "train.parquet", out, FAST, progress=False)
    info, tuned = pl.read_parquet(raw / "item_info.parquet"), pl.read_parquet(out)
    assert tuned.columns == info.columns and tuned.height == info.height
    assert tuned["item_id"].to_list() == sorted(info["item_id"].to_list())
    table = np.stack(tuned["item_emb_d128"].to_numpy())
    assert table.shape == (info.height, 8) and not table[0].any()
    np.testing.assert_allclose(np.linalg.norm(table[1:], axis=1), 1.0, rtol=1e-5)
    assert tuned["item_tags"].to_list() == info.sort("item_id")["item_tags"].to_list()
    histories = read_histories(raw / "train.parquet")
    sequences = pl.read_parquet(raw / "train.parquet")["item_seq"].unique()
    real_items = sequences.list.eval(pl.element() != 0).list.sum()
    assert histories.shape[0] == int((real_items >= 2).sum()) == result.histories
    assert 0 < result.warm_items <= result.items


def test_through_the_cli(tuned_inputs: Path) -> None:
    runner = CliRunner()
    args = ["embed", "--tune", "histories", "--data", str(tuned_inputs), "--dim", "8", "--tune-steps", "20"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tuned_inputs / "item_info_tuned.parquet").is_file() and "data.item_info=" in result.output
    again = runner.invoke(app, [*args, "--seed", "3"], catch_exceptions=False)  # our own table: replaced
    assert again.exit_code == 0, again.output
    half = runner.invoke(app, [*args, "--content-share", "0.5"], catch_exceptions=False)
    assert half.exit_code == 0, half.output
    dropout = runner.invoke(app, [*args, "--residual-dropout", "0.2"], catch_exceptions=False)
    assert dropout.exit_code == 0, dropout.output
    bad_dropout = runner.invoke(app, [*args, "--residual-dropout", "1"], catch_exceptions=False)
    assert bad_dropout.exit_code == 2 and "residual_dropout" in bad_dropout.output
    too_much = runner.invoke(app, [*args, "--content-share", "1"], catch_exceptions=False)
    assert too_much.exit_code == 2 and "content_share" in too_much.output
    refused = runner.invoke(app, [*args, "--from", "content"], catch_exceptions=False)
    assert refused.exit_code == 2 and "--from" in refused.output
    stray = runner.invoke(app, ["embed", "--data", str(tuned_inputs), "--tune-steps", "5"],
                          catch_exceptions=False)
    assert stray.exit_code == 2 and "--tune histories" in stray.output
    stray_dropout = runner.invoke(app, ["embed", "--data", str(tuned_inputs), "--residual-dropout", "0.2"],
                                  catch_exceptions=False)
    assert stray_dropout.exit_code == 2 and "--residual-dropout" in stray_dropout.output


def test_neighbors_side_by_side(tuned_inputs: Path) -> None:
    runner = CliRunner()
    tuned = tuned_inputs / "item_info_tuned.parquet"
    made = runner.invoke(app, ["embed", "--tune", "histories", "--data", str(tuned_inputs), "--dim", "8",
                               "--tune-steps", "20"], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    original = tuned_inputs / "MicroLens_1M_x1" / "item_info.parquet"
    result = runner.invoke(app, ["neighbors", "5", "-k", "3", "--table", str(original),
                                 "--compare", str(tuned)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "in item_info.parquet" in result.output and "in item_info_tuned.parquet" in result.output


def test_read_histories_streams_distinct_histories_in_file_order(tmp_path: Path) -> None:
    """Distinct histories with two items or more, left-padded, in the order they first appear, however the
    file is cut into batches: lists of other lengths, null lists and items, padding, repeats across
    batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sequences = [[0, 0, 5, 6], [7], [5, 6], None, [1, None, 2], [0, 0, 5, 6], [3, 4, 5, 6, 7], [0, 9],
                 [1, 0, 2], [3, 4, 5, 6, 7], [8, 8]]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"item_seq": pa.array(sequences, type=pa.list_(pa.int64())),
                             "label": pa.array([1.0] * len(sequences))}), path, row_group_size=3)
    expected = np.array([[0, 0, 0, 5, 6], [0, 0, 1, 0, 2], [3, 4, 5, 6, 7], [0, 0, 0, 8, 8]])
    for batch_rows in (1, 2, 4, 100):
        np.testing.assert_array_equal(read_histories(path, batch_rows=batch_rows), expected)


def test_read_histories_names_a_column_of_the_wrong_type(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"item_seq": pa.array(["1 2 3", "4 5"])}), path)
    with pytest.raises(QinError, match=r"train\.parquet: column item_seq must be a list of integer item ids"):
        read_histories(path)
