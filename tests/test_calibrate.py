"""alpha="auto": scale-free, vectorised calibration of FIUn's selection threshold."""

from __future__ import annotations

from dataclasses import replace

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


# --- calibration at the clients: per-alpha counts, summed, then one choice ------------------------------------

from fl_unlearn.calibrate import (  # noqa: E402
    UNSCORED,
    UNSCORED_LOSS,
    GridCounts,
    RepairConfig,
    candidate_grid,
    choose_candidate,
    dampening_change,
    repair,
    repair_steps,
    score_alpha_grid,
)


def _pairs(*alphas, lam=1.0):
    return tuple((float(a), lam) for a in alphas)


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x)


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _linear_with_fishers():
    """A seeded ``_Linear``, its weights, and one retain- and one forget-Fisher for it."""
    torch.manual_seed(0)
    model = _Linear()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _, retain, forget = _models(1)
    return model, weights, retain[0], forget


def _class_to_forget():
    """A linear model that reads features 0-3 as classes 0-3 (class 1 has a bias), Fishers whose forget-Fisher sits
    on class 0's row, 30 rows of class 0 to forget and 60 kept rows: zeroing one weight (``fc.weight[0, 0]``, 1 of
    24) forgets the class, so the walks below meet candidates that forget without breaking the model."""
    model = _Linear()
    weight = torch.zeros(4, 6)
    weight[range(4), range(4)] = 5.0
    weights = {"fc.weight": weight, "fc.bias": torch.tensor([0.0, 0.5, 0.0, 0.0])}
    retain = {k: torch.ones_like(v) for k, v in weights.items()}
    row = torch.ones(4, 6)
    row[0, 0], row[0, 1:] = 40.0, 6.0
    forget = {"fc.weight": row, "fc.bias": torch.ones(4)}
    g = torch.Generator().manual_seed(4)

    def rows(cls: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = 0.4 * torch.randn(n, 6, generator=g)
        x[:, cls] += 1.0
        return x, torch.full((n,), cls)

    kept = [rows(c, 20) for c in (1, 2, 3)]
    kept_set = torch.cat([x for x, _ in kept]), torch.cat([y for _, y in kept])
    return model, weights, retain, forget, rows(0, 30), kept_set


def test_choose_candidate_keeps_most_among_candidates_that_forget_enough():
    counts = GridCounts(_pairs(1, 2, 4, 8), forget_correct=[0, 0, 1, 9], retain_correct=[50, 70, 90, 99],
                        forget_num=10, retain_num=100)
    assert choose_candidate(counts, 0.0) == (2.0, 1.0, True)
    assert choose_candidate(counts, 0.1) == (4.0, 1.0, True)
    # ties in kept accuracy go to the milder (later) candidate
    tie = GridCounts(_pairs(1, 2), [0, 0], [80, 80], 10, 100)
    assert choose_candidate(tie, 0.0) == (2.0, 1.0, True)
    # a zeroing candidate that forgets with more kept accuracy beats the paper's factor
    mixed = GridCounts(((4.0, 0.0), (1.0, 1.0)), [0, 0], [95, 80], 10, 100)
    assert choose_candidate(mixed, 0.0) == (4.0, 0.0, True)


def test_choose_candidate_with_a_kept_margin_takes_the_least_change_among_near_ties():
    grid = ((1.0, 0.0), (2.0, 0.0), (2.0, 1.0), (4.0, 1.0), (8.0, 1.0))
    counts = GridCounts(grid, forget_correct=[0, 0, 0, 1, 9], retain_correct=[100, 128, 126, 127, 128],
                        forget_num=256, retain_num=128)
    change = {(1.0, 0.0): 5.0, (2.0, 0.0): 3.0, (2.0, 1.0): 1.5, (4.0, 1.0): 1.0, (8.0, 1.0): 0.1}
    asked = []

    def measure(alpha, lam):
        asked.append((alpha, lam))
        return change[(alpha, lam)]

    assert choose_candidate(counts, 0.0) == (2.0, 0.0, True)  # the best count alone
    # within two samples: (2, 0) and (2, 1) tie; (4, 1) keeps a forget sample of 256 (target 0)
    assert choose_candidate(counts, 0.0, kept_margin=2, change=measure) == (2.0, 1.0, True)
    # with the tolerance (4, 1) meets the target too, but predicts a forget sample the others do not
    assert choose_candidate(counts, 0.004, kept_margin=1, change=measure) == (2.0, 0.0, True)
    even = GridCounts(grid, [0, 1, 0, 1, 9], [100, 128, 126, 127, 128], 256, 128)
    assert choose_candidate(even, 0.004, kept_margin=1, change=measure) == (4.0, 1.0, True)
    # only candidates near the best are measured; one that misses the forget target never is
    assert (8.0, 1.0) not in asked and (1.0, 0.0) not in asked
    # no margin, or no measure: the old rule
    assert choose_candidate(counts, 0.004, kept_margin=0, change=measure) == (2.0, 0.0, True)
    assert choose_candidate(even, 0.004, kept_margin=3) == (2.0, 0.0, True)
    # an unscored candidate is never chosen, however little it changes
    walked = GridCounts(grid, [0, 0, 0, UNSCORED, UNSCORED], [100, 128, 126, UNSCORED, UNSCORED], 256, 128)
    assert choose_candidate(walked, 0.004, kept_margin=5, change=measure) == (2.0, 1.0, True)
    # an unmet target keeps the most-forgetting candidate, whatever the margin
    missed = GridCounts(grid, [3, 2, 5, 9, 9], [100, 128, 126, 127, 128], 256, 128)
    assert choose_candidate(missed, 0.0, kept_margin=5, change=measure) == (2.0, 0.0, False)
    with pytest.raises(ConfigError, match="kept_margin"):
        choose_candidate(counts, 0.0, kept_margin=-1, change=measure)


def test_dampening_change_grows_with_the_dampening_and_ignores_fisher_scale():
    _, weights, retain, forget = _linear_with_fishers()
    change = dampening_change(weights, retain, forget)
    rescaled = dampening_change(weights, {k: 7.0 * v for k, v in retain.items()},
                                {k: 0.01 * v for k, v in forget.items()})
    assert change(1e9, 1.0) == 0.0  # selects nothing
    assert 0.0 < change(1.0, 1.0) <= change(1.0, 0.0)  # zeroing the same selection changes more
    assert change(0.5, 0.0) >= change(2.0, 0.0)  # a smaller alpha selects a superset
    for pair in ((0.5, 0.0), (1.0, 1.0), (4.0, 0.0)):
        assert rescaled(*pair) == pytest.approx(change(*pair), rel=1e-6)


def test_choose_candidate_reports_an_unmet_target_and_forgets_most():
    counts = GridCounts(_pairs(1, 2, 4), [3, 5, 9], [10, 60, 99], 10, 100)
    assert choose_candidate(counts, 0.0) == (1.0, 1.0, False)


def test_candidate_grid_is_strongest_first_and_refuses_bad_values():
    grid = candidate_grid((4.0, 1.0), (1.0, 0.0))
    assert grid == ((1.0, 0.0), (4.0, 0.0), (1.0, 1.0), (4.0, 1.0))
    with pytest.raises(ConfigError):
        candidate_grid((), (1.0,))
    with pytest.raises(ConfigError):
        candidate_grid((1.0,), (-1.0,))


def test_counts_add_up_like_one_party_holding_all_samples():
    a = GridCounts(_pairs(1, 2), [1, 2], [3, 4], 5, 6)
    b = GridCounts(_pairs(1, 2), [10, 20], [30, 40], 50, 60)
    total = a + b
    assert (total.forget_correct, total.retain_correct, total.forget_num, total.retain_num) == ([11, 22], [33, 44], 55, 66)
    with pytest.raises(ConfigError):
        a + GridCounts(_pairs(1, 3), [0, 0], [0, 0])


@settings(max_examples=20, deadline=None)
@given(c_forget=st.floats(1e-6, 1e6), c_retain=st.floats(1e-6, 1e6))
def test_client_grid_counts_do_not_change_when_either_fisher_is_rescaled(c_forget, c_retain):
    model, weights, retain, forget = _linear_with_fishers()
    forget_set, retain_set = _data(40, 1), _data(60, 2)
    retain_scaled = {k: v * c_retain for k, v in retain.items()}
    forget_scaled = {k: v * c_forget for k, v in forget.items()}
    ref = score_alpha_grid(model, weights, retain, forget, forget_set, retain_set)
    scaled = score_alpha_grid(model, weights, retain_scaled, forget_scaled, forget_set, retain_set)
    assert (ref.forget_correct, ref.retain_correct) == (scaled.forget_correct, scaled.retain_correct)
    # the kept losses move by float rounding only (the normalised Fishers differ in the last bits)
    assert scaled.retain_loss == pytest.approx(ref.retain_loss, rel=1e-6)
    # and so is the server's choice, near ties and the least-change rule included
    assert choose_candidate(ref, 0.1, kept_margin=3, change=dampening_change(weights, retain, forget)) == \
        choose_candidate(scaled, 0.1, kept_margin=3, change=dampening_change(weights, retain_scaled, forget_scaled))


def test_client_grid_counts_match_dampening_each_alpha_by_hand():
    model, weights, retain, forget = _linear_with_fishers()
    x, y = _data(50, 3)
    grid = ((2.0, 0.0), (2.0, 1.0), (8.0, 1.0))
    counts = score_alpha_grid(model, weights, retain, forget, (x, y), None, candidates=grid)
    assert counts.forget_num == 50 and counts.retain_num == 0 and counts.retain_correct == [0, 0, 0]
    for (alpha, lam), got in zip(grid, counts.forget_correct):
        (w,), _ = unlearn_many([weights], [scale_free(retain)], scale_free(forget), FIUnConfig(alpha=alpha, lam=lam))
        logits = torch.func.functional_call(model, w, (x,))
        assert got == int((logits.argmax(1) == y).sum())


def test_walk_stops_each_lambda_at_the_first_kept_sample_and_scores_the_rest_as_the_full_grid():
    model, weights, retain, forget, forget_set, retain_set = _class_to_forget()
    grid = candidate_grid((0.0, 0.25, 1.0, 4.0, 16.0, 1e9), (1.0, 0.0))
    full = score_alpha_grid(model, weights, retain, forget, forget_set, retain_set, candidates=grid)
    walked = score_alpha_grid(model, weights, retain, forget, forget_set, retain_set, candidates=grid,
                              stop_when_kept=True)
    assert walked.scored() != full.scored()  # alpha 1e9 dampens nothing, so every walk stops before the end
    # alphas 0 and 0.25 at lambda 0 zero more than half of the weight: never scored (test_a_sweep_knows_...)
    assert [pair for pair, ok in zip(grid, full.scored()) if not ok] == [(0.0, 0.0), (0.25, 0.0)]
    assert full.forget_correct[2:4] == [0, 0]  # zeroing class 0's weight forgets it: the lambda-0 walk goes on
    for lam in (0.0, 1.0):
        idx = [i for i, (_, v) in enumerate(grid) if v == lam and full.scored()[i]]
        scored = [i for i in idx if walked.scored()[i]]
        assert scored == idx[:len(scored)] and scored  # a prefix, strongest first, never empty
        for i in scored:  # scored candidates are scored exactly as the full grid scores them
            assert (walked.forget_correct[i], walked.retain_correct[i]) == (full.forget_correct[i], full.retain_correct[i])
        # the walk stopped at the first candidate keeping a forget sample, and only there
        assert all(full.forget_correct[i] == 0 for i in scored[:-1]) and full.forget_correct[scored[-1]] > 0
    # the choice is the full grid's whenever the milder alphas past a miss miss too (monotone here)
    assert choose_candidate(walked, 0.0) == choose_candidate(full, 0.0)
    # a client without forget samples cannot walk: it scores everything (but the candidates that break the model)
    assert score_alpha_grid(model, weights, retain, forget, None, retain_set, candidates=grid,
                            stop_when_kept=True).scored() == full.scored()


def test_walk_with_a_keep_budget_stops_past_the_budget_only():
    model, weights, retain, forget, forget_set, retain_set = _class_to_forget()
    grid = candidate_grid((0.0, 0.25, 1.0, 4.0, 16.0, 1e9), (1.0, 0.0))
    full = score_alpha_grid(model, weights, retain, forget, forget_set, retain_set, candidates=grid)
    kept = sorted({f for f in full.forget_correct if f > 0})
    assert len(kept) >= 2  # the fixture keeps different numbers of forget samples along the grid
    budget = kept[0]
    walked = score_alpha_grid(model, weights, retain, forget, forget_set, retain_set, candidates=grid,
                              stop_when_kept=True, keep_budget=budget)
    for lam in (0.0, 1.0):
        scored = [i for i, (_, v) in enumerate(grid) if v == lam and walked.scored()[i]]
        assert all(full.forget_correct[i] <= budget for i in scored[:-1])
        assert scored[-1] == max(i for i, (_, v) in enumerate(grid) if v == lam) \
            or full.forget_correct[scored[-1]] > budget
    strict = score_alpha_grid(model, weights, retain, forget, forget_set, retain_set, candidates=grid,
                              stop_when_kept=True)
    assert sum(walked.scored()) >= sum(strict.scored())
    # the budget's target: the best kept accuracy among candidates keeping at most that share
    target = budget / full.forget_num
    assert choose_candidate(walked, target) == choose_candidate(full, target)


def test_unscored_candidates_stay_unscored_in_sums_and_are_never_chosen():
    a = GridCounts(_pairs(1, 2, 4), [0, 0, 3], [50, 80, 90], 10, 100)
    b = GridCounts(_pairs(1, 2, 4), [0, 2, UNSCORED], [40, 70, UNSCORED], 10, 100)
    total = a + b
    assert total.scored() == [True, True, False] and total.forget_correct == [0, 2, UNSCORED]
    f_acc, r_acc = total.accuracies()
    assert f_acc[2] is None and r_acc[2] is None
    assert choose_candidate(total, 0.0) == (1.0, 1.0, True)
    assert choose_candidate(total, 0.5) == (2.0, 1.0, True)  # the unscored milder one is not chosen
    with pytest.raises(ConfigError):
        choose_candidate(GridCounts(_pairs(1), [UNSCORED], [UNSCORED]), 0.0)


def test_repair_keeps_the_best_validation_loss_and_never_mutates_its_input():
    torch.manual_seed(0)
    model = _Linear()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = {k: v.clone() for k, v in weights.items()}
    sets = [_data(64, 10 + i) for i in range(3)]
    new, info = repair(model, weights, sets, forget_set=_data(20, 9), cfg=RepairConfig(max_rounds=4, lr=0.1))
    assert all(torch.equal(weights[k], original[k]) for k in weights)
    losses = info["val_loss"]
    assert 1 <= info["repair_rounds"] <= 4 and len(losses) == info["repair_rounds"] + 1
    assert len(info["repair_forget_acc"]) == len(losses)
    # the returned weights are those of the lowest validation loss seen (the input when no round helped)
    from fl_unlearn.calibrate import _val_loss, split_validation
    splits = [split_validation(x, y, 0.25) for x, y in sets]
    assert _val_loss(model, new, splits) == pytest.approx(min(losses))
    unchanged, info0 = repair(model, weights, sets, cfg=RepairConfig(max_rounds=0))
    assert info0["repair_rounds"] == 0 and all(torch.equal(unchanged[k], original[k]) for k in weights)


def test_repair_with_the_restore_stop_ends_once_the_kept_loss_is_back_at_the_originals():
    from fl_unlearn.calibrate import _val_loss, split_validation

    torch.manual_seed(0)
    model = _Linear()
    sets = []
    for i in range(3):  # learnable: the label is the largest of the first four features
        x = torch.randn(64, 6, generator=torch.Generator().manual_seed(10 + i))
        sets.append((x, x[:, :4].argmax(1)))
    untrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stall = RepairConfig(max_rounds=30, lr=0.1, patience=2)
    trained, long_run = repair(model, untrained, sets, cfg=stall)  # the "original": trained until it stalls
    splits = [split_validation(x, y, 0.25) for x, y in sets]
    target = _val_loss(model, trained, splits)
    damaged = {k: 0.3 * v for k, v in trained.items()}  # what a strong dampening leaves
    assert _val_loss(model, damaged, splits) > target
    restore = replace(stall, stop="restore")
    fixed, info = repair(model, damaged, sets, cfg=restore, original=trained)
    _, stalled = repair(model, damaged, sets, cfg=stall)
    # it stops in the first round whose kept loss is back at the original's: never later, and fewer rounds than
    # waiting for a stall
    assert info["restored"] and info["restore_loss"] == pytest.approx(target)
    assert info["val_loss"][-1] <= target < min(info["val_loss"][:-1])
    assert info["repair_rounds"] < stalled["repair_rounds"]
    assert _val_loss(model, fixed, splits) <= target
    # nothing to restore: no round at all; and without an original it is the stall rule
    _, none = repair(model, trained, sets, cfg=restore, original=trained)
    assert none["repair_rounds"] == 0 and none["restored"]
    _, plain = repair(model, damaged, sets, cfg=restore)
    assert plain["repair_rounds"] == stalled["repair_rounds"] and "restored" not in plain
    # with the guard on, a forget row still predicted is not "restored", whatever the kept loss says
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(99))
    forget = (x, x[:, :4].argmax(1))  # rows the trained model gets right
    _, guarded = repair(model, trained, sets, cfg=replace(restore, forget_weight=1.0), forget_sets=[forget, None, None],
                        original=trained)
    assert guarded["repair_rounds"] >= 1
    with pytest.raises(ConfigError, match="stop"):
        RepairConfig(stop="sometimes")


