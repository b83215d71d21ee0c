"""Demo data generator: the challenge's files and dtypes, drawn from a known process (see docs/demo_data.md).

Because the process is known, every row's true click probability ``p_true`` is known, and so is the best AUC
any model can reach on it. `synthesize` writes::

    out_dir/MicroLens_1M_x1/{train,valid,test}.parquet, item_info.parquet
    out_dir/item_feature.parquet, item_emb.parquet, item_seq.parquet, item_images/<item_id>.jpg
    out_dir/hidden/{valid_truth,test_truth,item_latent}.parquet, meta.json, files.txt  (never read by a model)

into a new or empty out_dir, or over an earlier run's: hidden/meta.json lists the entries that run wrote
("outputs") and hidden/files.txt every file under them; nothing else is ever replaced (a user's file added
inside an entry makes the run refuse: qin.layout.check_out_dir), so real data are never lost to demo data.

Notation: N items (ids 1..N, 0 = padding), T tags (ids 1..T), K topics, U users, n rows, S stored history
length, d = d_lat latent dimension, Σ = total history slots over a set of rows (ragged).

The process (docs/demo_data.md §2-3), in one paragraph: items have a topic, a unit latent vector v near their
topic centre, a Zipf popularity, tags drawn mostly from their topic's pool, and content vectors (BERT-like
768-d text, CLIP-like 1024-d image, a title, a cover image) made from a *content* latent that shares only
part of v's item-specific part. Users have 1-3 interest topics; their history is topic- and
popularity-driven with a few repeats. Each user gets 4 candidates (35% from the user's topics, 65% from
global popularity), labelled with y ~ Bernoulli(sigmoid(f)) where f is dominated by a sharp target
attention s_att = sum_j softmax_j(<v_t, v_hj>/tau - gamma*log(1+age_j)) <v_t, v_hj> and its product with
the target's quality q (interest match counts more for well-liked items).

Tuned AUCs, seed 0, as expected AUCs over all rows of all splits (label noise integrated out), from
`python benchmarks/signal_anatomy.py --size <size>`. "additive" is the best additive model of the TRUE
signals (a logistic regression on s_att, s_tag, s_rep, q, popularity, user and item bias, fitted on train,
scored on valid + test); "+ products" adds s_att·q and s_tag·q to it. Their gap is what modelling crosses
can win on this data at most; the generator is tuned so that it is about 0.01 (it was 0.0006 with the
earlier weights w_att 8, w_att_q 1, w_tag_q 0.8, under which no tower could gain from crosses).

    size  | oracle AUC* | popularity | s_att alone | additive | + products
    ------+-------------+------------+-------------+----------+-----------
    tiny  |    .948     |    .419    |    .707     |   .926   |   .947
    small |    .955     |    .606    |    .850     |   .943   |   .954
    bench |    .947     |    .599    |    .848     |   .936   |   .947
    full  |    .940     |    .550    |    .806     |   .922   |   .940

tiny is for plumbing only (8k rows: models stay far from the oracle; its popularity is even anti-correlated
with clicks, because popular candidates are rarely interest matches). Popularity alone falls as N grows
(long tail); w_pop is the spec's 0.2, which keeps small and bench near the real data's reported 0.58-0.62.

`draw_synth` draws the same truth and rows in memory (no files): analyses such as
benchmarks/signal_anatomy.py use it, so they always see exactly the rows `synthesize` writes.

The code, in the order the data are drawn (every name that code outside qin.synth uses is re-exported here):

    params.py    SynthSize, SizeSpec, SIZES, SynthParams, DEFAULT_PARAMS, params_with, constants, stream
    items.py     item truth (Items, make_items, tags) and popularity samplers
    content.py   text/image vectors, their PCA, embedding variants, titles, cover images
    users.py     users' interests and histories
    rows.py      candidates, signals s_att/s_rep/s_tag (signals, history_slots), logits, β0
    write.py     parquet writers (splits, item_seq, item files, hidden truth)
    metrics.py   expected_auc and the realised AUC
    generate.py  draw_synth (truth and rows in memory) and synthesize: every stage, in order, into a
                 temporary folder, then moved in
"""

from qin.synth.generate import SynthDraw, SynthResult, draw_synth, synthesize
from qin.synth.metrics import expected_auc
from qin.synth.params import (
    CANDIDATES_PER_USER,
    DATA_SUBDIR,
    DEFAULT_PARAMS,
    EMB_DIM,
    EMB_VARIANTS,
    HIDDEN_SUBDIR,
    IMAGES_SUBDIR,
    IMG_DIM,
    N_ITEM_TAGS,
    SIZES,
    TXT_DIM,
    SizeSpec,
    SynthParams,
    SynthSize,
    params_with,
)
from qin.synth.rows import history_slots, signals

__all__ = [
    "CANDIDATES_PER_USER",
    "DATA_SUBDIR",
    "DEFAULT_PARAMS",
    "EMB_DIM",
    "EMB_VARIANTS",
    "HIDDEN_SUBDIR",
    "IMAGES_SUBDIR",
    "IMG_DIM",
    "N_ITEM_TAGS",
    "SIZES",
    "TXT_DIM",
    "SizeSpec",
    "SynthDraw",
    "SynthParams",
    "SynthResult",
    "SynthSize",
    "draw_synth",
    "expected_auc",
    "history_slots",
    "params_with",
    "signals",
    "synthesize",
]
