"""Task-1 item embeddings: table schema and row order, PCA figures, content encoders, cache, neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qin import embed
from qin.embed import (
    Fusion,
    build_index,
    embed_from_content,
    embed_from_precomputed,
    fuse,
    l2_normalise,
    neighbors,
    pca_reduce,
    recipes,
)
from qin.errors import QinError

WORDS = ["cat", "kitten", "yarn", "sofa", "sleeps", "football", "goal", "match", "piano", "melody", "#",
         "cats",
         "cute", "my", "the", "on", "with", "playing"]


# ---------------------------------------------------------------------------------------------------------
# Small inputs


def _write_items(folder: Path, n: int, seed: int = 0, shuffle: bool = True,
                 titles: list[str | None] | None = None, txt_dim: int = 768,
                 img_dim: int = 1024) -> tuple[Path, Path, np.ndarray]:
    """item_feature.parquet (rows shuffled) and MicroLens_1M_x1/item_info.parquet for items 1..n.

    Returns:
        (item_feature path, item_info path, (n+1, 5) padded tags with row 0 zeros).
    """
    rng = np.random.default_rng(seed)
    tags = np.zeros((n + 1, 5), dtype=np.int64)
    for i in range(1, n + 1):
        m = rng.integers(1, 6)
        tags[i, :m] = rng.integers(1, 50, size=m)
    if titles is None:
        titles = [" ".join(rng.choice(WORDS[:10], size=4)) for _ in range(n)]
    item_ids = np.arange(1, n + 1)
    txt = rng.standard_normal((n, txt_dim)).astype(np.float32) + item_ids[:, None].astype(np.float32) / n
    img = rng.standard_normal((n, img_dim)).astype(np.float32)
    order = rng.permutation(n) if shuffle else np.arange(n)
    feature = pa.table({
        "item_id": pa.array(item_ids[order]),
        "item_title": pa.array([titles[i] for i in order], type=pa.string()),
        "item_tags": pa.array([[int(t) for t in tags[i + 1] if t] for i in order], type=pa.list_(pa.int64())),
        "likes_level": pa.array(rng.integers(0, 10, n)[order]),
        "views_level": pa.array(rng.integers(0, 10, n)[order]),
        "txt_emb_BERT": pa.array(list(txt[order]), type=pa.list_(pa.float32())),
        "img_emb_CLIPRN50": pa.array(list(img[order]), type=pa.list_(pa.float32())),
    })
    (folder / "MicroLens_1M_x1").mkdir(parents=True, exist_ok=True)
    pq.write_table(feature, folder / "item_feature.parquet")
    emb = np.zeros((n + 1, 128))
    emb[1:] = rng.standard_normal((n, 128))
    info = pa.table({"item_id": pa.array(np.arange(n + 1)),
                     "item_tags": pa.array(list(tags), type=pa.list_(pa.int64())),
                     "item_emb_d128": pa.array(list(emb), type=pa.list_(pa.float64()))})
    pq.write_table(info, folder / "MicroLens_1M_x1" / "item_info.parquet")
    return folder / "item_feature.parquet", folder / "MicroLens_1M_x1" / "item_info.parquet", tags


def _write_images(folder: Path, item_ids: list[int]) -> Path:
    from PIL import Image

    images = folder / "item_images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for item in item_ids:
        pixels = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{item}.jpg")
    return images


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """A randomly initialised BERT (hidden 32) with an offline WordPiece tokenizer, and a tiny CLIP."""
    from transformers import BertConfig, BertModel, BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel
    from transformers.utils import logging as hf_logging

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    bert_dir = root / "tiny-bert"
    BertTokenizer(vocab=str(vocab)).save_pretrained(bert_dir)
    bert = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    BertModel(bert).save_pretrained(bert_dir)
    clip_dir = root / "tiny-clip"
    config = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32, "max_position_embeddings": 16, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 32, "image_size": 32, "patch_size": 8},
        projection_dim=32)
    hf_logging.set_verbosity_error()  # the torchvision-missing notice of CLIPImageProcessor
    CLIPModel(config).save_pretrained(clip_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(clip_dir)
    hf_logging.set_verbosity_warning()
    return bert_dir, clip_dir


def _emb(path: Path) -> np.ndarray:
    return np.array(pl.read_parquet(path)["item_emb_d128"].to_list(), dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------
# PCA


def test_pca_recovers_planted_spectrum_and_matches_svd():
    rng = np.random.default_rng(0)
    n, width, dim = 400, 24, 6
    eigen = np.linspace(10.0, 0.5, width) ** 2  # known covariance spectrum, descending and distinct
    z, _ = np.linalg.qr(rng.standard_normal((n, width)))  # orthonormal columns
    z = (z - z.mean(0)) * np.sqrt(n - 1)
    z, _ = np.linalg.qr(z - z.mean(0))  # centred, orthonormal: sample covariance exactly diag(eigen)
    rotation, _ = np.linalg.qr(rng.standard_normal((width, width)))
    x = (z * np.sqrt((n - 1) * eigen)) @ rotation.T + 3.0  # (n, width), offset removed by the centring

    result = pca_reduce(x, dim)
    expected = eigen[:dim] / eigen.sum()
    np.testing.assert_allclose(result.explained_variance_ratio, expected, rtol=1e-4)
    assert result.total_explained == pytest.approx(expected.sum(), rel=1e-4)
    assert result.vectors.shape == (n, dim) and result.vectors.dtype == np.float32

    centred = x - x.mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(result.explained_variance_ratio, (singular**2 / (singular**2).sum())[:dim],
                               rtol=1e-4)
    reference = centred @ vt[:dim].T  # (n, dim), same components up to sign
    sign = np.sign(vt[np.arange(dim), np.argmax(np.abs(vt[:dim]), axis=1)])  # largest loading positive
    np.testing.assert_allclose(result.vectors, reference * sign, atol=2e-3 * np.abs(reference).max())


def test_pca_with_as_many_components_as_items_pads_one_exact_zero_column():
    # 6 centred points span 5 directions: component 6 carries no variance and is a zero column
    x = np.random.default_rng(1).standard_normal((6, 20))
    result = pca_reduce(x, 6)
    assert result.vectors.shape == (6, 6)
    assert not result.vectors[:, 5:].any() and not result.explained_variance_ratio[5:].any()
    assert result.total_explained == pytest.approx(1.0, abs=1e-6)
    centred = x - x.mean(0)
    pairwise = ((centred[:, None] - centred[None]) ** 2).sum(-1)
    reduced = ((result.vectors[:, None] - result.vectors[None]).astype(np.float64) ** 2).sum(-1)
    np.testing.assert_allclose(reduced, pairwise, rtol=1e-4, atol=1e-4)  # an exact rotation of the data


def test_pca_rejects_bad_inputs():
    x = np.random.default_rng(0).standard_normal((10, 4))
    with pytest.raises(QinError, match="dim"):
        pca_reduce(x, 5)
    # more components than items: refused (not padded), naming both bounds
    with pytest.raises(QinError, match=r"dim <= 6\b.*items \(6\).*input width \(20\)"):
        pca_reduce(np.random.default_rng(1).standard_normal((6, 20)), 8)
    with pytest.raises(QinError, match="dim"):
        pca_reduce(x, 0)
    with pytest.raises(QinError, match="2-D"):
        pca_reduce(x[0], 2)
    if embed.faiss_gpus() == 0:
        with pytest.raises(QinError, match="GPU"):
            pca_reduce(x, 2, use_gpu=True)


# ---------------------------------------------------------------------------------------------------------
# Recipe 1: precomputed vectors


def test_precomputed_table_schema_and_row_alignment(tmp_path):
    feature, info, tags = _write_items(tmp_path / "a", 40, shuffle=True)
    result = embed_from_precomputed(feature, info, tmp_path / "out.parquet", dim=32)  # at most N = 40
    assert result.items == 40 and result.out == tmp_path / "out.parquet"
    assert 0 < result.explained_variance <= 1
    schema = pq.read_schema(result.out)
    assert schema.names == ["item_id", "item_tags", "item_emb_d128"]
    assert pa.types.is_list(schema.field("item_emb_d128").type) or pa.types.is_large_list(
        schema.field("item_emb_d128").type)
    assert schema.field("item_emb_d128").type.value_type == pa.float32()
    table = pl.read_parquet(result.out)
    assert table["item_id"].to_list() == list(range(41))
    assert np.array(table["item_tags"].to_list()).tolist() == tags.tolist()  # kept from item_info
    emb = _emb(result.out)
    assert emb.shape == (41, 32) and not emb[0].any() and np.abs(emb[1:]).sum(axis=1).min() > 0

    # the same items written in id order give the same rows: row i is item i whatever the file order
    feature_sorted, info_sorted, _ = _write_items(tmp_path / "b", 40, shuffle=False)
    again = embed_from_precomputed(feature_sorted, info_sorted, tmp_path / "sorted.parquet", dim=32)
    np.testing.assert_allclose(_emb(again.out), emb, atol=1e-4)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file behind


def test_precomputed_reproduces_the_generators_organiser_embedding(tiny_data, tmp_path):
    # qin.synth builds item_info.item_emb_d128 exactly as the organisers did (float64 eigh): faiss must agree
    info = tiny_data / "MicroLens_1M_x1" / "item_info.parquet"
    result = embed_from_precomputed(tiny_data / "item_feature.parquet", info, tmp_path / "pre.parquet")
    reference = _emb(info)
    np.testing.assert_allclose(_emb(result.out), reference, atol=1e-4 * np.abs(reference).max())


def test_precomputed_errors(tmp_path):
    feature, info, _ = _write_items(tmp_path, 10)
    with pytest.raises(QinError, match="not found"):
        embed_from_precomputed(tmp_path / "nope.parquet", info, tmp_path / "o.parquet")
    frame = pl.read_parquet(feature).filter(pl.col("item_id") != 3)
    frame.write_parquet(tmp_path / "short.parquet")
    with pytest.raises(QinError, match="9 items"):
        embed_from_precomputed(tmp_path / "short.parquet", info, tmp_path / "o.parquet")


# ---------------------------------------------------------------------------------------------------------
# Recipe 2: content encoders


def test_content_with_tiny_bert_and_clip_counts_missing(tiny_models, tmp_path):
    bert, clip = tiny_models
    titles = [" ".join(WORDS[i % 10 : i % 10 + 3]) for i in range(30)]
    titles[4], titles[11], titles[20] = "", "   ", None
    feature, info, tags = _write_items(tmp_path, 30, titles=titles)
    images = _write_images(tmp_path, [i for i in range(1, 31) if i not in (2, 3, 17)])
    (images / "9.jpg").write_bytes(b"not a jpeg")  # unreadable counts as missing too
    result = embed_from_content(feature, info, images, tmp_path / "out.parquet", text_model=bert,
                                image_model=clip, dim=16, batch_size=8, cache_dir=tmp_path / "cache",
                                progress=False)
    assert (result.items, result.missing_titles, result.missing_images) == (30, 3, 4)
    table = pl.read_parquet(result.out)
    assert table["item_id"].to_list() == list(range(31))
    assert np.array(table["item_tags"].to_list()).tolist() == tags.tolist()
    emb = _emb(result.out)
    assert emb.shape == (31, 16) and not emb[0].any()
    assert {p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.npy")} == {"text", "image"}

    # mean fusion: both modalities are 32-wide here (BERT hidden 32, CLIP projection 32)
    mean = embed_from_content(feature, info, images, tmp_path / "mean.parquet", text_model=bert,
                              image_model=clip, dim=8, cache_dir=tmp_path / "cache", progress=False,
                              fusion=Fusion.mean, text_weight=0.2, image_weight=0.8)
    assert _emb(mean.out).shape == (31, 8)


def test_items_absent_from_item_feature_count_as_missing_titles(tiny_models, tmp_path):
    bert, _ = tiny_models
    feature, info, _ = _write_items(tmp_path, 12)
    pl.read_parquet(feature).filter(pl.col("item_id") != 5).write_parquet(feature)
    result = embed_from_content(feature, info, None, tmp_path / "out.parquet", text_model=bert, dim=4,
                                cache_dir=tmp_path / "cache", progress=False)
    assert result.missing_titles == 1 and result.missing_images == 0


def test_cache_is_reused_across_fusion_and_dim(tiny_models, tmp_path, monkeypatch):
    bert, clip = tiny_models
    feature, info, _ = _write_items(tmp_path, 16)
    images = _write_images(tmp_path, list(range(1, 17)))
    calls = {"text": 0, "image": 0}
    encode_texts, encode_images = embed.encode_texts, embed.encode_images

    def spy_texts(*args, **kwargs):
        calls["text"] += 1
        return encode_texts(*args, **kwargs)

    def spy_images(*args, **kwargs):
        calls["image"] += 1
        return encode_images(*args, **kwargs)

    # embed_from_content (qin/embed/recipes.py) looks the encoders up in its own module: patch them there.
    monkeypatch.setattr(recipes, "encode_texts", spy_texts)
    monkeypatch.setattr(recipes, "encode_images", spy_images)
    common = {"text_model": bert, "image_model": clip, "cache_dir": tmp_path / "cache", "progress": False}
    first = embed_from_content(feature, info, images, tmp_path / "a.parquet", dim=8, **common)
    second = embed_from_content(feature, info, images, tmp_path / "b.parquet", dim=8, **common)
    assert calls == {"text": 1, "image": 1}
    np.testing.assert_array_equal(_emb(first.out), _emb(second.out))
    embed_from_content(feature, info, images, tmp_path / "c.parquet", dim=4, text_weight=0.9,
                       image_weight=0.1, **common)
    assert calls == {"text": 1, "image": 1}  # new weights and PCA size: nothing re-encoded
    (images / "3.jpg").unlink()  # the covers changed: only the image encoder runs again
    embed_from_content(feature, info, images, tmp_path / "d.parquet", dim=4, **common)
    assert calls == {"text": 1, "image": 2}


def test_missing_model_folder_is_a_clear_error(tmp_path):
    feature, info, _ = _write_items(tmp_path, 5)
    missing = tmp_path / "no-such-model"
    with pytest.raises(QinError, match="no-such-model"):
        embed_from_content(feature, info, None, tmp_path / "o.parquet", text_model=missing, progress=False)
    with pytest.raises(QinError, match="image model folder not found"):
        embed_from_content(feature, info, tmp_path, tmp_path / "o.parquet", image_model=missing,
                           progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QinError, match="config.json"):
        embed_from_content(feature, info, None, tmp_path / "o.parquet", text_model=tmp_path / "empty",
                           progress=False)


def test_dim_wider_than_the_fused_vectors_is_an_error(tiny_models, tmp_path):
    bert, _ = tiny_models
    feature, info, _ = _write_items(tmp_path, 40)
    with pytest.raises(QinError, match=r"dim <= 32\b.*items \(40\).*fused width \(32\)"):
        embed_from_content(feature, info, None, tmp_path / "o.parquet", text_model=bert, dim=33,
                           cache_dir=tmp_path / "cache", progress=False)


def test_shipped_minilm_places_same_topic_titles_closer():
    titles = ["cute kitten playing with yarn #cats", "my cat sleeps on the sofa",
              "football match highlights goal", None]
    vectors = embed.encode_texts(embed.default_text_model(), titles, batch_size=4, progress=False, label="t")
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, rtol=1e-5)
    assert not vectors[3].any()  # no title: zero vector, not encoded
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.1


# ---------------------------------------------------------------------------------------------------------
# Fusion, index, neighbours


def test_concat_fusion_weights_act_on_squared_distances():
    rng = np.random.default_rng(0)
    a, b = l2_normalise(rng.standard_normal((2, 5))), l2_normalise(rng.standard_normal((2, 3)))
    fused = fuse([(a, 0.3), (b, 0.7)])
    expected = 0.3 * ((a[0] - a[1]) ** 2).sum() + 0.7 * ((b[0] - b[1]) ** 2).sum()
    assert ((fused[0] - fused[1]) ** 2).sum() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(QinError, match="one width"):
        fuse([(a, 0.5), (b, 0.5)], Fusion.mean)
    with pytest.raises(QinError, match="weights"):
        fuse([(a, -1.0), (b, 0.5)])
    with pytest.raises(QinError, match="concat, mean"):
        fuse([(a, 0.5), (b, 0.5)], "sum")  # type: ignore[arg-type]
    assert fuse([(a, 1.0), (a, 3.0)], "mean") == pytest.approx(a)  # a plain string names a mode too


def test_build_index_is_cosine():
    vectors = np.array([[1.0, 0.0], [10.0, 10.0], [0.0, -3.0]], dtype=np.float32)
    scores, found = build_index(vectors).search(l2_normalise(np.array([[2.0, 2.0]])), 3)
    assert found[0].tolist() == [1, 0, 2]
    np.testing.assert_allclose(scores[0], [1.0, np.sqrt(0.5), -np.sqrt(0.5)], atol=1e-6)


def test_neighbors_excludes_the_item_and_padding(tmp_path):
    feature, info, _ = _write_items(tmp_path, 20)
    table = pl.read_parquet(info)
    emb = np.zeros((21, 4), dtype=np.float32)
    emb[1:] = np.random.default_rng(0).standard_normal((20, 4))
    emb[7] = emb[3] * 2  # item 7 points where item 3 points: its best neighbour, cosine 1
    column = pl.Series("item_emb_d128", emb).cast(pl.List(pl.Float32))
    table.with_columns(column).write_parquet(tmp_path / "t.pq")

    result = neighbors(tmp_path / "t.pq", feature, 3, k=5)
    assert result.columns == ["rank", "item_id", "score", "title", "tags"]
    assert result["rank"].to_list() == [1, 2, 3, 4, 5]
    assert 3 not in result["item_id"].to_list() and 0 not in result["item_id"].to_list()
    assert result["item_id"][0] == 7 and result["score"][0] == pytest.approx(1.0, abs=1e-5)
    assert result["score"].is_sorted(descending=True)
    titles = dict(pl.read_parquet(feature, columns=["item_id", "item_title"]).iter_rows())
    assert result["title"].to_list() == [titles[i] for i in result["item_id"].to_list()]

    everything = neighbors(tmp_path / "t.pq", None, 3, k=50)  # more than exist: every other item once
    assert sorted(everything["item_id"].to_list()) == [i for i in range(1, 21) if i != 3]
    assert all(0 not in tags for tags in everything["tags"].to_list())  # padding zeros dropped
    with pytest.raises(QinError, match="not in 1..20"):
        neighbors(tmp_path / "t.pq", None, 0)


# ---------------------------------------------------------------------------------------------------------
# Output, temporaries and cache safety


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _spy_encoders(monkeypatch) -> dict[str, int]:
    calls = {"text": 0, "image": 0}
    encode_texts, encode_images = embed.encode_texts, embed.encode_images

    def spy_texts(*args, **kwargs):
        calls["text"] += 1
        return encode_texts(*args, **kwargs)

    def spy_images(*args, **kwargs):
        calls["image"] += 1
        return encode_images(*args, **kwargs)

    monkeypatch.setattr(recipes, "encode_texts", spy_texts)
    monkeypatch.setattr(recipes, "encode_images", spy_images)
    return calls


def test_a_killed_writers_temporaries_are_removed_on_the_next_write(tmp_path):
    import os

    from qin.embed.atomic import atomic_write
    from qin.embed.cache import _save_atomic

    feature, info, _ = _write_items(tmp_path / "d", 10)
    dead = _dead_pid()
    stale = tmp_path / f".e.parquet.{dead}.k2_x9abc.tmp"  # left by a killed `qin embed`
    keep = [tmp_path / f".e.parquet.{os.getpid()}.abcdefgh.tmp",  # a live writer's (ours)
            tmp_path / ".e.parquet.abcdefgh.tmp",  # no pid: not this pattern
            tmp_path / f".e.parquet.{dead}.abcdefgh.tmp.keep",  # not a full match
            tmp_path / f".other.parquet.{dead}.abcdefgh.tmp",  # another output's
            tmp_path / f"e.parquet.{dead}.abcdefgh.tmp"]
    for path in [stale, *keep]:
        path.write_bytes(b"x")
    embed_from_precomputed(feature, info, tmp_path / "e.parquet", dim=4)
    assert not stale.exists() and all(path.exists() for path in keep)
    assert sorted(p.name for p in tmp_path.glob(".e.parquet.*")) == sorted(p.name for p in keep[:3])

    with atomic_write(tmp_path / "f.bin") as tmp:  # the temporary names the writing process
        assert tmp.name.startswith(f".f.bin.{os.getpid()}.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"data")
    assert (tmp_path / "f.bin").read_bytes() == b"data"

    cache = tmp_path / "cache"
    cache.mkdir()
    stale_cache = [cache / f".text-x.npy.{dead}.abcdefgh.tmp",
                   cache / f".text-x.npy.sha256.{dead}.a1b2c3d4.tmp"]
    for path in stale_cache:
        path.write_bytes(b"x")
    _save_atomic(cache / "text-x.npy", np.ones((3, 2), dtype=np.float32))
    assert sorted(p.name for p in cache.iterdir()) == ["text-x.npy", "text-x.npy.sha256"]


def test_altered_or_unrecorded_cache_entries_are_discarded(tiny_models, tmp_path, monkeypatch, capsys):
    bert, _ = tiny_models
    feature, info, _ = _write_items(tmp_path, 12)
    calls = _spy_encoders(monkeypatch)
    common = {"text_model": bert, "dim": 4, "cache_dir": tmp_path / "cache", "progress": False}
    first = embed_from_content(feature, info, None, tmp_path / "a.parquet", **common)
    [entry] = (tmp_path / "cache").glob("*.npy")
    assert (tmp_path / "cache" / f"{entry.name}.sha256").is_file()
    vectors = np.load(entry)
    capsys.readouterr()

    np.save(entry, np.zeros_like(vectors))  # right shape, wrong bytes: must not be used
    again = embed_from_content(feature, info, None, tmp_path / "b.parquet", **common)
    assert calls["text"] == 2
    np.testing.assert_array_equal(_emb(again.out), _emb(first.out))
    note = capsys.readouterr().err
    assert "discarded cache entry" in note and entry.name in note and "sha256" in note
    np.testing.assert_array_equal(np.load(entry), vectors)  # rewritten with the real vectors

    (tmp_path / "cache" / f"{entry.name}.sha256").unlink()  # no record: not trusted either
    embed_from_content(feature, info, None, tmp_path / "c.parquet", **common)
    assert calls["text"] == 3 and "no sha256 record" in capsys.readouterr().err

    embed_from_content(feature, info, None, tmp_path / "d.parquet", **common)  # intact: used, no note
    assert calls["text"] == 3 and "discarded" not in capsys.readouterr().err


def test_dim_above_the_item_count_is_refused_before_any_work(tiny_models, tmp_path, monkeypatch):
    bert, _ = tiny_models
    feature, info, _ = _write_items(tmp_path, 20, txt_dim=8, img_dim=16)
    with pytest.raises(QinError, match=r"dim <= 20\b.*items \(20\).*fused input width \(24\)"):
        embed_from_precomputed(feature, info, tmp_path / "o.parquet", dim=21)
    with pytest.raises(QinError, match=r"dim <= 20\b.*items \(20\).*fused input width \(24\)"):
        embed_from_precomputed(feature, info, tmp_path / "o.parquet", dim=0)
    assert embed_from_precomputed(feature, info, tmp_path / "o.parquet", dim=20).items == 20
    calls = _spy_encoders(monkeypatch)
    with pytest.raises(QinError, match="there are 20 items"):
        embed_from_content(feature, info, None, tmp_path / "c.parquet", text_model=bert, dim=21,
                           cache_dir=tmp_path / "cache", progress=False)
    assert calls == {"text": 0, "image": 0} and not (tmp_path / "c.parquet").exists()


def test_out_must_be_a_parquet_path(tmp_path):
    feature, info, _ = _write_items(tmp_path, 6)
    for name in ("x.csv", "x", "x.parquet.tmp"):
        with pytest.raises(QinError, match=r"ending in \.parquet"):
            embed_from_precomputed(feature, info, tmp_path / name, dim=4)
        with pytest.raises(QinError, match=r"ending in \.parquet"):  # before the (missing) model is looked at
            embed_from_content(feature, info, None, tmp_path / name, text_model=tmp_path / "nope",
                               progress=False)
        assert not (tmp_path / name).exists()
    assert embed_from_precomputed(feature, info, tmp_path / "X.PARQUET", dim=4).items == 6


def test_a_file_as_cache_dir_is_refused_before_encoding(tiny_models, tmp_path, monkeypatch):
    bert, _ = tiny_models
    feature, info, _ = _write_items(tmp_path, 6)
    calls = _spy_encoders(monkeypatch)
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    for cache_dir in (blocker, blocker / "sub"):
        with pytest.raises(QinError, match=f"{cache_dir}: cache dir exists and is not a folder"):
            embed_from_content(feature, info, None, tmp_path / "o.parquet", text_model=bert, dim=4,
                               cache_dir=cache_dir, progress=False)
    assert calls == {"text": 0, "image": 0}


def test_cli_refuses_a_csv_out_and_a_file_cache_dir(tmp_path):
    from typer.testing import CliRunner

    from qin.cli import app

    _write_items(tmp_path, 6)
    (tmp_path / "blocker").write_text("x")
    runner = CliRunner()
    for args in (["--out", str(tmp_path / "x.csv")],
                 ["--from", "content", "--cache-dir", str(tmp_path / "blocker")]):
        result = runner.invoke(app, ["embed", "--data", str(tmp_path), "--dim", "4", *args])
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and "data.item_info" not in result.output
    assert not (tmp_path / "x.csv").exists()