def test_repair_config_lists_every_bad_value():
    with pytest.raises(ConfigError, match="forget_weight.*max_rounds.*local_steps.*lr.*patience"):
        RepairConfig(max_rounds=-1, local_steps=0, lr=0.0, patience=0, forget_weight=-1.0)
    with pytest.raises(ConfigError, match="forget_weight"):
        RepairConfig(forget_weight=float("nan"))


def test_forget_guard_loss_is_minus_log_of_the_other_labels_probability():
    from fl_unlearn.calibrate import forget_guard_loss

    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(16, 5, generator=g) * 4, torch.randint(0, 5, (16,), generator=g)
    p_y = torch.softmax(logits.double(), 1).gather(1, y[:, None]).squeeze(1)
    per_row = forget_guard_loss(logits.double(), y, reduction="none")
    assert torch.allclose(per_row, -torch.log1p(-p_y)) and bool((per_row >= 0).all())
    assert float(forget_guard_loss(logits, y)) == pytest.approx(float(per_row.mean()), rel=1e-5)
    assert float(forget_guard_loss(logits, y, "sum")) == pytest.approx(float(per_row.sum()), rel=1e-5)
    # bounded: a label the model gives no weight costs nothing, however far below the others its logit is
    far = torch.tensor([[0.0, -1e4, 0.0]])
    assert float(forget_guard_loss(far, torch.tensor([1]))) == 0.0


