"""Models: parameter counts, masking invariance, fast path == per-slot path, golden cases, overfitting."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from qin.batch import LEVEL_SHIFT, Batch, ItemTables
from qin.config import BCEForm, LevelZero, ModelConfig, ModelName, TransformerMask
from qin.model import (
    DIN,
    DINSA,
    DLF,
    QIN,
    QINMLP,
    DCNv2,
    MeanPoolMLP,
    QINNoASTA,
    QINNoPReLU,
    QINPlus,
    QINSoftmax,
    QNNAlpha,
    TransformerDCN,
    Vocab,
    build_model,
)
from qin.model.attention import MeanPooling, SoftmaxTargetAttention, TargetAttention
from qin.model.mlp import Activation
from qin.model.towers import QNNAlphaLayer, QuadraticLayer

VOCAB = Vocab(items=40, tags=12, levels=11)
ALL_MODELS = list(ModelName)
CROSS_MODELS = {ModelName.dcnv2, ModelName.transformer_dcn}  # DCNv2 heads: see test_overfits_one_batch
ATTENTION_MODELS = [ModelName.qin, ModelName.qin_softmax, ModelName.qnn_alpha, ModelName.din,
                    ModelName.din_sa]


def make_items(seed: int = 0, vocab: Vocab = VOCAB, mm_dim: int = 16) -> ItemTables:
    """Item tables like item_info: row 0 is the padding item, items have 1..5 tags (0-padded)."""
    gen = torch.Generator().manual_seed(seed)
    tags = torch.randint(1, vocab.tags, (vocab.items, 5), generator=gen)
    num_tags = torch.randint(1, 6, (vocab.items, 1), generator=gen)
    tags = tags * (torch.arange(5) < num_tags)
    tags[0] = 0
    mm_emb = torch.randn(vocab.items, mm_dim, generator=gen)
    mm_emb[0] = 0.0
    return ItemTables(tags=tags, mm_emb=mm_emb)


def make_batch(seed: int = 0, rows: int = 16, slots: int = 10, vocab: Vocab = VOCAB) -> Batch:
    """Left-padded histories of every length from 0 to `slots`, with repeated items across rows."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.arange(rows) % (slots + 1)  # row 0 has an empty history, row `slots` a full one
    history = torch.randint(1, vocab.items, (rows, slots), generator=gen)
    history = history * (torch.arange(slots) >= slots - lengths.unsqueeze(1))  # padding on the left
    return Batch(
        target_item=torch.randint(1, vocab.items, (rows,), generator=gen),
        history=history,
        likes_level=torch.randint(1, vocab.levels, (rows,), generator=gen),
        views_level=torch.randint(1, vocab.levels, (rows,), generator=gen),
        label=torch.randint(0, 2, (rows,), generator=gen).float(),
    )


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Equal up to float summation order: elementwise within `tolerance` x the tensor's largest entry (plus
    1e-6 for gradients that are zero in exact arithmetic, e.g. a bias followed by BatchNorm)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance * scale + 1e-6)


def tiny_cfg(name: ModelName, **changes) -> ModelConfig:
    base = ModelConfig(name=name, embedding_dim=8, num_layers=2, num_row=2, num_heads=2 if name ==
                       ModelName.qnn_alpha else 1, mlp_hidden=[16, 8], din_attention_hidden=[16, 8],
                       dlf_tokens=4, dlf_rank=3, dlf_hidden=16)
    return base.model_copy(update=changes)


def tiny_model(name: ModelName, seed: int = 0, **changes):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(name, **changes), VOCAB, make_items(seed))


# --- size and structure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_row", "expected"), [(4, 31_244_293), (3, 27_045_893)])
def test_reference_parameter_count(num_row: int, expected: int) -> None:
    vocab = Vocab(91718, 11740, 11)
    tags = torch.zeros(vocab.items, 5, dtype=torch.long)
    items = ItemTables(tags=tags, mm_emb=torch.zeros(vocab.items, 128))
    model = build_model(ModelConfig(num_row=num_row), vocab, items)
    assert sum(p.numel() for p in model.parameters()) == expected
    # Item tables are input data: buffers that move with .to(), never parameters or checkpoint content.
    assert {"embedding.items.tags", "embedding.items.mm_emb"} <= dict(model.named_buffers()).keys()
    assert not {"embedding.items.tags", "embedding.items.mm_emb"} & model.state_dict().keys()


def test_tower_widths_with_reference_dims() -> None:
    items = make_items(mm_dim=128)
    qin = build_model(ModelConfig(), VOCAB, items)
    no_asta = build_model(ModelConfig(name=ModelName.qin_no_asta), VOCAB, items)
    assert qin.tower.layers[0].linear.in_features == 1024
    assert qin.attention.w_q.out_features == 768
    assert no_asta.tower.layers[0].linear.in_features == 640
    din = build_model(ModelConfig(name=ModelName.din, embedding_dim=64), VOCAB, items)
    assert din.dnn.net[0].in_features == 640  # 2 x 64 + 256 + 256, as in the challenge's DIN baseline


