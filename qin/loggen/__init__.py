"""Log-like data generator: a second, independent process in the challenge's layout, built like real logs.

`qin synth` (qin.synth) has one latent process; models tuned only on it can overfit its quirks. This
package draws from a different process, shaped after how recommendation logs behave. Notation: N items
(ids 1..N, 0 = padding), G genres, C hidden series, U users, d taste dimensions, S stored history length.

The process in one paragraph: items have a genre, a unit taste latent v (d) near the genre centre, a
Zipf popularity over a random order, a hidden quality q (weakly tied to popularity), a per-item bias only an
id embedding can learn, and a hidden *series* (same show or creator, Zipf sizes, drawn independently of
genre and taste, so content and tags cannot reveal it). A share of items is *cold*: released after the
train period, they appear only as valid/test targets. item_emb_d128 is a weak noisy linear view of v plus
large nuisance directions, rotated and scaled like PCA output; tags come partly from the genre's pool;
views/likes levels are deciles of popularity (and quality) with noise. A user's interest starts near a
genre centre and follows a random walk, one step per history item; each history item is drawn by
popularity and the interest *at its time* (or continues the previous item's series), so older items tell
less about today. Histories are short (1 + negative binomial: median ~4, many 1-2, long tail to S). At
the current step each user gets ~4 candidates (popular, interest-matched, next episode of a watched series,
or new), and y ~ Bernoulli(p), p = eps/2 + (1-eps) sigmoid(f + b0) with

    f = w_match <u_now, v_t> + w_series log(1 + #history items in t's series) + w_quality q_t + bias_t
        + w_pop z(log pop_t) + bias_user,

b0 bisected so that mean p = target_rate. `generate_logs` writes the same files as `qin synth` (without
images and item_feature.parquet)::

    out_dir/MicroLens_1M_x1/{train,valid,test}.parquet, item_info.parquet
    out_dir/hidden/{valid_truth,test_truth}.parquet, meta.json   (never read by the solution)

Modules: params.py (LogSize, LogParams, streams), items.py (item truth, content vectors, samplers),
timelines.py (interest walks and histories), rows.py (candidates, logit, intercept), write.py (parquet,
safe install), generate.py (the stages, in order).
"""

from qin.loggen.generate import LogDraw, draw_logs, generate_logs
from qin.loggen.params import DEFAULT_LOG_PARAMS, LOG_SIZES, LogParams, LogSize, LogSizeSpec, log_params_with

__all__ = ["DEFAULT_LOG_PARAMS", "LOG_SIZES", "LogDraw", "LogParams", "LogSize", "LogSizeSpec", "draw_logs",
           "generate_logs", "log_params_with"]