def test_repair_with_the_forget_guard_pushes_the_forget_label_down_and_validates_on_it():
    """The holders' forget rows join the repair: the guard's held-back share is in the validation loss, and the
    forgotten label ends less likely on the forget rows than after a repair on kept data alone."""
    from fl_unlearn.calibrate import _guard_val_loss, _val_loss, forget_guard_loss, split_validation

    torch.manual_seed(0)
    model = _Linear()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kept = [_data(64, 20 + i) for i in range(2)]
    kept = [(x[y != 3], y[y != 3]) for x, y in kept]  # class 3 is forgotten: kept data has none
    fx = torch.randn(40, 6, generator=torch.Generator().manual_seed(7)) + 2.0
    forget = [(fx[:20], torch.full((20,), 3)), (fx[20:], torch.full((20,), 3))]
    cfg = RepairConfig(max_rounds=3, lr=0.1, patience=3)
    plain, _ = repair(model, weights, kept, cfg=replace(cfg, forget_weight=0.0), forget_sets=forget)
    guarded, info = repair(model, weights, kept, cfg=replace(cfg, forget_weight=2.0), forget_sets=forget)
    splits = [split_validation(x, y, 0.25) for x, y in kept]
    fsplits = [split_validation(x, y, 0.25) for x, y in forget]
    assert info["val_loss"][0] == pytest.approx(_val_loss(model, weights, splits)
                                                + 2.0 * _guard_val_loss(model, weights, fsplits))

    def guard(w):
        return float(forget_guard_loss(torch.func.functional_call(model, w, (fx,)), torch.full((40,), 3)))

    assert guard(guarded) < guard(plain)
    # no forget rows, or a weight of 0: exactly the repair on kept data alone (client and sample requests)
    alone, _ = repair(model, weights, kept, cfg=cfg)
    for same in (repair(model, weights, kept, cfg=cfg, forget_sets=[None, None])[0],
                 repair(model, weights, kept, cfg=replace(cfg, forget_weight=0.0), forget_sets=forget)[0]):
        assert all(torch.equal(same[k], alone[k]) for k in alone)
    with pytest.raises(ConfigError, match="forget samples for"):
        repair(model, weights, kept, cfg=cfg, forget_sets=forget[:1])