def test_build_model_covers_every_name() -> None:
    expected = {ModelName.qin: QIN, ModelName.qin_softmax: QINSoftmax, ModelName.qin_no_asta: QINNoASTA,
                ModelName.qin_mlp: QINMLP, ModelName.qin_no_prelu: QINNoPReLU, ModelName.qnn_alpha: QNNAlpha,
                ModelName.din: DIN, ModelName.mean_pool_mlp: MeanPoolMLP, ModelName.qin_plus: QINPlus,
                ModelName.dcnv2: DCNv2, ModelName.transformer_dcn: TransformerDCN,
                ModelName.din_sa: DINSA, ModelName.dlf: DLF}
    assert set(expected) == set(ModelName)
    batch = make_batch()
    for name, cls in expected.items():
        model = tiny_model(name)
        assert type(model) is cls
        assert model(batch).shape == (batch.size,)
    with pytest.raises(ValueError, match="unknown model name"):
        build_model(tiny_cfg(ModelName.qin).model_copy(update={"name": "qin_typo"}), VOCAB, make_items())


def test_init_follows_fuxictr() -> None:
    model = tiny_model(ModelName.qin)
    table = model.embedding.items.item_id.weight
    assert torch.all(table[0] == 0) and 0.5e-4 < table[1:].std().item() < 1.5e-4
    assert torch.all(model.tower.layers[0].linear.bias == 0)
    assert model.tower.layers[0].activation.weight.item() == pytest.approx(0.25)


def test_item_tables_are_checked() -> None:
    items = make_items()
    with pytest.raises(Exception, match="vocabulary says"):
        build_model(tiny_cfg(ModelName.qin), Vocab(41, 12, 11), items)
    with pytest.raises(Exception, match="tag ids"):
        build_model(tiny_cfg(ModelName.qin), Vocab(40, 5, 11), items)


# --- golden tiny cases -------------------------------------------------------------------------------------


def _set(linear: torch.nn.Linear, weight: list[list[float]]) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight))


def test_asta_hand_computed() -> None:
    attention = TargetAttention(item_dim=2, attention_dim=2)
    _set(attention.w_q, [[1, 0], [0, 1]])
    _set(attention.w_k, [[1, 0], [0, 1]])
    _set(attention.w_v, [[2, 0], [0, 2]])
    _set(attention.w_o, [[1, 1], [0, 2]])
    target = torch.tensor([[1.0, 2.0]])
    history = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, True, False]])
    p, alpha = attention(target, history, mask)
    # scores q.k / sqrt(A): 1/r2, 2/r2, -3/r2, (masked) -> ReLU -> 1/r2, 2/r2, 0, 0
    r2 = math.sqrt(2.0)
    assert alpha[0].tolist() == pytest.approx([1 / r2, 2 / r2, 0.0, 0.0])
    pooled = [2 * 1 / r2, 2 * 2 / r2]  # sum alpha_i W_v h_i
    expected = [pooled[0] + pooled[1] + 1.0, 2 * pooled[1] + 2.0]  # W_o pooled + v_t
    assert p[0].tolist() == pytest.approx(expected)
    # The unique-items entry point on the same numbers (history rows as a table) agrees.
    p_unique, alpha_unique = attention.forward_unique(target, history[0], torch.tensor([[0, 1, 2, 3]]), mask)
    torch.testing.assert_close(p_unique, p)
    torch.testing.assert_close(alpha_unique, alpha)


