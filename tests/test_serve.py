"""One online request (qin.serve): the fast path gives the plain path's probabilities, falls back where it
must, and builds its tables once."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qin import serve
from qin.batch import LEVEL_SHIFT, Batch
from qin.config import ModelConfig, ModelName
from qin.model import build_model
from qin.predict import LoadedRun, one_request
from tests.test_model import VOCAB, make_items, tiny_model

SUPPORTED = [ModelName.qin, ModelName.qin_softmax, ModelName.qin_mlp, ModelName.qin_no_prelu,
             ModelName.qnn_alpha, ModelName.dcnv2, ModelName.dlf]
UNSUPPORTED = [name for name in ModelName if name not in SUPPORTED]
FOLDED = {ModelName.qin, ModelName.qin_softmax, ModelName.qin_no_prelu}  # QIN's own quadratic tower
SLOTS = 10
CPU = torch.device("cpu")
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def scramble(model: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Every parameter (padding rows included) and BatchNorm statistic random, then eval mode.

    At init the embeddings are ~1e-4 and BatchNorm is the identity, so the history barely moves a score and
    a wrong attention or a skipped BatchNorm could pass; here both matter (checked by the tests).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            std = gain / math.sqrt(parameter.shape[-1]) if parameter.dim() >= 2 else 0.3
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * std)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.3)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=gen) * 1.5 + 0.5)
    return model.eval()


def served(name: ModelName, seed: int = 0, **changes) -> torch.nn.Module:
    return scramble(tiny_model(name, seed, **changes), seed)


def reference(model: torch.nn.Module, history: np.ndarray, candidates: np.ndarray, likes: np.ndarray,
              views: np.ndarray) -> np.ndarray:
    """The model itself on a (C, L) batch holding C copies of the history: what one_request must return."""
    count = len(candidates)
    batch = Batch(target_item=torch.as_tensor(candidates),
                  history=torch.as_tensor(history).view(1, -1).repeat(count, 1),
                  likes_level=torch.as_tensor(likes), views_level=torch.as_tensor(views))
    with torch.no_grad():
        return torch.sigmoid(model(batch)).numpy()


def requests(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(history (L,), candidates (C,), likes (C,), views (C,)) per case; levels include raw level 0."""
    rng = np.random.default_rng(seed)
    real = rng.integers(1, VOCAB.items, SLOTS)

    def request(history: list[int] | np.ndarray, candidates: list[int] | np.ndarray):
        count = len(candidates)
        likes = rng.integers(LEVEL_SHIFT, VOCAB.levels, count)
        views = rng.integers(LEVEL_SHIFT, VOCAB.levels, count)
        likes[0] = views[-1] = LEVEL_SHIFT  # raw level 0: the padding row under level_zero=padding
        return (np.asarray(history, dtype=np.int64), np.asarray(candidates, dtype=np.int64), likes, views)

    candidates = rng.integers(1, VOCAB.items, 12)
    return {
        "empty_history": request(np.zeros(SLOTS), candidates),
        "short_history": request([0] * 7 + list(real[:3]), candidates),
        "full_history": request(real, candidates),
        "padding_inside": request([0, real[0], 0, 0, real[1], 0, real[2], real[3], 0, real[4]], candidates),
        "repeated_items": request([0, 0, 5, 5, 7, 5, 7, 7, 9, 5], [5, 5, 3, 3, 3, 7, 11, 11]),
        "candidates_in_history": request(real, np.concatenate([real, real[::-1], candidates[:3]])),
        "one_candidate": request(real, candidates[:1]),
    }


@pytest.fixture
def no_plain_path(monkeypatch):
    """Fail if the plain path is taken: the fast path must score these by itself."""
    def refuse(*args, **kwargs):
        raise AssertionError("the plain path was used")

    monkeypatch.setattr(serve, "plain_request", refuse)


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """One entry per ModelServer built."""
    built: list[int] = []

    class CountingServer(serve.ModelServer):
        def __init__(self, model) -> None:
            built.append(1)
            super().__init__(model)

    monkeypatch.setattr(serve, "ModelServer", CountingServer)
    return built


def test_support_rule_covers_every_model() -> None:
    for name in ModelName:
        model = tiny_model(name).eval()
        reason = serve.unsupported_reason(model)
        assert (reason is None) == (name in SUPPORTED), (name, reason)
        assert serve.supports(model) == (name in SUPPORTED)
        assert (serve.server_for(model) is not None) == (name in SUPPORTED)


@pytest.mark.parametrize("name", SUPPORTED)
def test_fast_path_equals_plain_path(name: ModelName, no_plain_path) -> None:
    model = served(name)
    server = serve.server_for(model)
    assert server is not None
    assert (server.folded is not None) == (name in FOLDED)
    scored = {}
    for case, request in requests().items():
        expected = reference(model, *request)
        actual = serve.score_request(model, CPU, *request)
        assert actual.dtype == np.float32 and actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, **TOLERANCE, err_msg=f"{name.value}: {case}")
        scored[case] = expected
    # The cases are only a test if the history moves the scores well beyond the tolerance, and the
    # scores are not saturated.
    assert np.abs(scored["full_history"] - scored["empty_history"]).max() > 1e-3
    assert np.abs(scored["short_history"] - scored["full_history"]).max() > 1e-3
    every = np.concatenate(list(scored.values()))
    assert ((every > 0.02) & (every < 0.98)).mean() > 0.5


@pytest.mark.parametrize("changes", [{"batch_norm": False}, {"unique_items": False}, {"net_dropout": 0.0},
                                     {"level_zero": "embedded"}, {"num_row": 3, "num_layers": 1}])