def _quadrant_cnn() -> tuple[torch.nn.Module, dict, dict, list, list]:
    """A small CNN trained on 8x8 images whose label is the bright quadrant; the same with 80 % of its hidden
    layer's weights zeroed (what a strong dampening leaves); per client, kept rows (classes 0-2) and forget rows
    (class 3, the forgotten one)."""
    from fl_unlearn.models import build_model

    def rows(n: int, seed: int, classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
        x = torch.rand(n, 1, 8, 8, generator=g) * 0.5
        for i, label in enumerate(y.tolist()):
            r, c = divmod(label, 2)
            x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 0.5
        return x, y

    torch.manual_seed(0)
    model = build_model("cnn", 4, in_channels=1, image_size=8)
    x, y = rows(512, 1, (0, 1, 2, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(100):
        i = slice(32 * (step % 16), 32 * (step % 16) + 32)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mask = torch.rand(trained["hidden.0.weight"].shape, generator=torch.Generator().manual_seed(5)) > 0.8
    damaged = {k: v * mask if k == "hidden.0.weight" else v.clone() for k, v in trained.items()}
    return model, trained, damaged, [rows(128, 10 + k, (0, 1, 2)) for k in range(2)], \
        [rows(64, 20 + k, (3,)) for k in range(2)]


def _head_changed_only(new: dict, old: dict) -> bool:
    """Whether ``new`` differs from ``old`` in the head's weights (``hidden``, ``fc``) and nowhere else."""
    return all(torch.equal(new[k], old[k]) == (not k.startswith(("hidden", "fc"))) for k in old)


def test_repair_of_the_head_trains_only_the_head_and_brings_kept_accuracy_back():
    from fl_unlearn.calibrate import _acc

    model, _, damaged, kept, forget = _quadrant_cnn()
    original = {k: v.clone() for k, v in damaged.items()}
    x, y = torch.cat([x for x, _ in kept]), torch.cat([y for _, y in kept])
    before = _acc(model, damaged, x, y)
    cfg = RepairConfig(max_rounds=6, local_steps=8, lr=0.05, part="head")
    repaired, info = repair(model, damaged, kept, cfg=cfg, forget_sets=forget)
    assert all(torch.equal(damaged[k], original[k]) for k in damaged)  # the input is not modified
    assert _head_changed_only(repaired, damaged)  # the body comes back as it came
    assert info["val_loss"][-1] < 0.5 * info["val_loss"][0] and info["repair_rounds"] >= 1
    assert before < 0.8 and _acc(model, repaired, x, y) > before + 0.15
    # one round of steps on the head: the same body, and what the rounds start from
    stepped = repair_steps(model, damaged, kept[0], cfg, seed=(0,), forget=forget[0])
    assert _head_changed_only(stepped, damaged)


def test_repair_of_the_head_keeps_the_best_validation_loss_and_the_restore_stop():
    from fl_unlearn.calibrate import _val_loss, split_validation

    model, trained, damaged, kept, _ = _quadrant_cnn()
    splits = [split_validation(x, y, 0.25) for x, y in kept]
    cfg = RepairConfig(max_rounds=6, local_steps=8, lr=0.05, part="head")
    repaired, info = repair(model, damaged, kept, cfg=cfg)
    # the losses are the whole model's, on the held-back rows; the returned weights have the lowest
    assert info["val_loss"][0] == pytest.approx(_val_loss(model, damaged, splits), rel=1e-5)
    assert _val_loss(model, repaired, splits) == pytest.approx(min(info["val_loss"]), rel=1e-5)
    # restore: the target is the original's loss, on its own body
    _, restored = repair(model, damaged, kept, cfg=replace(cfg, stop="restore"), original=trained)
    assert restored["restore_loss"] == pytest.approx(_val_loss(model, trained, splits), rel=1e-5)


def test_repair_of_the_head_guard_holds_the_forgotten_class_down():
    model, trained, _, kept, forget = _quadrant_cnn()
    cfg = RepairConfig(max_rounds=1, local_steps=10, lr=0.05, part="head")
    fx = torch.cat([x for x, _ in forget])

    def p_forgotten(w) -> float:  # the forgotten class's mean probability on its rows
        return float(torch.softmax(torch.func.functional_call(model, w, (fx,)), 1)[:, 3].mean())

    # kept data alone leaves a class the model still predicts where it was; the guard takes it down
    guarded = repair_steps(model, trained, kept[0], cfg, seed=(0,), forget=forget[0])
    plain = repair_steps(model, trained, kept[0], replace(cfg, forget_weight=0.0), seed=(0,), forget=forget[0])
    assert p_forgotten(guarded) < 0.01 < 0.1 < p_forgotten(plain)
    # no forget rows, or a weight of 0: the same steps on kept data alone
    alone = repair_steps(model, trained, kept[0], cfg, seed=(0,))
    assert all(torch.equal(alone[k], plain[k]) for k in alone)


def test_a_feature_cache_serves_the_same_body_and_rows_again_and_nothing_else():
    from fl_unlearn.calibrate import FeatureCache

    model, trained, damaged, kept, forget = _quadrant_cnn()
    cfg = RepairConfig(local_steps=6, lr=0.05, part="head")
    cache = FeatureCache(size=3)
    plain = repair_steps(model, damaged, kept[0], cfg, seed=(1,), forget=forget[0])
    first = repair_steps(model, damaged, kept[0], cfg, seed=(1,), forget=forget[0], cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)  # the kept rows and the forget rows
    assert all(torch.allclose(first[k], plain[k], atol=1e-6) for k in plain)
    # the next round: a new head on the same body and rows is served from the cache, with the same result
    again = repair_steps(model, first, kept[0], cfg, seed=(2,), forget=forget[0], cache=cache)
    assert (cache.hits, cache.misses) == (2, 2)
    assert all(torch.allclose(again[k], repair_steps(model, first, kept[0], cfg, seed=(2,), forget=forget[0])[k],
                              atol=1e-6) for k in again)
    # the same body under another head (damaged only changed the head): served; another body, or other rows:
    # computed afresh; and no more than `size` entries are kept
    repair_steps(model, trained, kept[0], cfg, seed=(1,), forget=forget[0], cache=cache)
    assert (cache.hits, cache.misses) == (4, 2)
    other_body = {k: v * 1.5 if k.startswith("features") else v for k, v in trained.items()}
    repair_steps(model, other_body, kept[0], cfg, seed=(1,), forget=forget[0], cache=cache)
    assert (cache.hits, cache.misses) == (4, 4)
    repair_steps(model, damaged, kept[1], cfg, seed=(1,), cache=cache)
    assert cache.misses == 5 and len(cache._entries) == 3


def test_head_scores_are_the_whole_models_figures():
    from fl_unlearn.calibrate import FeatureCache, count_correct, guard_sum, head_scores, loss_sum

    model, _, damaged, kept, forget = _quadrant_cnn()
    cache = FeatureCache()
    scores = head_scores(model, damaged, kept[0], forget[0], cache=cache)
    for rows, (loss, correct, guard) in zip((kept[0], forget[0]), scores):
        assert loss == pytest.approx(loss_sum(model, damaged, *rows), rel=1e-5)
        assert correct == count_correct(model, damaged, rows)
        assert guard == pytest.approx(guard_sum(model, damaged, *rows), rel=1e-5, abs=1e-6)
    assert head_scores(model, damaged, forget[0], cache=cache) == scores[1:] and cache.hits == 1
    assert head_scores(model, damaged, None) == [(0.0, 0, 0.0)]


def test_repair_part_is_checked_and_needs_a_model_split_head_knows():
    model, _, damaged, kept, _ = _quadrant_cnn()
    with pytest.raises(ConfigError, match="part must be one of all, head"):
        RepairConfig(part="body")
    with pytest.raises(ConfigError, match="split_head knows"):
        repair(_Linear(), dict(_Linear().state_dict()), [_data(8, 1)], cfg=RepairConfig(part="head"))


# --- every affected model forgets: the per-model check of a class request -------------------------------------

from fl_unlearn.calibrate import (  # noqa: E402
    NOT_WALKED,
    UNSCORED,
    check_models,
    check_sequence,
    count_correct,
    count_correct_split,
    first_within,
    per_model_candidate,
    strongest_usable,
    unlearn_with_candidates,
)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x)


def _tiny(bias0: float) -> dict:
    # x = [1, 0] of class 0: logits [w00 + b0, 0.5]; w00 = 2 makes it correct, zeroing w00 leaves [b0, 0.5]
    return {"fc.weight": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "fc.bias": torch.tensor([bias0, 0.5])}


_RETAIN = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}
# scale-free: the forget entry of w00 is 6 x the mean, the retain-Fisher 1 everywhere, so alphas < 6 select it
_FORGET = {"fc.weight": torch.tensor([[5.0, 0.0], [0.0, 0.0]]), "fc.bias": torch.zeros(2)}
_FORGET_SET = (torch.tensor([[1.0, 0.0]] * 3), torch.zeros(3, dtype=torch.long))


def test_check_sequence_goes_from_the_choice_to_stronger_candidates():
    assert check_sequence(4.0, 1.0, (1.0, 2.0, 4.0, 8.0), (1.0, 0.0)) == [
        (4.0, 1.0), (2.0, 1.0), (1.0, 1.0), (4.0, 0.0), (2.0, 0.0), (1.0, 0.0)]
    assert check_sequence(2.0, 0.0, (1.0, 2.0, 4.0), (1.0, 0.0)) == [(2.0, 0.0), (1.0, 0.0)]


def test_check_models_finds_the_first_candidate_that_forgets_and_reports_none_honestly():
    forgettable, stubborn = _tiny(0.0), _tiny(0.6)  # zeroing w00 flips the first, not the second
    # lambda 1 only scales w00 by F_D / F_f (= 1/6 here): [2/6, 0.5] already flips the forgettable model, so make
    # the walk need lambda 0 with a larger margin
    forgettable["fc.weight"][0, 0] = 4.0  # 4/6 + 0 > 0.5 at lambda 1; zeroed: 0 < 0.5
    seq = check_sequence(16.0, 1.0, (1.0, 2.0, 4.0, 8.0, 16.0), (1.0, 0.0))
    counts = check_models(_Tiny(), [forgettable, stubborn], _RETAIN, [_FORGET, _FORGET], _FORGET_SET, seq)
    found = [first_within([c]) for c in counts]
    assert seq[found[0]] == (4.0, 0.0) and found[1] == -1
    # each walked step's count is the dampened model's (up to budget + 1: 1 here), the walk stops at the first 0,
    # the rest is not walked
    for i, (alpha, lam) in enumerate(seq):
        (w,), _ = unlearn_many([forgettable], [scale_free(_RETAIN)], scale_free(_FORGET), FIUnConfig(alpha=alpha, lam=lam))
        assert counts[0][i] == (min(count_correct(_Tiny(), w, _FORGET_SET), 1) if i <= found[0] else NOT_WALKED)
    assert counts[0][found[0]] == 0 and all(c > 0 for c in counts[0][:found[0]])
    assert counts[1] == [1] * len(seq)  # the stubborn model keeps a sample at every step, walked to the end
    # with a budget the counts are exact up to budget + 1: the sum is over the budget whatever the rest
    assert check_models(_Tiny(), [stubborn], _RETAIN, [_FORGET], _FORGET_SET, seq, budget=5) == [[3] * len(seq)]
    assert check_models(_Tiny(), [stubborn], _RETAIN, [_FORGET], _FORGET_SET, seq, budget=1) == [[2] * len(seq)]
    # a model that forgets at the choice costs one step
    assert check_models(_Tiny(), [forgettable], _RETAIN, [_FORGET], _FORGET_SET,
                        [(4.0, 0.0), (2.0, 0.0)]) == [[0, NOT_WALKED]]
    with pytest.raises(ConfigError):
        check_models(_Tiny(), [forgettable], _RETAIN, [], _FORGET_SET, seq)


def test_a_holder_checks_the_models_it_holds_and_takes_their_own_fisher_where_none_forgets():
    from strategies import records as R
    from strategies.calibration import check_held_models

    forgettable, stubborn = _tiny(0.0), _tiny(0.6)
    forgettable["fc.weight"][0, 0] = 4.0  # forgets only at lambda 0 with alpha < 6
    own = {"fc.weight": torch.tensor([[5.0, 0.0], [0.0, 0.0]]), "fc.bias": torch.tensor([5.0, 0.0])}
    asked = []
    config = {R.ALPHAS: [1.0, 2.0, 4.0, 8.0, 16.0], R.LAMS: [1.0, 0.0], "fiun-alpha": 16.0, "fiun-lam": 1.0}
    candidates, forgets, status = check_held_models(
        _Tiny(), [forgettable, stubborn], [_RETAIN, _RETAIN], _FORGET, _FORGET_SET, config,
        own_fisher=lambda w: asked.append(w) or own)
    # the first forgets from (4, 0) on with the shared forget-Fisher; the second only once its own one selects
    # the bias too (zeroing w00 alone leaves it at class 0), and only it cost a Fisher pass
    assert candidates[0] == (4.0, 0.0) and forgets[0] is _FORGET and status[0] == "met"
    assert forgets[1] is own and status[1] == "own-fisher" and len(asked) == 1 and asked[0] is stubborn
    (w,), _ = unlearn_many([stubborn], [scale_free(_RETAIN)], scale_free(own),
                           FIUnConfig(alpha=candidates[1][0], lam=candidates[1][1]))
    assert count_correct(_Tiny(), w, _FORGET_SET) == 0


def test_per_model_candidate_is_the_first_step_the_holders_counts_keep_within_the_budget():
    seq = [(4.0, 1.0), (2.0, 1.0), (4.0, 0.0)]
    done = [0, NOT_WALKED, NOT_WALKED]
    assert per_model_candidate(seq, [done, done]) == ((4.0, 1.0), True)
    # budget 0: the strongest of the holders' first forgetting steps (a holder past its 0 counts 0)
    assert per_model_candidate(seq, [[2, 1, 0], [1, 0, NOT_WALKED]]) == ((4.0, 0.0), True)
    # a budget of 1 in all: one kept sample over the holders is within it, one at each is not
    assert per_model_candidate(seq, [[1, 0, NOT_WALKED], done], budget=1) == ((4.0, 1.0), True)
    assert per_model_candidate(seq, [[1, 0, NOT_WALKED], [1, 1, 0]], budget=1) == ((2.0, 1.0), True)
    # none within: the fallback (strongest_usable's index), not met
    assert per_model_candidate(seq, [[1, 0, NOT_WALKED], [3, 3, 3]]) == ((4.0, 0.0), False)
    assert per_model_candidate(seq, [[1, 0, NOT_WALKED], [3, 3, 3]], fallback=1) == ((2.0, 1.0), False)
    # a candidate a holder passed over (it zeroes more than half of a weight tensor) is never taken
    assert first_within([[2, UNSCORED, 0], [0, NOT_WALKED, NOT_WALKED]], budget=2) == 0
    assert first_within([[3, UNSCORED, 0], [0, NOT_WALKED, NOT_WALKED]], budget=2) == 2
    with pytest.raises(ConfigError, match="different lengths"):
        first_within([[0], [0, 0]])


# Two layers; x = [1, 0] of class 0 gives logits [1, 0.1]. With the first layer's weights zeroed the logits are the
# second layer's bias [0, 0.1] for every input: class 1, whatever the input. The forget-Fisher covers only that
# weight tensor (scale-free: 3 x the mean, the retain-Fisher 1 everywhere), so alphas < 3 select all of it.
_LAYERED = {"0.weight": torch.eye(2), "0.bias": torch.zeros(2), "1.weight": torch.eye(2),
            "1.bias": torch.tensor([0.0, 0.1])}
_LAYERED_RETAIN = {k: torch.ones_like(v) for k, v in _LAYERED.items()}
_LAYERED_FORGET = {k: torch.full_like(v, 5.0) if k == "0.weight" else torch.zeros_like(v) for k, v in _LAYERED.items()}
_LAYERED_SET = (torch.tensor([[1.0, 0.0]] * 3), torch.zeros(3, dtype=torch.long))


def _layered() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))