def test_softmax_asta_hand_computed_and_empty_history() -> None:
    attention = SoftmaxTargetAttention(item_dim=2, attention_dim=2)
    for linear in (attention.w_q, attention.w_k, attention.w_v, attention.w_o):
        _set(linear, [[1, 0], [0, 1]])
    target = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    history = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [5.0, 5.0]]] * 2)
    mask = torch.tensor([[True, True, True, False], [False] * 4])  # row 2: all padding
    p, alpha = attention(target, history, mask)
    r2 = math.sqrt(2.0)
    exps = [math.exp(s / r2) for s in (1.0, 2.0, -3.0)]
    weights = [e / sum(exps) for e in exps]
    assert alpha[0].tolist() == pytest.approx(weights + [0.0])
    assert alpha[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert p[0].tolist() == pytest.approx([weights[0] - weights[2] + 1.0, weights[1] - weights[2] + 2.0])
    assert p[1].tolist() == [3.0, 4.0]  # nothing to attend to: the residual alone
    p.sum().backward()
    assert torch.isfinite(target.grad).all()


def test_mean_pooling_hand_computed_and_target_blind() -> None:
    pooling = MeanPooling()
    history = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [5.0, 5.0]]] * 2)
    mask = torch.tensor([[True, True, True, False], [False] * 4])  # row 2: all padding
    pooled, weights = pooling(torch.zeros(2, 2), history, mask)
    assert weights[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    assert weights[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert pooled[0].tolist() == pytest.approx([0.0, 0.0])  # (1 + 0 - 1) / 3, (0 + 1 - 1) / 3
    assert pooled[1].tolist() == [0.0, 0.0]
    other_target, _ = pooling(torch.randn(2, 2), history, mask)
    torch.testing.assert_close(other_target, pooled)  # the pooled history does not depend on the target
    slots = torch.tensor([[0, 1, 2, 3]] * 2)  # history rows as a table of unique items
    table_pooled, _ = pooling.forward_unique(torch.zeros(2, 2), history[0], slots, mask)
    torch.testing.assert_close(table_pooled, pooled)
    model = tiny_model(ModelName.mean_pool_mlp)
    assert type(model.attention) is MeanPooling and not list(model.attention.parameters())


def test_quadratic_layer_chunks_are_summed() -> None:
    layer = QuadraticLayer(width=2, num_row=2, dropout=0.0, batch_norm=False, activation=Activation.identity)
    with torch.no_grad():
        layer.linear.weight.zero_()
        layer.linear.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # chunks [1, 2] and [3, 4]
    assert layer(torch.tensor([[1.0, 10.0]])).tolist() == [[1 * 4 + 1, 10 * 6 + 10]]


@pytest.mark.parametrize(("num_row", "num_heads", "expected"), [
    # z = [10, 20 | 30, 40] (2 fields of E = 2). H = 2: head 1 = [10, 30], head 2 = [20, 40].
    (1, 2, [10 * 1 + 10, 30 * 2 + 20, 20 * 3 + 30, 40 * 4 + 40]),  # head-major product + field-major z
    (2, 2, [10 * 4 + 10, 30 * 6 + 20, 20 * 12 + 30, 40 * 14 + 40]),  # g rows (H, R, d) summed over R
    (1, 1, [10 * 1 + 10, 20 * 2 + 20, 30 * 3 + 30, 40 * 4 + 40]),  # H = 1: aligned
])
def test_qnn_alpha_head_slicing_quirk(num_row: int, num_heads: int, expected: list[float]) -> None:
    layer = QNNAlphaLayer(width=4, field_dim=2, num_row=num_row, num_heads=num_heads, dropout=0.0,
                          batch_norm=False)
    with torch.no_grad():
        layer.linear.weight.zero_()
        layer.linear.bias.copy_(torch.arange(1.0, 4 * num_row + 1))  # g = ReLU(bias) = 1, 2, 3, ...
    assert layer(torch.tensor([[10.0, 20.0, 30.0, 40.0]])).tolist() == [expected]


# --- invariances and the fast path -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTENTION_MODELS)
@pytest.mark.parametrize("unique_items", [True, False])
def test_padding_content_does_not_matter(name: ModelName, unique_items: bool) -> None:
    model = tiny_model(name, unique_items=unique_items).eval()
    batch = make_batch()
    before = model(batch)
    items = model.embedding.items
    with torch.no_grad():  # put garbage in everything a padded slot reads
        items.mm_emb[0] = torch.randn(items.mm_emb.shape[1]) * 10
        items.tags[0] = torch.tensor([1, 2, 3, 0, 5])
        items.item_id.weight[0] = torch.randn(items.item_id.weight.shape[1])
    torch.testing.assert_close(model(batch), before, rtol=0, atol=0)


def test_padding_content_does_not_matter_in_train_mode() -> None:
    model = tiny_model(ModelName.qin).train()
    batch = make_batch()
    torch.manual_seed(3)
    before = model(batch)
    with torch.no_grad():
        model.embedding.items.mm_emb[0] = 7.0
    torch.manual_seed(3)
    torch.testing.assert_close(model(batch), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_history_order_does_not_matter(name: ModelName) -> None:
    """No positions: permuting slots (padding included) only reorders the sums."""
    model = tiny_model(name).eval()
    batch = make_batch()
    shuffled = torch.stack([row[torch.randperm(row.numel())] for row in batch.history])
    permuted = dataclasses.replace(batch, history=shuffled)
    torch.testing.assert_close(model(permuted), model(batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_fast_path_equals_per_slot_path(name: ModelName) -> None:
    # DIN's fast path draws attention-dropout masks for the real slots only (another random stream), so
    # the train-mode comparison runs it without that dropout; eval mode below has none anyway.
    changes = {"din_attention_dropout": 0.0} if name in (ModelName.din, ModelName.din_sa) else {}
    fast = tiny_model(name, unique_items=True, **changes)
    slow = build_model(tiny_cfg(name, unique_items=False, **changes), VOCAB, make_items(0))
    slow.load_state_dict(fast.state_dict())
    batch = make_batch()
    logits = []
    for model in (fast, slow):  # train mode: BN batch statistics and dropout (same seed) included
        model.train()
        torch.manual_seed(7)
        loss, model_logits = model.loss(batch)
        (loss + 1e-2 * model.embedding_l2(None)).backward()
        logits.append(model_logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    slow_grads = dict(slow.named_parameters())
    # DLF's LayerNorms over 8-64 tokens pass the paths' different summation orders on to a few gradient
    # entries at ~2e-5 of the largest (seen: 2.3e-6 against 0.11); every other model stays within 1e-5.
    tolerance = 5e-5 if name is ModelName.dlf else 1e-5
    for key, param in fast.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), key
        assert_grads_close(param.grad, slow_grads[key].grad, tolerance)
    fast.eval(), slow.eval()
    torch.testing.assert_close(fast(batch), slow(batch), rtol=1e-5, atol=1e-5)
    weights = fast.attention_weights(batch)
    if weights is not None:
        torch.testing.assert_close(weights, slow.attention_weights(batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", [Activation.relu, Activation.dice])
def test_din_fast_path_with_each_attention_activation(activation: Activation) -> None:
    """ReLU: only real slots are scored. Dice: its batch statistics span every slot, so all are scored."""
    models = []
    for unique_items in (True, False):
        torch.manual_seed(0)
        models.append(DIN(tiny_cfg(ModelName.din, unique_items=unique_items), VOCAB, make_items(0),
                          attention_activation=activation))
    fast, slow = models
    assert fast.attention.real_slots_exact == (activation == Activation.relu)
    batch = make_batch()
    for mode in ("eval", "train"):  # eval first: a train pass moves BN running statistics
        torch.manual_seed(5)
        first = getattr(fast, mode)()(batch)
        torch.manual_seed(5)
        second = getattr(slow, mode)()(batch)
        if mode == "eval" or activation == Activation.dice:  # same random stream only when all slots run
            torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-5)
    fast.eval(), slow.eval()
    torch.testing.assert_close(fast.attention_weights(batch), slow.attention_weights(batch),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_attention_weights(name: ModelName) -> None:
    model = tiny_model(name).eval()
    batch = make_batch()
    weights = model.attention_weights(batch)
    if name in (ModelName.qin_no_asta, ModelName.transformer_dcn):  # no target-attention weights to show
        assert weights is None
        return
    assert weights.shape == batch.history.shape
    assert torch.all(weights[batch.history == 0] == 0)
    if name not in (ModelName.din, ModelName.din_sa):  # ASTA weights are >= 0; DIN's MLP scores may not be
        assert torch.all(weights >= 0)


# --- determinism, losses, regularisation -------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_determinism(name: ModelName) -> None:
    model = tiny_model(name)
    batch = make_batch()
    model.eval()
    assert torch.equal(model(batch), model(batch))
    model.train()
    torch.manual_seed(11)
    first = model(batch)
    torch.manual_seed(11)
    assert torch.equal(model(batch), first)


@pytest.mark.parametrize("form", list(BCEForm))
def test_qnn_alpha_self_ensemble_loss_matches_formula(form: BCEForm) -> None:
    model = tiny_model(ModelName.qnn_alpha, net_dropout=0.3, bce=form).train()
    batch = make_batch()
    torch.manual_seed(5)
    loss, logits = model.loss(batch)
    loss.backward()
    grads = {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    torch.manual_seed(5)  # same dropout masks: encode() draws no random numbers, then tower, tower
    z, _ = model.encode(batch)
    p1 = torch.sigmoid(model.tower(z).squeeze(-1))
    p2 = torch.sigmoid(model.tower(z).squeeze(-1))
    assert not torch.allclose(p1, p2)  # two different dropout sub-networks
    p_bar = (p1 + p2) / 2
    expected = (F.binary_cross_entropy(p_bar, batch.label) + F.binary_cross_entropy(p1, p_bar.detach())
                + F.binary_cross_entropy(p2, p_bar.detach()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.sigmoid(logits), p_bar, rtol=1e-5, atol=1e-6)
    expected.backward()
    # 1e-4, not the default 1e-5: the two soft-target terms' gradients nearly cancel, in float32
    for key, param in model.named_parameters():
        if key in grads:
            assert_grads_close(grads[key], param.grad, tolerance=1e-4)

    model.eval()  # inference: one pass, plain BCE
    loss, logits = model.loss(batch)
    torch.testing.assert_close(logits, model(batch))
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, batch.label))


@pytest.mark.parametrize("form", list(BCEForm))
def test_loss_forms_agree_away_from_saturation(form: BCEForm) -> None:
    model = tiny_model(ModelName.qin, bce=form).eval()
    batch = make_batch()
    loss, logits = model.loss(batch)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(model(batch), batch.label))
    with pytest.raises(ValueError, match="labels"):
        model.loss(dataclasses.replace(batch, label=None))


@pytest.mark.parametrize("name", [ModelName.qin, ModelName.din, ModelName.qnn_alpha])
def test_reference_bce_gives_saturated_rows_no_gradient(name: ModelName) -> None:
    """A constructed saturated batch: every logit is about +40, half the labels are 0. The reference form
    (sigmoid, then BCE with logs clamped at -100) charges each wrong row 100 and sends it no gradient;
    BCE-with-logits charges about 40 and pushes the logits down."""
    batch = dataclasses.replace(make_batch(rows=16), label=(torch.arange(16) % 2).float())
    results = {}
    for form in BCEForm:
        model = tiny_model(name, bce=form).train()
        output = model.tower.output if name != ModelName.din else model.dnn.net[-1]
        with torch.no_grad():
            output.bias.fill_(40.0)
        torch.manual_seed(3)
        loss, logits = model.loss(batch)
        assert logits.min() > 20  # saturated: float32 sigmoid is exactly 1
        loss.backward()
        results[form] = (loss.item(), output.bias.grad.item())
    reference_loss, reference_grad = results[BCEForm.probabilities]
    stable_loss, stable_grad = results[BCEForm.logits]
    # Half the rows at the clamp (100); the SE loss's two distillation terms are 0 (p1 = p2 = pbar = 1).
    assert reference_loss == pytest.approx(50.0, rel=1e-4)
    assert reference_grad == 0.0
    assert 10 < stable_loss < 0.6 * reference_loss and stable_grad > 0.1


@pytest.mark.parametrize("level_zero", list(LevelZero))
def test_level_zero_reads_the_padding_row_in_the_reference(level_zero: LevelZero) -> None:
    """Encoded level LEVEL_SHIFT is raw level 0: the reference reads the zero padding row, never trained."""
    model = tiny_model(ModelName.qin, level_zero=level_zero).train()
    batch = dataclasses.replace(make_batch(), likes_level=torch.full((16,), LEVEL_SHIFT),
                                views_level=torch.full((16,), LEVEL_SHIFT + 3))
    fields = model.embedding.fields(batch)  # (B, 2 d_e): likes first
    likes_part, views_part = fields[:, :8], fields[:, 8:]
    assert views_part.abs().sum() > 0
    model.loss(batch)[0].backward()
    likes_grad = model.embedding.likes.weight.grad
    if level_zero is LevelZero.padding:
        assert likes_part.abs().sum() == 0
        assert likes_grad.abs().sum() == 0  # neither row 0 nor row LEVEL_SHIFT learns anything
    else:
        torch.testing.assert_close(likes_part, model.embedding.likes.weight[LEVEL_SHIFT].expand(16, -1))
        assert likes_grad[LEVEL_SHIFT].abs().sum() > 0 and likes_grad[0].abs().sum() == 0


@pytest.mark.parametrize("name", [ModelName.qin, ModelName.din])
def test_embedding_l2(name: ModelName) -> None:
    model = tiny_model(name)
    params = model.embedding_parameters()
    assert len(params) == 5 and any(p is model.embedding.items.mm_proj.weight for p in params)  # W_mm
    full = model.embedding_l2(None)
    torch.testing.assert_close(full, sum(p.pow(2).sum() for p in params))
    batch = make_batch()
    items = model.embedding.items
    item_ids = torch.cat([batch.target_item, batch.history.flatten()]).unique()
    tag_ids = items.tags[item_ids].unique()
    expected = (model.embedding.likes.weight[batch.likes_level.unique()].pow(2).sum()
                + model.embedding.views.weight[batch.views_level.unique()].pow(2).sum()
                + items.item_id.weight[item_ids].pow(2).sum() + items.item_tags.weight[tag_ids].pow(2).sum()
                + items.mm_proj.weight.pow(2).sum())
    torch.testing.assert_close(model.embedding_l2(batch), expected)
    assert model.embedding_l2(batch) <= full


@pytest.mark.parametrize("name", ALL_MODELS)
def test_bf16_autocast_runs(name: ModelName) -> None:
    """CPU autocast stands in for CUDA autocast here: no dtype assumption may break under bf16."""
    model = tiny_model(name).train()
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = model.loss(batch)
    assert loss.dtype == torch.float32 and logits.shape == (batch.size,)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                        if p.grad is not None)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_overfits_one_batch(name: ModelName) -> None:
    # A cross network is a degree-(layers + 1) polynomial of its unnormalised input: at lr 1e-2 on 32 rows it
    # fits in ~20 steps, then overshoots to logits of ~1e4; the reference's clamped BCE gives such saturated
    # rows no gradient, so they never come back. Their configs use the stable BCE (configs/dcnv2.yaml).
    bce = BCEForm.logits if name in CROSS_MODELS else BCEForm.probabilities
    model = tiny_model(name, net_dropout=0.0, din_attention_dropout=0.0, bce=bce).train()
    batch = make_batch(rows=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss, _ = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = F.binary_cross_entropy_with_logits(model(batch), batch.label).item()
    assert final < 0.05, final


def test_history_similarity_by_hand() -> None:
    """qin_plus's parameter-free block on a constructed case: unit vectors on axes, known tags."""
    from qin.model.qin_plus import HistorySimilarity, unit_norm_items

    mm = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [5.0, 0.0]])  # row 0 = padding
    tags = torch.tensor([[0, 0], [1, 2], [3, 0], [2, 0], [4, 0]])
    block = HistorySimilarity(unit_norm_items(ItemTables(tags=tags, mm_emb=mm)))
    target = torch.tensor([4, 1])
    history = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]])  # row 1: empty history
    out = block(target, history)  # (2, S)
    r = 1 / math.sqrt(2)
    # target 4 = (1, 0); history 1 = (1, 0), 2 = (0, 1), 3 = (r, r); cosines 1, 0, r
    mean_direction = torch.tensor([1 + r, 1 + r]) / torch.tensor([1 + r, 1 + r]).norm()
    expected = torch.tensor([1.0, (1 + r) / 3, (1 + r) / 3, r, float(mean_direction[0]),
                             0.0,  # target 4's tag 4 is nowhere in the history
                             0.0, 0.0, math.log(4.0)])
    torch.testing.assert_close(out[0], expected)
    assert torch.equal(out[1], torch.zeros(9))  # empty history: all zeros
    # target 1 (tags 1, 2) against a history holding item 3 (tag 2) and item 1 itself (a repeat)
    out = block(torch.tensor([1]), torch.tensor([[0, 0, 3, 1]]))[0]
    assert out[5] == 1.0  # both target tags are among the history's tags
    assert out[6] == 1.0  # both history items share a tag with the target
    assert out[7] == 1.0  # the target is in the history


# --- the model zoo: dcnv2, transformer_dcn, din_sa, dlf -------------------------------------------------


def tiny_embedding_count(d_e: int, d_m: int, mm_dim: int = 16) -> int:
    """likes + views + item id + tags tables, and W_mm (M x d_m), for VOCAB."""
    return 2 * VOCAB.levels * d_e + VOCAB.items * d_e + VOCAB.tags * d_e + mm_dim * d_m


def mlp_count(width: int, hidden: list[int], batch_norm: bool = True) -> int:
    """Linear (+ BN scale and shift) per hidden width; no output layer."""
    total = 0
    for width_in, width_out in zip([width, *hidden[:-1]], hidden, strict=True):
        total += width_in * width_out + width_out + (2 * width_out if batch_norm else 0)
    return total


def test_dcnv2_parameter_count_by_hand() -> None:
    d_e = 8
    d_i = 3 * d_e  # 24
    asta = 4 * d_i * (2 * d_i)  # W_q, W_k, W_v (d_i x A) and W_o (A x d_i), no biases
    width = 2 * d_e + 2 * d_i  # D = 64
    cross = 3 * (width * width + width)  # cross_layers = 3 full-rank W_l and b_l
    dnn = mlp_count(width, [16, 8])
    output = width + 8 + 1
    model = tiny_model(ModelName.dcnv2)
    assert type(model.tower).__name__ == "DCNv2Tower" and len(model.tower.block.cross.layers) == 3
    assert sum(p.numel() for p in model.parameters()) == (
        tiny_embedding_count(d_e, d_e) + asta + cross + dnn + output)  # 19,105


def test_dcnv2_reference_parameter_count() -> None:
    """QIN's 31,244,293 minus its quadratic tower (4 x (1024 x 4096 + 4096 + 2 x 1024 + 1) + 1025), plus the
    DCNv2 tower at D = 1024: 3 x (1024^2 + 1024) + DNN [1024, 512, 256] with BN + Linear(1280, 1)."""
    vocab = Vocab(91718, 11740, 11)
    tags = torch.zeros(vocab.items, 5, dtype=torch.long)
    items = ItemTables(tags=tags, mm_emb=torch.zeros(vocab.items, 128))
    model = build_model(ModelConfig(name=ModelName.dcnv2), vocab, items)
    quadratic = 4 * (1024 * 4096 + 4096 + 2 * 1024 + 1) + 1025
    tower = 3 * (1024 * 1024 + 1024) + mlp_count(1024, [1024, 512, 256]) + 1024 + 256 + 1
    assert sum(p.numel() for p in model.parameters()) == 31_244_293 - quadratic + tower == 19_300_865


def test_cross_network_v2_by_hand() -> None:
    from qin.model.dcnv2 import CrossNetV2

    cross = CrossNetV2(width=2, num_layers=2)
    for linear in cross.layers:
        _set(linear, [[1, 0], [0, 2]])
        torch.nn.init.constant_(linear.bias, 1.0)
    x0 = torch.tensor([[1.0, 3.0]])
    x1 = x0 * (torch.tensor([[1.0, 6.0]]) + 1) + x0  # [3, 24]
    x2 = x0 * (torch.tensor([[3.0, 48.0]]) + 1) + x1  # [7, 171]
    assert cross(x0).tolist() == x2.tolist() == [[7.0, 171.0]]


def test_low_rank_cross_is_the_full_cross_with_w_equal_u_v_transposed() -> None:
    from qin.model.dcnv2 import CrossNetV2

    torch.manual_seed(0)
    low = CrossNetV2(width=6, num_layers=2, rank=2)
    full = CrossNetV2(width=6, num_layers=2)
    for factored, linear in zip(low.layers, full.layers, strict=True):
        down, up = factored  # V^T (r x D, no bias), U (D x r) and b
        with torch.no_grad():
            linear.weight.copy_(up.weight @ down.weight)  # W = U V^T
            linear.bias.copy_(up.bias)
    x0 = torch.randn(4, 6)
    torch.testing.assert_close(low(x0), full(x0))
    assert sum(p.numel() for p in low.parameters()) == 2 * (2 * 6 * 2 + 6)  # 2 D r + D per layer


def test_dcnv2_low_rank_parameter_count_by_hand() -> None:
    d_e, rank = 8, 4
    width = 2 * d_e + 2 * (3 * d_e)  # D = 64
    full = sum(p.numel() for p in tiny_model(ModelName.dcnv2).parameters())
    low = sum(p.numel() for p in tiny_model(ModelName.dcnv2, cross_rank=rank).parameters())
    assert full - low == 3 * (width * width - 2 * width * rank)  # only the cross weights change


@pytest.mark.parametrize(("name", "changes"), [
    (ModelName.dcnv2, {}),
    (ModelName.transformer_dcn, {}),
    (ModelName.transformer_dcn, {"transformer_mask": TransformerMask.as_published}),
    (ModelName.transformer_dcn, {"cross_rank": 4}),
    (ModelName.din_sa, {}),
    (ModelName.dlf, {}),
    (ModelName.dlf, {"dlf_layers": 1, "dlf_tokens": 2}),  # one layer, 8 tokens in and out: no token maps
])
def test_zoo_output_shape_and_finite_gradients(name: ModelName, changes: dict) -> None:
    model = tiny_model(name, **changes).train()
    batch = make_batch()
    loss, logits = model.loss(batch)
    loss.backward()
    assert logits.shape == (batch.size,) and torch.isfinite(logits).all()
    for key, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), key


