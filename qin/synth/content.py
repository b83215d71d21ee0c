"""Item content: text/image vectors, their PCA (item_emb_d128), embedding variants, titles, cover images."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qin.synth.items import Items
from qin.synth.params import EMB_DIM, IMG_DIM, TXT_DIM, SynthParams, SynthSize, stream


def content_vectors(items: Items, prm: SynthParams, empty_title: np.ndarray, seed: int,
                    size: SynthSize) -> tuple[np.ndarray, np.ndarray]:
    """txt_emb_BERT = A_t·c_i + noise, img_emb_CLIPRN50 = A_v·[c_i, nuisance_i] + noise (c = content latent).

    Items with an empty title get the "empty string" text vector (a constant) plus noise, like a real
    encoder fed "".

    Returns:
        txt (N, 768) float32, img (N, 1024) float32 for items 1..N.
    """
    rng = stream(seed, size, "content")
    c = items.content[1:]  # (N, d)
    n, d = c.shape
    a_t = (rng.standard_normal((d, TXT_DIM)) / np.sqrt(d)).astype(np.float32)  # (d, 768)
    a_v = (rng.standard_normal((d + prm.img_nuisance_dim, IMG_DIM)) / np.sqrt(d)).astype(np.float32)
    txt = c @ a_t  # (N, 768)
    empty_vec = (rng.standard_normal(TXT_DIM) / np.sqrt(d)).astype(np.float32)
    txt[empty_title] = empty_vec
    txt += np.float32(prm.txt_noise) * rng.standard_normal((n, TXT_DIM), dtype=np.float32)
    nuisance = (rng.standard_normal((n, prm.img_nuisance_dim)) / np.sqrt(d)).astype(np.float32)
    img = np.concatenate([c, nuisance], axis=1) @ a_v  # (N, 1024)
    img += np.float32(prm.img_noise) * rng.standard_normal((n, IMG_DIM), dtype=np.float32)
    return txt, img


def pca(x_parts: tuple[np.ndarray, ...], dim: int) -> np.ndarray:
    """PCA of the column-concatenation of x_parts (no whitening), as the organisers' sklearn PCA(128).

    Exact, by an eigendecomposition of the smaller of the covariance (D x D) and the Gram matrix (N x N),
    keeping only the top ``dim`` eigenpairs (LAPACK's MRRR driver: several times faster than a full eigh).

    Args:
        x_parts: arrays (N, D_p); their concatenation X is (N, D).

    Returns:
        (N, dim) float64 scores (X - mean) @ W. Each component's sign is fixed (largest |loading| in W
        positive), so the result does not depend on the eigen-solver's sign choice.
    """
    from scipy.linalg import eigh  # scipy comes with scikit-learn

    n = x_parts[0].shape[0]
    mean = np.concatenate([p.mean(axis=0, dtype=np.float64) for p in x_parts])  # (D,)
    width = mean.size
    step = 8192  # rows per block: bounds the float64 copy to ~120 MB at D=1792

    def blocks() -> Iterator[tuple[slice, np.ndarray]]:
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            yield sl, np.concatenate([p[sl] for p in x_parts], axis=1).astype(np.float64) - mean

    if n < width:  # few items (tiny/small): eigenvectors of the Gram matrix, mapped back to loadings
        xc = np.concatenate([blk for _, blk in blocks()])  # (N, D)
        evals, evecs = eigh(xc @ xc.T, subset_by_index=[n - dim, n - 1], driver="evr")  # ascending
        comps = xc.T @ evecs[:, ::-1] / np.sqrt(np.maximum(evals[::-1], 1e-300))  # (D, dim) unit columns
    else:
        cov = np.zeros((width, width), dtype=np.float64)
        for _, blk in blocks():
            cov += blk.T @ blk
        evals, evecs = eigh(cov, subset_by_index=[width - dim, width - 1], driver="evr")
        comps = evecs[:, ::-1]  # (D, dim), by decreasing variance
    comps = comps * np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(dim)])
    out = np.empty((n, dim), dtype=np.float64)
    for sl, blk in blocks():
        out[sl] = blk @ comps
    return out


def emb_variants(items: Items, prm: SynthParams, seed: int, size: SynthSize) -> list[np.ndarray]:
    """The four item_emb.parquet variants: random 128-d re-projections of v (the click latent) + noise.

    They stand for organiser-made embeddings trained on behaviour (item_seq), which is why they carry the
    click latent v rather than the content latent; v3 has the least noise.

    Returns:
        4 arrays (N, 128) float32.
    """
    rng = stream(seed, size, "emb_variants")
    v = items.v[1:]
    n, d = v.shape
    out = []
    for noise in prm.variant_noise:
        proj = (rng.standard_normal((d, EMB_DIM)) / np.sqrt(d)).astype(np.float32)
        out.append(v @ proj + np.float32(noise / np.sqrt(EMB_DIM / d)) *
                   rng.standard_normal((n, EMB_DIM), dtype=np.float32))
    return out


# Word lists for titles: one theme per topic (cycled); topics that share a theme differ by their own
# two made-up words. English-ish so that a small text encoder can see the topics.
_THEMES: tuple[tuple[str, ...], ...] = (
    ("cat", "kitten", "paw", "meow", "purr", "whiskers", "fluffy", "pets"),
    ("dog", "puppy", "bark", "leash", "fetch", "doggo", "walkies", "woof"),
    ("pasta", "recipe", "cooking", "kitchen", "sauce", "garlic", "dinner", "food"),
    ("cake", "baking", "dessert", "chocolate", "cream", "sweet", "oven", "bake"),
    ("football", "goal", "match", "striker", "league", "stadium", "kick", "soccer"),
    ("basketball", "dunk", "court", "hoops", "rebound", "nba", "buzzer", "ball"),
    ("guitar", "chords", "song", "acoustic", "riff", "strum", "cover", "music"),
    ("piano", "melody", "keys", "classical", "sonata", "chopin", "recital", "piano"),
    ("makeup", "lipstick", "tutorial", "eyeliner", "glow", "skincare", "beauty", "look"),
    ("fashion", "outfit", "style", "dress", "sneakers", "streetwear", "haul", "ootd"),
    ("travel", "beach", "island", "sunset", "flight", "vacation", "trip", "wanderlust"),
    ("mountain", "hiking", "trail", "summit", "camping", "forest", "tent", "outdoors"),
    ("game", "gaming", "boss", "level", "speedrun", "controller", "stream", "gamer"),
    ("anime", "manga", "cosplay", "episode", "otaku", "character", "fanart", "anime"),
    ("car", "engine", "drift", "racing", "turbo", "garage", "supercar", "cars"),
    ("phone", "unboxing", "review", "gadget", "camera", "battery", "specs", "tech"),
    ("dance", "choreo", "moves", "kpop", "routine", "challenge", "rhythm", "dance"),
    ("workout", "gym", "squat", "cardio", "muscle", "protein", "fitness", "gains"),
    ("baby", "toddler", "giggle", "parenting", "family", "firststeps", "cute", "baby"),
    ("comedy", "prank", "funny", "joke", "skit", "laugh", "meme", "lol"),
    ("painting", "canvas", "brush", "watercolor", "sketch", "drawing", "artist", "art"),
    ("garden", "flowers", "plants", "seeds", "bloom", "harvest", "soil", "garden"),
    ("fishing", "lake", "bait", "catch", "river", "boat", "trout", "fishing"),
    ("science", "experiment", "chemistry", "physics", "lab", "reaction", "atoms", "science"),
    ("history", "ancient", "empire", "castle", "war", "dynasty", "museum", "history"),
    ("coffee", "latte", "espresso", "barista", "beans", "brew", "cafe", "coffee"),
    ("street", "snack", "noodles", "dumplings", "spicy", "vendor", "market", "streetfood"),
    ("wedding", "bride", "ring", "ceremony", "vows", "bouquet", "groom", "wedding"),
    ("horse", "riding", "saddle", "gallop", "stable", "pony", "equestrian", "horses"),
    ("space", "rocket", "planet", "galaxy", "astronaut", "nasa", "orbit", "space"),
    ("diy", "crafts", "glue", "handmade", "woodwork", "upcycle", "tools", "diy"),
    ("study", "exam", "notes", "homework", "school", "campus", "studytips", "study"),
)
_FILLER = ("today", "my", "new", "best", "look", "this", "video", "wow", "so", "the", "first", "day",
           "with", "love", "time", "fun", "omg", "part", "vlog", "episode")
_SYLL = ("ka", "lo", "mi", "ren", "to", "va", "shi", "zu", "ne", "por", "qui", "dal", "fe", "gor", "bi",
         "xan")


def _topic_words(k: int) -> tuple[list[list[str]], list[str]]:
    """(topic words, hashtag) per topic: the theme's first 7 words + 2 made-up words; hashtag = 8th word."""
    words: list[list[str]] = []
    tags: list[str] = []
    for t in range(k):
        theme = _THEMES[t % len(_THEMES)]
        a, b = divmod(t * 7 + 3, len(_SYLL))
        made = [_SYLL[a % len(_SYLL)] + _SYLL[b] + _SYLL[(t + 5) % len(_SYLL)],
                _SYLL[(t * 3 + 1) % len(_SYLL)] + _SYLL[(a + b) % len(_SYLL)]]
        words.append(list(theme[:7]) + made)
        tags.append("#" + theme[7] + (str(t // len(_THEMES)) if t >= len(_THEMES) else ""))
    return words, tags


def make_titles(items: Items, k: int, empty: np.ndarray, seed: int, size: SynthSize) -> pa.Array:
    """Titles of 3-8 words (75% topic words, 25% filler) plus the topic's hashtag, built without a row loop.

    Returns:
        pa.string() array (N,); items flagged in ``empty`` (N,) get "".
    """
    rng = stream(seed, size, "titles")
    n = items.topic.size - 1
    topic = items.topic[1:]
    words, hashtags = _topic_words(k)
    per_topic = len(words[0])
    vocab = [w for ws in words for w in ws] + list(_FILLER) + hashtags  # one flat vocabulary
    filler0, hash0 = k * per_topic, k * per_topic + len(_FILLER)
    n_words = rng.integers(3, 9, size=n)  # 3..8 words
    n_words[empty] = 0
    width = 9  # 8 words + hashtag
    tok = np.where(rng.random((n, width)) < 0.75,
                   topic[:, None] * per_topic + rng.integers(0, per_topic, size=(n, width)),
                   filler0 + rng.integers(0, len(_FILLER), size=(n, width)))
    tok[np.arange(n), np.minimum(n_words, width - 1)] = hash0 + topic  # hashtag right after the words
    n_tok = np.where(empty, 0, n_words + 1)
    keep = np.arange(width)[None, :] < n_tok[:, None]  # (N, 9)
    flat = pa.array(vocab).take(pa.array(tok[keep]))
    offsets = np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), flat)
    return pc.binary_join(lists, " ")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV→RGB. Inputs (m,) in [0, 1]; returns (m, 3) float in [0, 1]."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, axis=-1) for c in
                      [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])  # (6, m, 3)
    return table[i, np.arange(h.size)]