def test_a_sweep_knows_when_a_candidate_zeroes_a_whole_weight_tensor():
    from fl_unlearn.fiun import AlphaSweep, FisherSweep

    retain, forget = scale_free(_LAYERED_RETAIN), scale_free(_LAYERED_FORGET)
    at_zero = FisherSweep(retain, forget, FIUnConfig(lam=0.0), like=_LAYERED)
    assert at_zero.zeroes_a_weight(2.0) and at_zero.zeroes_a_weight(0.5) and not at_zero.zeroes_a_weight(4.0)
    assert not FisherSweep(retain, forget, FIUnConfig(lam=1.0), like=_LAYERED).zeroes_a_weight(2.0)  # scaled by 1/3
    dead = scale_free({**_LAYERED_RETAIN, "0.weight": torch.zeros(2, 2)})  # F_D = 0: lambda 1 zeroes what it selects
    assert FisherSweep(dead, forget, FIUnConfig(lam=1.0), like=_LAYERED).zeroed_share(2.0) == 1.0
    assert AlphaSweep(_LAYERED, retain, forget, FIUnConfig(lam=0.0)).zeroes_a_weight(2.0)
    one_entry = {**_LAYERED_FORGET, "0.weight": torch.tensor([[5.0, 0.0], [0.0, 0.0]])}
    assert not FisherSweep(retain, scale_free(one_entry), FIUnConfig(lam=0.0), like=_LAYERED).zeroes_a_weight(0.1)
    # the checks' guard: more than half of a weight tensor zeroed breaks the model (ZEROED_SHARE); half does not
    for selected, share in (([[5.0, 0.0], [0.0, 0.0]], 0.25), ([[5.0, 5.0], [0.0, 0.0]], 0.5),
                            ([[5.0, 5.0], [5.0, 0.0]], 0.75), ([[5.0, 5.0], [5.0, 5.0]], 1.0)):
        sweep = FisherSweep(retain, scale_free({**_LAYERED_FORGET, "0.weight": torch.tensor(selected)}),
                            FIUnConfig(lam=0.0), like=_LAYERED)
        assert sweep.zeroed_share(0.1) == share
        assert sweep.breaks_a_weight(0.1) == (share > 0.5) and sweep.zeroes_a_weight(0.1) == (share == 1.0)
    three = scale_free({**_LAYERED_FORGET, "0.weight": torch.tensor([[5.0, 5.0], [5.0, 0.0]])})
    seq = check_sequence(0.1, 0.0, (0.1,), (0.0,))  # one candidate, zeroing 3 of the layer's 4 weights
    assert check_models(_layered(), [_LAYERED], _LAYERED_RETAIN, [three], _LAYERED_SET, seq) == [[UNSCORED]]
    # the grid leaves it unscored too (it would forget by breaking the model), and scores one zeroing half
    two = scale_free({**_LAYERED_FORGET, "0.weight": torch.tensor([[5.0, 5.0], [0.0, 0.0]])})
    for forget_fisher, scored in ((three, False), (two, True)):
        counts = score_alpha_grid(_layered(), _LAYERED, _LAYERED_RETAIN, forget_fisher, _LAYERED_SET, _LAYERED_SET,
                                  candidates=seq)
        assert counts.scored() == [scored]
    # and it is what it says: dampened there, the layer is 0 and the model predicts class 1 for everything
    (w,), _ = unlearn_many([_LAYERED], [retain], forget, FIUnConfig(alpha=2.0, lam=0.0))
    assert not w["0.weight"].any() and count_correct(_layered(), w, _LAYERED_SET) == 0
    assert count_correct(_layered(), _LAYERED, _LAYERED_SET) == 3