def transformer_layer_count(width: int, ffn: int) -> int:
    """torch's TransformerEncoderLayer: in_proj (3 W x W + 3 W), out_proj, FFN W -> F -> W, two LayerNorms."""
    return 3 * width * width + 3 * width + width * width + width + width * ffn + ffn + ffn * width + width \
        + 4 * width


def test_transformer_dcn_parameter_count_by_hand() -> None:
    d_e, k = 8, 16
    d_i = 3 * d_e  # 24: QIN's item encoder
    width = 2 * d_i  # 48: history item ‖ target
    encoder = 2 * transformer_layer_count(width, 256)  # 2 layers, FFN 256
    head_width = 2 * d_e + d_i + k * width + width  # X = 16 + 24 + 768 + 48 = 856
    cross = 3 * (head_width * head_width + head_width)
    dnn = mlp_count(head_width, [16, 8])
    top = mlp_count(head_width + 8, [64, 32]) + 32 + 1
    model = tiny_model(ModelName.transformer_dcn)
    assert sum(p.numel() for p in model.parameters()) == (
        tiny_embedding_count(d_e, d_e) + encoder + cross + dnn + top)


def test_transformer_dcn_reference_parameter_count() -> None:
    """configs/transformer_dcn.yaml's sizes (d_e = 64, so d_i = 192, W = 384, X = 6,848) on MicroLens."""
    vocab = Vocab(91718, 11740, 11)
    tags = torch.zeros(vocab.items, 5, dtype=torch.long)
    items = ItemTables(tags=tags, mm_emb=torch.zeros(vocab.items, 128))
    model = build_model(ModelConfig(name=ModelName.transformer_dcn, embedding_dim=64), vocab, items)
    d_e, width, head_width = 64, 384, 128 + 192 + 16 * 384 + 384
    embedding = 2 * 11 * d_e + 91718 * d_e + 11740 * d_e + 128 * d_e
    expected = (embedding + 2 * transformer_layer_count(width, 256) + 3 * (head_width ** 2 + head_width)
                + mlp_count(head_width, [1024, 512, 256]) + mlp_count(head_width + 256, [64, 32]) + 33)
    assert sum(p.numel() for p in model.parameters()) == expected == 157_047_169