def test_fast_path_equals_plain_path_in_other_configurations(changes: dict, no_plain_path) -> None:
    model = served(ModelName.qin, seed=1, **changes)
    for case, request in requests(seed=1).items():
        np.testing.assert_allclose(serve.score_request(model, CPU, *request), reference(model, *request),
                                   **TOLERANCE, err_msg=f"{changes}: {case}")


def test_reference_configuration(no_plain_path) -> None:
    """qin.yaml's dimensions (d_e 128, D 1024, R 4, 4 layers, BatchNorm, dropout 0.1): 1 x 100 candidates."""
    torch.manual_seed(0)
    model = scramble(build_model(ModelConfig(), VOCAB, make_items(mm_dim=128)), gain=0.8)
    rng = np.random.default_rng(0)
    history = np.zeros(64, dtype=np.int64)
    history[-20:] = rng.integers(1, VOCAB.items, 20)
    candidates = rng.integers(1, VOCAB.items, 100)
    likes, views = rng.integers(1, VOCAB.levels, 100), rng.integers(1, VOCAB.levels, 100)
    for slots in (history, np.zeros_like(history)):
        expected = reference(model, slots, candidates, likes, views)
        np.testing.assert_allclose(serve.score_request(model, CPU, slots, candidates, likes, views), expected,
                                   **TOLERANCE)
    assert np.abs(expected - reference(model, history, candidates, likes, views)).max() > 1e-3


def test_one_request_takes_the_fast_path(no_plain_path, builds) -> None:
    model = served(ModelName.qin)
    run = LoadedRun(run_dir=Path("."), config=None, model=model, features=None, device=CPU, checkpoint={})
    for request in requests().values():
        np.testing.assert_allclose(one_request(run, *request), reference(model, *request), **TOLERANCE)
    assert len(builds) == 1


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_models_fall_back_to_the_plain_path(name: ModelName, monkeypatch) -> None:
    def refuse(model) -> None:
        raise AssertionError("a server was built for an unsupported model")

    monkeypatch.setattr(serve, "ModelServer", refuse)
    model = served(name)
    assert serve.server_for(model) is None
    run = LoadedRun(run_dir=Path("."), config=None, model=model, features=None, device=CPU, checkpoint={})
    for case, request in requests().items():
        np.testing.assert_allclose(one_request(run, *request), reference(model, *request), rtol=1e-6,
                                   atol=1e-7, err_msg=f"{name.value}: {case}")


def test_training_mode_falls_back_to_the_plain_path(builds) -> None:
    model = served(ModelName.qin)
    history, candidates, likes, views = requests()["full_history"]
    assert serve.server_for(model) is not None
    model.train()
    assert serve.server_for(model) is None
    model.eval()
    model.tower.layers[0].dropout.train()  # one submodule left in training mode is enough
    assert serve.server_for(model) is None
    model.eval()
    np.testing.assert_allclose(serve.score_request(model, CPU, history, candidates, likes, views),
                               reference(model, history, candidates, likes, views), **TOLERANCE)
    assert len(builds) == 1


def test_tables_are_built_once_and_rebuilt_when_weights_change(builds) -> None:
    model = served(ModelName.qin)
    cases = list(requests().values())
    first = serve.server_for(model)
    for request in cases:
        serve.score_request(model, CPU, *request)
    assert len(builds) == 1 and serve.server_for(model) is first
    other = served(ModelName.qin, seed=3)  # its own server; the first one's stays
    serve.score_request(other, CPU, *cases[0])
    assert len(builds) == 2 and serve.server_for(model) is first
    # In-place changes (load_state_dict, an optimizer step) make the tables stale: they are rebuilt.
    before = serve.score_request(model, CPU, *cases[2])
    model.load_state_dict(other.state_dict())
    after = serve.score_request(model, CPU, *cases[2])
    np.testing.assert_allclose(after, reference(model, *cases[2]), **TOLERANCE)
    assert np.abs(after - before).max() > 1e-3
    assert len(builds) == 3
    with torch.no_grad():
        model.attention.w_k.weight.mul_(2.0)
    np.testing.assert_allclose(serve.score_request(model, CPU, *cases[2]), reference(model, *cases[2]),
                               **TOLERANCE)
    assert len(builds) == 4


def test_ids_out_of_range_raise_as_in_the_plain_path() -> None:
    model = served(ModelName.qin)
    history, candidates, likes, views = requests()["full_history"]
    for bad in (VOCAB.items, -1):
        for path in (serve.plain_request, serve.score_request):
            with pytest.raises(IndexError):
                path(model, CPU, history, np.array([1, bad]), likes[:2], views[:2])
            with pytest.raises(IndexError):
                path(model, CPU, np.array([0, 2, bad]), candidates, likes, views)


def test_packed_linear_equals_f_linear_and_falls_back_where_it_must() -> None:
    """The tower's packed float32 linear gives F.linear's result to float32 rounding for any row count; it
    is really packed on a oneDNN build (else the speed path silently vanished), and under CPU autocast or
    for another dtype it is F.linear exactly."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 32, generator=generator), torch.randn(48, generator=generator)
    linear = serve.PackedLinear(weight, bias)
    if torch.backends.mkldnn.is_available():
        assert linear.packed is not None
    for rows in (1, 7, 100, 257):
        x = torch.randn(rows, 32, generator=generator)
        with torch.inference_mode():
            out = linear(x)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    x = torch.randn(100, 32, generator=generator)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear(x), torch.nn.functional.linear(x, weight, bias))
    weight64, bias64, x64 = weight.double(), bias.double(), x.double()
    double = serve.PackedLinear(weight64, bias64)
    assert double.packed is None
    assert torch.equal(double(x64), torch.nn.functional.linear(x64, weight64, bias64))