def test_the_checks_never_forget_by_zeroing_a_whole_weight_tensor():
    alphas, lams = (1.0, 2.0, 4.0), (1.0, 0.0)
    # the check passes over alphas 2 and 1 at lambda 0 (where zeroing would "forget"); lambda 1 never forgets here
    seq = check_sequence(4.0, 0.0, alphas, lams)
    counts = check_models(_layered(), [_LAYERED], _LAYERED_RETAIN, [_LAYERED_FORGET], _LAYERED_SET, seq)
    assert counts == [[1, UNSCORED, UNSCORED]] and first_within(counts) == -1
    # a model no candidate makes forget gets the strongest one that zeroes nothing: the choice itself here
    assert strongest_usable(seq, _LAYERED, _LAYERED_RETAIN, _LAYERED_FORGET) == 0
    assert strongest_usable(check_sequence(4.0, 1.0, alphas, lams), _LAYERED, _LAYERED_RETAIN,
                            _LAYERED_FORGET) == 3  # (1, 1): lambda 1 only scales the layer
    # the federation's grid leaves such candidates unscored, so they are never chosen
    grid = candidate_grid(alphas, lams)
    counts = score_alpha_grid(_layered(), _LAYERED, _LAYERED_RETAIN, _LAYERED_FORGET, _LAYERED_SET, _LAYERED_SET,
                              candidates=grid)
    assert [pair for pair, ok in zip(grid, counts.scored()) if not ok] == [(1.0, 0.0), (2.0, 0.0)]


def test_a_holder_never_dampens_its_models_by_zeroing_a_whole_weight_tensor():
    from strategies import records as R
    from strategies.calibration import check_held_models

    config = {R.ALPHAS: [1.0, 2.0, 4.0], R.LAMS: [1.0, 0.0], "fiun-alpha": 4.0, "fiun-lam": 0.0}
    candidates, forgets, status = check_held_models(
        _layered(), [_LAYERED], [_LAYERED_RETAIN], _LAYERED_FORGET, _LAYERED_SET, config,
        own_fisher=lambda w: _LAYERED_FORGET)
    assert candidates == [(4.0, 0.0)] and status == ["not-met"]  # not (2, 0), which zeroes the first layer