@pytest.mark.parametrize("unique_items", [True, False])
def test_transformer_dcn_masks(unique_items: bool) -> None:
    """correct: padding content changes nothing. as_published: real slots attend to padding only, so the
    padding content changes the logits, and no row (empty or full history) gives NaN."""
    batch = make_batch()  # rows with empty, partial and full (10 of 10) histories
    for mask in TransformerMask:
        model = tiny_model(ModelName.transformer_dcn, unique_items=unique_items, transformer_mask=mask).eval()
        before = model(batch)
        assert torch.isfinite(before).all()
        with torch.no_grad():
            model.embedding.items.mm_emb[0] = torch.randn(model.embedding.items.mm_emb.shape[1]) * 10
        after = model(batch)
        if mask is TransformerMask.correct:
            torch.testing.assert_close(after, before, rtol=0, atol=0)
        else:
            partial = (batch.history != 0).any(dim=-1) & (batch.history == 0).any(dim=-1)
            assert not torch.allclose(after[partial], before[partial])


def test_transformer_dcn_readout() -> None:
    """Padded slots and an empty history read out as zeros; a history shorter than k is left-padded."""
    model = tiny_model(ModelName.transformer_dcn).eval()
    batch = make_batch()
    x = model.encode(batch)  # (B, X)
    width, k = 48, 16
    recent = x[:, 16 + 24: 16 + 24 + k * width].view(batch.size, k, width)
    pooled = x[:, -width:]
    assert torch.all(recent[:, : k - 10] == 0)  # 10 slots < k = 16: six zero slots on the left
    assert torch.all(recent[:, k - 10:][batch.history == 0] == 0)  # padded slots
    empty = (batch.history == 0).all(dim=-1)  # rows 0 and 11
    assert torch.all(pooled[empty] == 0) and pooled[~empty].abs().sum(dim=-1).min() > 0


