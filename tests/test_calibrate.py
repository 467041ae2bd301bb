"""alpha="auto": scale-free, vectorised calibration of FIUn's selection threshold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_unlearn.calibrate import DEFAULT_ALPHAS, _Bisection, calibrate_alpha, scale_free
from fl_unlearn.errors import ConfigError
from fl_unlearn.fiun import FIUnConfig, unlearn_many


def _models(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    models = [{"fc.weight": torch.randn(4, 6, generator=g), "fc.bias": torch.randn(4, generator=g)} for _ in range(n)]
    retain = [{k: torch.rand(v.shape, generator=g) for k, v in m.items()} for m in models]
    forget = {k: torch.rand(v.shape, generator=g) * 3 for k, v in models[0].items()}
    return models, retain, forget


def _weight_norm_score(target_norm: float):
    # A stand-in for forward passes: "forget accuracy" falls as the weights shrink.
    def score(i, weights):
        norm = float(sum(w.abs().sum() for w in weights.values()))
        return (1.0 if norm > target_norm else 0.0), norm
    return score


@settings(max_examples=25, deadline=None)
@given(c_forget=st.floats(1e-6, 1e6), c_retain=st.floats(1e-6, 1e6))
def test_rescaling_either_fisher_leaves_the_unlearned_weights_unchanged(c_forget, c_retain):
    models, retain, forget = _models(3)
    score = _weight_norm_score(20.0)
    ref = calibrate_alpha(models, retain, forget, score)
    scaled = calibrate_alpha(models, [{k: v * c_retain for k, v in r.items()} for r in retain],
                             {k: v * c_forget for k, v in forget.items()}, score)
    assert ref.alphas == scaled.alphas
    for a, b in zip(ref.weights, scaled.weights):
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_chosen_weights_are_what_unlearn_many_gives_for_the_chosen_alpha():
    models, retain, forget = _models(4, seed=3)
    result = calibrate_alpha(models, retain, forget, _weight_norm_score(25.0))
    for i, alpha in enumerate(result.alphas):
        expect, _ = unlearn_many([models[i]], [scale_free(retain[i])], scale_free(forget), FIUnConfig(alpha=alpha))
        for k in expect[0]:
            assert torch.equal(expect[0][k], result.weights[i][k])


def test_picks_the_mildest_alpha_that_meets_the_target():
    models, retain, forget = _models(2, seed=5)
    score = _weight_norm_score(25.0)
    result = calibrate_alpha(models, retain, forget, score)
    for i in range(2):
        met = [t["alpha"] for t in result.trials[i] if t["forget_acc"] <= 0.0]
        if result.target_met[i]:
            assert result.alphas[i] == max(met)
            # Bisection probes no more than ceil(log2(len(grid))) + 1 alphas.
            assert len(result.trials[i]) <= 5


def test_target_not_met_is_reported_not_hidden():
    models, retain, forget = _models(2)
    result = calibrate_alpha(models, retain, forget, lambda i, w: (1.0, 1.0))
    assert result.target_met == [False, False]


def test_inputs_are_not_mutated():
    models, retain, forget = _models(2)
    before = [{k: v.clone() for k, v in m.items()} for m in models]
    calibrate_alpha(models, retain, forget, _weight_norm_score(20.0))
    for m, b in zip(models, before):
        assert all(torch.equal(m[k], b[k]) for k in m)


def test_bad_grid_is_refused():
    models, retain, forget = _models(1)
    with pytest.raises(ConfigError, match="alphas"):
        calibrate_alpha(models, retain, forget, lambda i, w: (0.0, 1.0), alphas=[])


def test_bisection_finds_the_last_index_meeting_a_monotone_predicate():
    for size in range(1, len(DEFAULT_ALPHAS) + 1):
        for answer in range(-1, size):
            b, probes = _Bisection(size), 0
            while not b.done:
                probes += 1
                b.record(b.probe <= answer)
            assert b.hi == answer and probes <= size.bit_length() + 1