def test_the_server_gives_a_model_no_candidate_forgets_the_strongest_usable_one():
    from strategies.calibration import CalibrationChoice, _set_per_model

    seq = check_sequence(4.0, 0.0, (1.0, 2.0, 4.0), (1.0, 0.0))
    choice = CalibrationChoice(4.0, 0.0, 0.03, True, GridCounts(((4.0, 0.0),), [0], [3], 3, 3), 0.0, 0.0)
    # one holder: "m" keeps a sample at the choice and the rest zero half the layer; "n" forgets at (2, 0)
    counts = [[[1, UNSCORED, UNSCORED]], [[1, 0, NOT_WALKED]]]  # per model, one row per holder that checked it
    _set_per_model(choice, [("m", _LAYERED, _LAYERED_FORGET), ("n", _LAYERED, _LAYERED_FORGET)], seq, counts,
                   _LAYERED_RETAIN, FIUnConfig(), 0)
    assert choice.per_model == {"m": (4.0, 0.0), "n": (2.0, 0.0)} and choice.per_model_met == {"m": False, "n": True}


def test_unlearn_with_candidates_equals_unlearn_many_per_model():
    models, retain, forget = _models(3)
    cands = [(2.0, 1.0), (0.5, 0.0), (2.0, 1.0)]
    got, stats = unlearn_with_candidates(models, retain, [forget] * 3, FIUnConfig(), cands)
    for m, r, (alpha, lam), w in zip(models, retain, cands, got):
        (ref,), _ = unlearn_many([m], [r], forget, FIUnConfig(alpha=alpha, lam=lam))
        assert all(torch.equal(w[k], ref[k]) for k in ref)
    with pytest.raises(ConfigError):
        unlearn_with_candidates(models, retain, [forget] * 3, FIUnConfig(), cands[:2])
    # every model's Fishers are validated once, up front, whichever candidate group they fall in
    bad = {k: v.clone() for k, v in forget.items()}
    next(iter(bad.values())).view(-1)[0] = float("nan")
    with pytest.raises(Exception, match="NaN|finite"):
        unlearn_with_candidates(models, retain, [forget, forget, bad], FIUnConfig(), cands)


def test_one_forward_pass_counts_what_two_do():
    torch.manual_seed(0)
    model = _Linear()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    f, r = _data(30, 1), _data(20, 2)
    assert count_correct_split(model, weights, f, r) == (count_correct(model, weights, f), count_correct(model, weights, r))
    assert count_correct_split(model, weights, None, r) == (0, count_correct(model, weights, r))


def test_check_of_many_models_reports_as_one_model_at_a_time_and_as_unlearn_many_dampens(monkeypatch):
    import fl_unlearn.calibrate as C

    forgettable, stubborn = _tiny(0.0), _tiny(0.6)
    forgettable["fc.weight"][0, 0] = 4.0
    models, alphas = [forgettable, stubborn, _tiny(0.0)], (1.0, 2.0, 4.0, 8.0, 16.0)
    seq = check_sequence(16.0, 1.0, alphas, (1.0, 0.0))
    together = check_models(_Tiny(), models, _RETAIN, [_FORGET] * 3, _FORGET_SET, seq)
    alone = [check_models(_Tiny(), [m], _RETAIN, [_FORGET], _FORGET_SET, seq)[0] for m in models]
    assert together == alone and len({tuple(c) for c in together}) > 1
    # one retain-Fisher per model (distinct dicts, not one shared) checks the same
    copies = [{k: v.clone() for k, v in _RETAIN.items()} for _ in models]
    assert check_models(_Tiny(), models, copies, [_FORGET] * 3, _FORGET_SET, seq) == together
    with pytest.raises(ConfigError, match="2 retain-Fishers"):
        check_models(_Tiny(), models, copies[:2], [_FORGET] * 3, _FORGET_SET, seq)
    # every dampened model the check scores is unlearn_many's at that (alpha, lambda), bit for bit
    seen = []
    real_count_kept = C.count_kept
    monkeypatch.setattr(C, "count_kept", lambda model, w, data, budget: seen.append(w) or real_count_kept(model, w, data,
                                                                                                           budget))
    torch.manual_seed(3)
    rich = [{k: v + 0.3 * torch.randn_like(v) for k, v in _tiny(0.0).items()} for _ in range(2)]
    forget = {k: torch.rand_like(v) * 6 for k, v in _FORGET.items()}
    check_models(_Tiny(), rich, _RETAIN, [forget] * 2, _FORGET_SET, seq)
    candidates = [unlearn_many([m], [scale_free(_RETAIN)], scale_free(forget), FIUnConfig(alpha=a, lam=v))[0][0]
                  for m in rich for v in (0.0, 1.0) for a in alphas]
    assert seen and all(any(all(torch.equal(w[k], c[k]) for k in c) for c in candidates) for w in seen)
    monkeypatch.setattr(C, "count_kept", real_count_kept)
    # a bad Fisher is still refused, before any step
    bad = {k: v.clone() for k, v in _FORGET.items()}
    bad["fc.bias"][0] = float("nan")
    with pytest.raises(Exception, match="NaN|finite"):
        check_models(_Tiny(), models, _RETAIN, [_FORGET, _FORGET, bad], _FORGET_SET, seq)


def test_predictions_in_channels_last_equal_the_plain_forward_pass():
    from fl_unlearn.calibrate import _predict
    from fl_unlearn.models import cnn

    torch.manual_seed(0)
    model = cnn(10).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(40, 1, 28, 28)
    with torch.no_grad():
        plain = model(x)
        assert torch.equal(_predict(model, weights, x), plain.argmax(1))
        assert count_correct(model, weights, (x, plain.argmax(1))) == 40


def test_count_kept_answers_what_count_correct_says_and_stops_above_the_budget(monkeypatch):
    import fl_unlearn.calibrate as C
    from fl_unlearn.calibrate import count_kept

    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(20, 5)
    predicted = model(x).argmax(1).detach()
    calls = []
    real = C._predict
    monkeypatch.setattr(C, "_predict", lambda m, w, rows: calls.append(len(rows)) or real(m, w, rows))
    for y in (predicted, (predicted + 1) % 3, torch.cat([(predicted[:15] + 1) % 3, predicted[15:]])):
        correct = count_correct(model, weights, (x, y))
        for budget in (0, 2, 5, 25):
            assert count_kept(model, weights, (x, y), budget) == min(correct, budget + 1)
    calls.clear()
    assert count_kept(model, weights, (x, predicted)) == 1
    assert calls == [C.FIRST_ROWS]  # a kept sample among the first rows: the rest is not scored
    calls.clear()
    assert count_kept(model, weights, (x, predicted), budget=C.FIRST_ROWS) == C.FIRST_ROWS + 1
    assert calls == [C.FIRST_ROWS, 20 - C.FIRST_ROWS]  # within the budget there: the rest decides
    calls.clear()
    assert count_kept(model, weights, (x, (predicted + 1) % 3)) == 0 and calls == [C.FIRST_ROWS, 20 - C.FIRST_ROWS]
    assert count_kept(model, weights, (x[:0], predicted[:0])) == 0