def test_din_sa_parameter_count_by_hand() -> None:
    """configs/din_sa.yaml on MicroLens: DIN's 8,611,842 + one encoder layer at d_i = 256 (527,104) + the
    context gate (1)."""
    assert transformer_layer_count(256, 512) == 527_104
    d_e, mm = 8, 16
    d_i = 2 * d_e + mm  # 32: DIN's item vector keeps the multimodal width
    attention = mlp_count(4 * d_i, [16, 8], batch_norm=False) + 8 + 1  # DIN's scorer, no BN
    dnn = mlp_count(2 * d_e + 2 * d_i, [16, 8]) + 8 + 1
    encoder = transformer_layer_count(d_i, 2 * d_i) + 1  # 1 layer, FFN 2 d_i; the gate
    model = tiny_model(ModelName.din_sa)
    expected = tiny_embedding_count(d_e, mm) + attention + dnn + encoder  # 13,091
    assert sum(p.numel() for p in model.parameters()) == expected
    din = tiny_model(ModelName.din)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in din.parameters()) == encoder


def test_din_sa_self_attention_changes_what_din_sees() -> None:
    """Self-attention mixes the slots of a row: changing one history item changes its neighbour's context
    vector, and no other row's; padded slots read out as zeros."""
    model = tiny_model(ModelName.din_sa).eval()
    batch = make_batch()
    target, history = model.embedding.items.encode_slots(batch.target_item, batch.history)
    context, keep = model.self_attention(history, batch.history != 0)
    assert context.shape == history.shape and torch.all(context[~keep] == 0)
    other = history.clone()
    other[2, -1] += 1.0  # change one real slot of row 2 (length 2)
    changed, _ = model.self_attention(other, batch.history != 0)
    assert not torch.allclose(changed[2, -2], context[2, -2])  # its neighbour in row 2 sees the change
    torch.testing.assert_close(changed[3:], context[3:])  # other rows do not