def _cover_images(items: Items, ids: np.ndarray, px: int, rng: np.random.Generator) -> np.ndarray:
    """Cover images whose colours and shape depend on the topic, and position/size on the content latent.

    Args:
        ids: (m,) item ids.

    Returns:
        (m, px, px, 3) uint8.
    """
    topic = items.topic[ids]
    c = items.content[ids].astype(np.float64)  # components ~ N(0, 1/d): scaled by 4 below to vary visibly
    hue = (topic * 0.6180339887) % 1.0
    bg = _hsv_to_rgb(hue, np.full(hue.shape, 0.35), np.full(hue.shape, 0.92))  # (m, 3)
    fg = _hsv_to_rgb((hue + 0.5) % 1.0, np.full(hue.shape, 0.85), 0.55 + 0.125 * (np.tanh(4 * c[:, 3]) + 1))
    grid = (np.arange(px) + 0.5) / px * 2 - 1
    y, x = grid[None, :, None], grid[None, None, :]  # (1, px, 1), (1, 1, px)
    cx, cy = 0.3 * np.tanh(4 * c[:, 0])[:, None, None], 0.3 * np.tanh(4 * c[:, 1])[:, None, None]
    r = (0.45 + 0.15 * np.tanh(4 * c[:, 2]))[:, None, None]
    dx, dy = x - cx, y - cy  # (m, px, px)
    shapes = [
        dx**2 + dy**2 < r**2,  # disc
        np.maximum(np.abs(dx), np.abs(dy)) < r * 0.85,  # square
        (dy > -r) & (dy < r) & (np.abs(dx) < (dy + r) / 2),  # triangle
        np.sin(dy * 9.0) > 0,  # horizontal stripes
        np.sin(dx * 9.0) > 0,  # vertical stripes
        (dx**2 + dy**2 < r**2) & (dx**2 + dy**2 > (r * 0.55) ** 2),  # ring
        np.abs(dx) + np.abs(dy) < r,  # diamond
        (np.minimum(np.abs(dx), np.abs(dy)) < r / 3) & (np.maximum(np.abs(dx), np.abs(dy)) < r),  # cross
    ]
    kind = topic % len(shapes)
    mask = np.choose(kind[:, None, None], shapes)  # (m, px, px)
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :]) * 255.0
    img += rng.normal(0.0, 8.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_images(items: Items, folder: Path, present: np.ndarray, prm: SynthParams, seed: int,
                 size: SynthSize, on_chunk: Callable[[int], None]) -> None:
    """Write <item_id>.jpg for items with ``present`` (N+1,) True; in chunks, file writes in 4 threads."""
    from PIL import Image  # imported here: only this stage needs Pillow

    folder.mkdir(parents=True)
    ids_all = np.nonzero(present)[0]
    step = 4096

    def save(arr: np.ndarray, item_id: int) -> None:
        Image.fromarray(arr).save(folder / f"{item_id}.jpg", format="JPEG", quality=90)

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL and file I/O release the GIL
        for ci, lo in enumerate(range(0, ids_all.size, step)):
            ids = ids_all[lo : lo + step]
            imgs = _cover_images(items, ids, prm.image_px, stream(seed, size, f"images.{ci}"))
            list(pool.map(save, imgs, ids.tolist()))
            on_chunk(ids.size)