def test_the_kept_loss_breaks_near_ties_before_the_change():
    grid = ((1.0, 0.0), (2.0, 0.0), (2.0, 1.0), (4.0, 1.0))
    # (2, 0), (2, 1) and (4, 1) keep within 2 of the best count and forget everything; (2, 1) changes the weights
    # least, (4, 1) has the lowest kept loss
    change = {(1.0, 0.0): 5.0, (2.0, 0.0): 3.0, (2.0, 1.0): 0.5, (4.0, 1.0): 1.0}
    plain = GridCounts(grid, [0, 0, 0, 0], [100, 128, 127, 126], 256, 128)
    assert choose_candidate(plain, 0.0, kept_margin=2, change=lambda a, v: change[(a, v)]) == (2.0, 1.0, True)
    # two clients' counts with their kept losses, summed as the server sums them
    first = GridCounts(grid, [0, 0, 0, 0], [50, 64, 64, 63], 128, 64, [40.0, 9.0, 8.0, 3.0])
    second = GridCounts(grid, [0, 0, 0, 0], [50, 64, 63, 63], 128, 64, [38.0, 7.0, 9.0, 2.5])
    total = GridCounts(grid, [0] * 4, [0] * 4) + first + second
    assert total.retain_loss == [78.0, 16.0, 17.0, 5.5]
    assert choose_candidate(total, 0.0, kept_margin=2, change=lambda a, v: change[(a, v)]) == (4.0, 1.0, True)
    assert choose_candidate(total, 0.0, kept_margin=2) == (4.0, 1.0, True)  # the loss alone is enough
    # fewest forget samples still comes first: (4, 1) keeps one of them
    leaky = GridCounts(grid, [0, 0, 0, 1], [100, 128, 127, 126], 256, 128, [78.0, 16.0, 17.0, 5.5])
    assert choose_candidate(leaky, 0.01, kept_margin=2) == (2.0, 0.0, True)
    # a client that sent no losses: the sum has none, and the change decides again
    old = GridCounts(grid, [0, 0, 0, 0], [50, 64, 63, 63], 128, 64)
    assert (first + old).retain_loss is None
    assert choose_candidate(first + old, 0.0, kept_margin=2, change=lambda a, v: change[(a, v)]) == (2.0, 1.0, True)
    # an unscored candidate's loss stays unscored in the sum
    walked = GridCounts(grid, [0, 0, 0, UNSCORED], [50, 64, 64, UNSCORED], 128, 64, [40.0, 9.0, 8.0, UNSCORED_LOSS])
    assert (walked + first).retain_loss[-1] == UNSCORED_LOSS


def test_client_grid_reports_the_summed_cross_entropy_of_its_kept_samples():
    model, weights, retain, forget = _linear_with_fishers()
    forget_set, retain_set = _data(40, 1), _data(60, 2)
    grid = ((2.0, 0.0), (2.0, 1.0), (8.0, 1.0))
    counts = score_alpha_grid(model, weights, retain, forget, forget_set, retain_set, candidates=grid)
    for (alpha, lam), loss in zip(grid, counts.retain_loss):
        (dampened,), _ = unlearn_many([weights], [scale_free(retain)], scale_free(forget), FIUnConfig(alpha=alpha, lam=lam))
        logits = torch.func.functional_call(model, dampened, (retain_set[0],))
        expected = float(torch.nn.functional.cross_entropy(logits.double(), retain_set[1], reduction="sum"))
        assert loss == pytest.approx(expected, rel=1e-9)
    # no kept samples: zero losses, and the counts still add up with a client that has some
    forget_only = score_alpha_grid(model, weights, retain, forget, forget_set, None, candidates=grid)
    assert forget_only.retain_loss == [0.0] * len(grid)
    assert (forget_only + counts).retain_loss == pytest.approx(counts.retain_loss)


def test_the_check_sends_a_local_update_to_one_holder_that_did_not_train_it_on_as_many_samples():
    from strategies.calibration import ClientCalibration, check_plan

    settings = ClientCalibration(check_samples=32)
    ids = ["global-r1", "local-r1-p0", "local-r1-p1", "local-r1-p2", "local-r2-p5"]
    owners = {"local-r1-p0": 0, "local-r1-p1": 1, "local-r1-p2": 2, "local-r2-p5": 5}  # 5 holds no data to forget
    plan = check_plan(ids, owners, [0, 1, 2], settings)
    assert plan == {0: [(0, 32), (2, 96), (3, 96)], 1: [(0, 32), (1, 96)], 2: [(0, 32), (4, 96)]}
    totals: dict[int, int] = {}
    for holder, items in plan.items():
        for i, rows in items:
            totals[i] = totals.get(i, 0) + rows
            assert owners.get(ids[i]) != holder  # never at the client that trained it
    # every model is checked on as many samples in all, so the one budget holds for each
    assert totals == {i: 3 * 32 for i in range(len(ids))} and settings.single_check_rows(3) == 96
    assert check_plan(ids, {}, [0, 1], settings) == {h: [(i, 32) for i in range(len(ids))] for h in (0, 1)}
    assert check_plan(["local-r1-p0"], {"local-r1-p0": 0}, [0], settings) == {0: [(0, 32)]}  # the only holder


def test_alphas_that_change_the_same_weights_share_one_forward_pass(monkeypatch):
    # at lambda 1 an alpha below 1 also selects weights with F_f <= F_D, whose factor min(F_D / F_f, 1) is 1: the
    # dampened weights equal alpha 1's bit for bit, and the grid scores them once
    import fl_unlearn.calibrate as cal

    model, weights, retain, forget = _linear_with_fishers()
    forget_set, retain_set = _data(30, 6), _data(40, 7)
    grid = candidate_grid((0.25, 0.5, 1.0, 2.0, 4.0), (1.0, 0.0))
    calls: list[int] = []
    real = cal.score_split
    monkeypatch.setattr(cal, "score_split", lambda *a: calls.append(1) or real(*a))
    shared = score_alpha_grid(model, weights, retain, forget, forget_set, retain_set, candidates=grid)
    passes, calls[:] = len(calls), []
    monkeypatch.setattr(cal.AlphaSweep, "effective_alpha", lambda self, alpha: alpha)  # score every candidate
    every = score_alpha_grid(model, weights, retain, forget, forget_set, retain_set, candidates=grid)
    assert (shared.forget_correct, shared.retain_correct, shared.retain_loss) == \
        (every.forget_correct, every.retain_correct, every.retain_loss)
    assert passes == len(calls) - 2  # alphas 0.5 and 1 at lambda 1 took alpha 0.25's scores
    monkeypatch.undo()
    sweep = cal.AlphaSweep(weights, scale_free(retain), scale_free(forget), FIUnConfig(lam=1.0))
    assert sweep.effective_alpha(0.5) == sweep.effective_alpha(1.0) == 1.0 and sweep.effective_alpha(2.0) == 2.0
    assert all(torch.equal(sweep.at(a)[k], sweep.at(1.0)[k]) for a in (0.25, 0.5) for k in weights)
    assert not all(torch.equal(sweep.at(2.0)[k], sweep.at(1.0)[k]) for k in weights)
    at_zero = cal.AlphaSweep(weights, scale_free(retain), scale_free(forget), FIUnConfig(lam=0.0))
    assert at_zero.effective_alpha(0.5) == 0.5  # lambda 0 zeroes every selected weight: no two alphas alike