def test_din_sa_starts_as_din_and_its_gate_learns() -> None:
    """The context gate starts at 0: DIN-SA's scores equal DIN's with the same weights; the gate gets a
    gradient, so training can open it."""
    din_sa, din = tiny_model(ModelName.din_sa).eval(), tiny_model(ModelName.din).eval()
    shared = {key: value for key, value in din_sa.state_dict().items() if key in din.state_dict()}
    din.load_state_dict(shared)
    batch = make_batch()
    torch.testing.assert_close(din_sa(batch), din(batch))
    din_sa.train()
    din_sa.loss(batch)[0].backward()
    assert din_sa.context_gate.grad is not None and din_sa.context_gate.grad.abs() > 0
    with torch.no_grad():
        din_sa.context_gate.fill_(0.5)
    assert not torch.allclose(din_sa.eval()(batch), din(batch))


def dlf_mlp_count(width: int, hidden: int, out: int) -> int:
    """DLF's MLP: Linear(width, h) + BN + Linear(h, out)."""
    return width * hidden + hidden + 2 * hidden + hidden * out + out


def dlf_layer_count(input_tokens: int, tokens_in: int, d: int, t: int, r: int, h: int) -> int:
    """One DLF layer as qin/model/dlf.py's docstring counts it: token maps, two FM blocks, attention, norm."""
    input_map = input_tokens * tokens_in if input_tokens != tokens_in else 0
    linear = tokens_in * t
    fm = tokens_in * r + 2 * tokens_in * r + dlf_mlp_count(tokens_in * r, h, t * d)  # W, LayerNorm, MLP
    attention = 3 * d * d + 2 * tokens_in * d + dlf_mlp_count(tokens_in * d, h, t * d)
    residual = tokens_in * 4 * t if tokens_in != 4 * t else 0
    return input_map + linear + 2 * fm + attention + residual + 2 * d


