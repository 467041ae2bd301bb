"""Tests for fl_unlearn.mfim.merge_fishers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_unlearn.errors import ConfigError, FisherError
from fl_unlearn.mfim import MERGE_MODES, merge_fishers

SHAPES = {"fc.weight": (3, 5), "fc.bias": (3,)}


def random_fisher(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    fisher = {}
    for name, shape in SHAPES.items():
        scale = 10.0 ** torch.randint(-8, 3, (1,), generator=gen)
        t = torch.rand(shape, generator=gen, dtype=torch.float64) ** 3 * scale
        t[torch.rand(shape, generator=gen) < 0.2] = 0.0
        fisher[name] = t.to(dtype)
    return fisher


def clone(fisher: dict) -> dict:
    return {k: v.clone() for k, v in fisher.items()}


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k] - b[k]).abs().max() for k in a}


@settings(max_examples=25, deadline=None)
@given(seeds=st.lists(st.integers(0, 10_000), min_size=1, max_size=5), data=st.data())
def test_merges_ignore_input_order(seeds: list[int], data: st.DataObject) -> None:
    fishers = [random_fisher(s) for s in seeds]
    counts = data.draw(st.lists(st.integers(1, 10_000), min_size=len(seeds), max_size=len(seeds)))
    order = data.draw(st.permutations(range(len(seeds))))
    for mode in MERGE_MODES:
        merged = merge_fishers(fishers, num_samples=counts, mode=mode)
        shuffled = merge_fishers([fishers[i] for i in order], num_samples=[counts[i] for i in order], mode=mode)
        assert_equal(merged, shuffled)


def test_max_is_elementwise_max() -> None:
    fishers = [random_fisher(s) for s in range(3)]
    expected = {k: torch.maximum(torch.maximum(fishers[0][k], fishers[1][k]), fishers[2][k]) for k in SHAPES}
    assert_equal(merge_fishers(fishers), expected)
    assert_equal(merge_fishers(fishers, mode="max"), expected)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_max_scaled_is_max_times_scale(k: int) -> None:
    fishers = [random_fisher(s) for s in range(k)]
    plain = merge_fishers(fishers, mode="max")
    assert_equal(merge_fishers(fishers, mode="max_scaled"), {n: t * 5.0 ** -(k - 1) for n, t in plain.items()})
    assert_equal(merge_fishers(fishers, mode="max_scaled", scale_base=2.0),
                 {n: t * 2.0 ** -(k - 1) for n, t in plain.items()})


def test_sum() -> None:
    fishers = [random_fisher(s) for s in range(3)]
    merged = merge_fishers(fishers, mode="sum")
    for name in SHAPES:
        torch.testing.assert_close(merged[name], fishers[0][name] + fishers[1][name] + fishers[2][name])


def test_weighted_mean_formula() -> None:
    fishers = [random_fisher(s) for s in range(3)]
    counts = [10, 30, 60]
    merged = merge_fishers(fishers, mode="weighted_mean", num_samples=counts)
    for name in SHAPES:
        expected = sum(n * f[name].double() for n, f in zip(counts, fishers)) / sum(counts)
        torch.testing.assert_close(merged[name], expected.float())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), counts=st.lists(st.integers(1, 1_000_000), min_size=1, max_size=6))
def test_weighted_mean_of_identical_fishers_is_that_fisher(seed: int, counts: list[int]) -> None:
    fisher = random_fisher(seed)
    assert_equal(merge_fishers([fisher] * len(counts), mode="weighted_mean", num_samples=counts), fisher)


@pytest.mark.parametrize("mode", MERGE_MODES)
def test_single_fisher_is_a_copy(mode: str) -> None:
    fisher = random_fisher(0)
    merged = merge_fishers([fisher], mode=mode, num_samples=[7])
    assert_equal(merged, fisher)
    assert all(merged[k] is not fisher[k] and merged[k].data_ptr() != fisher[k].data_ptr() for k in fisher)


def test_dtype_kept() -> None:
    fishers = [random_fisher(s, torch.float64) for s in range(2)]
    for mode in MERGE_MODES:
        merged = merge_fishers(fishers, mode=mode, num_samples=[1, 2])
        assert all(t.dtype == torch.float64 for t in merged.values())


@pytest.mark.parametrize("mode", MERGE_MODES)
def test_inputs_not_mutated(mode: str) -> None:
    fishers = [random_fisher(s) for s in range(3)]
    before = [clone(f) for f in fishers]
    merge_fishers(fishers, mode=mode, num_samples=[1, 2, 3])
    for f, b in zip(fishers, before):
        assert_equal(f, b)


@pytest.mark.parametrize("edit, match", [
    (lambda f: f.pop("fc.bias"), r"fishers\[1\].*'fc.bias' is missing"),
    (lambda f: f.update(extra=torch.zeros(2)), r"fishers\[1\].*'extra' is not a model parameter"),
    (lambda f: f.update({"fc.bias": torch.zeros(4)}), r"fishers\[1\].*'fc.bias' has shape \(4,\)"),
    (lambda f: f["fc.weight"].__setitem__((0, 0), float("nan")), r"fishers\[1\].*'fc.weight' has 1 NaN"),
    (lambda f: f["fc.weight"].__setitem__((0, 0), -1.0), r"fishers\[1\].*'fc.weight' has 1 negative"),
])
def test_bad_fishers_raise_naming_the_key(edit, match: str) -> None:
    fishers = [random_fisher(s) for s in range(3)]
    edit(fishers[1])
    with pytest.raises(FisherError, match=match):
        merge_fishers(fishers, mode="max")


def test_bad_first_fisher_is_caught() -> None:
    fishers = [random_fisher(0), random_fisher(1)]
    fishers[0]["fc.bias"][1] = float("inf")
    with pytest.raises(FisherError, match=r"fishers\[0\].*'fc.bias' has 1 NaN/inf"):
        merge_fishers(fishers)


def test_no_fishers() -> None:
    with pytest.raises(FisherError, match="no Fishers"):
        merge_fishers([])


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "mean"}, "Unknown merge mode 'mean'"),
    ({"mode": "weighted_mean"}, "needs num_samples"),
    ({"mode": "weighted_mean", "num_samples": [1]}, "1 entries for 2 Fishers"),
    ({"mode": "weighted_mean", "num_samples": [1, 0]}, r"> 0; got \[0\]"),
    ({"mode": "sum", "num_samples": [1, -2]}, r"> 0; got \[-2\]"),
    ({"mode": "max_scaled", "scale_base": 0.0}, "scale_base"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        merge_fishers([random_fisher(0), random_fisher(1)], **kwargs)