def test_dlf_parameter_count_by_hand() -> None:
    d_e, t, r, h = 8, 4, 3, 16
    d_i = 3 * d_e
    asta = 4 * d_i * (2 * d_i)
    tokens = (2 * d_e + 2 * d_i) // d_e  # F = 8: likes, views, v_t's three parts, ASTA's three parts
    layers = (dlf_layer_count(tokens, tokens, d_e, t, r, h)  # 8 -> 16 tokens: a residual map
              + 2 * dlf_layer_count(tokens, 4 * t, d_e, t, r, h))  # 16 -> 16: an input map for x0
    head = dlf_mlp_count(4 * t * d_e, h, 1)
    model = tiny_model(ModelName.dlf)
    assert type(model.tower).__name__ == "DLFTower" and len(model.tower.layers) == 3
    assert model.tower.layers[0].input_map is None and model.tower.layers[0].residual is not None
    assert model.tower.layers[1].input_map is not None and model.tower.layers[1].residual is None
    assert sum(p.numel() for p in model.parameters()) == tiny_embedding_count(d_e, d_e) + asta + layers + head


def test_dlf_reference_parameter_count() -> None:
    """configs/dlf.yaml's sizes on MicroLens: QIN's encoder at d_e = 128 (D = 1024, F = 8 tokens of 128), 3
    layers of 64 tokens, rank 24, MLPs of 512, and the head."""
    vocab = Vocab(91718, 11740, 11)
    tags = torch.zeros(vocab.items, 5, dtype=torch.long)
    items = ItemTables(tags=tags, mm_emb=torch.zeros(vocab.items, 128))
    model = build_model(ModelConfig(name=ModelName.dlf), vocab, items)
    quadratic = 4 * (1024 * 4096 + 4096 + 2 * 1024 + 1) + 1025  # QIN's tower, as in the dcnv2 count
    tower = (dlf_layer_count(8, 8, 128, 16, 24, 512) + 2 * dlf_layer_count(8, 64, 128, 16, 24, 512)
             + dlf_mlp_count(64 * 128, 512, 1))
    assert sum(p.numel() for p in model.parameters()) == 31_244_293 - quadratic + tower == 40_568_833


def test_dlf_factorization_block_by_hand() -> None:
    """x P with P = x^T W: entry (n, j) is sum_d y[n, d] sum_m x[m, d] W[m, j] (LayerNorm and MLP removed)."""
    from qin.model.dlf import FactorizationBlock

    block = FactorizationBlock(tokens_in=3, tokens_out=3, width=2, rank=2, hidden=4, dropout=0.0,
                               batch_norm=False)
    block.norm, block.mlp = torch.nn.Identity(), torch.nn.Identity()  # type: ignore[assignment]
    torch.manual_seed(0)
    x, y = torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    weight = block.weight.detach()
    expected = torch.stack([torch.stack([sum(y[0, n, d] * sum(x[0, m, d] * weight[m, j] for m in range(3))
                                             for d in range(2)) for j in range(2)]) for n in range(3)])
    torch.testing.assert_close(block(x, y).reshape(3, 2), expected)


def test_dlf_every_layer_sees_the_input_tokens() -> None:
    """RLI: a deeper layer's output depends on x0 itself, not only through the previous layer."""
    model = tiny_model(ModelName.dlf).eval()
    layer = model.tower.layers[1]
    x = torch.randn(2, 16, 8)
    x0 = torch.randn(2, 8, 8)
    assert not torch.allclose(layer(x, x0), layer(x, x0 + 1.0))
    with pytest.raises(ValueError, match="dlf_heads"):
        ModelConfig(name=ModelName.dlf, embedding_dim=9)
