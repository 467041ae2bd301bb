"""Tests for fl_unlearn.fiun: the dampening rule, dampen() and the vectorised unlearn_many()."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from fl_unlearn.errors import ConfigError, FisherError
from fl_unlearn.fiun import AlphaSweep, DampenStats, FIUnConfig, dampen, dampen_tensor, unlearn_many

SHAPES = {"conv.weight": (2, 1, 3, 3), "fc.weight": (4, 6), "fc.bias": (4,)}
FISHER_NAMES = ["fc.weight", "fc.bias"]
SPECIAL = [0.0, 1e-45, 1e-38, 1e-30, 1e-3, 1.0, 3.0e38]  # zeros, subnormal, tiny, ordinary, huge (fp32)


class NonFiniteGuard(TorchFunctionMode):
    """Fail as soon as any torch call returns a floating tensor with NaN or inf."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                raise AssertionError(f"{func} produced a non-finite tensor")
        return out


def fisher_values(n: int) -> st.SearchStrategy[torch.Tensor]:
    """Fisher entries >= 0 mixing exact zeros, subnormals and ordinary values."""
    value = st.one_of(st.sampled_from(SPECIAL), st.floats(0.0, 10.0, width=32))
    return st.lists(value, min_size=n, max_size=n).map(lambda v: torch.tensor(v, dtype=torch.float32))


def weights_of(n: int) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(st.floats(-5.0, 5.0, width=32), min_size=n, max_size=n).map(torch.tensor)


configs = st.builds(
    FIUnConfig,
    alpha=st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0]),
    lam=st.sampled_from([0.0, 0.1, 1.0, 2.0]),
    exponent=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    lower_bound=st.sampled_from([0.1, 1.0, 2.0]),
    tau=st.sampled_from([0.0, 1e-30, 1e-3]),
)


def reference_step(w: torch.Tensor, fd: torch.Tensor, ff: torch.Tensor, cfg: FIUnConfig):
    """The fiun.md §9 rule, element by element in float64 Python arithmetic."""
    new, selected = [], []
    for wi, di, fi in zip(w.tolist(), fd.double().tolist(), ff.double().tolist()):
        sel = fi > cfg.alpha * di and fi > cfg.tau
        beta = min((cfg.lam * di / fi) ** cfg.exponent, cfg.lower_bound) if sel else 1.0
        new.append(wi * beta)
        selected.append(sel)
    return torch.tensor(new, dtype=torch.float64), torch.tensor(selected)


# --------------------------------------------------------------------------------------------
# FIUnConfig
# --------------------------------------------------------------------------------------------


def test_config_defaults_are_the_papers() -> None:
    assert dataclasses.asdict(FIUnConfig()) == {"alpha": 1.0, "lam": 1.0, "exponent": 1.0, "lower_bound": 1.0,
                                                "tau": 0.0}


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": -0.1}, "alpha must be >= 0"),
    ({"lam": -1.0}, "lam must be >= 0"),
    ({"exponent": 0.0}, "exponent must be > 0"),
    ({"lower_bound": 0.0}, "lower_bound must be > 0"),
    ({"tau": -1e-9}, "tau must be >= 0"),
    ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"lam": "1"}, "lam must be a finite number"),
])
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FIUnConfig(**kwargs)


def test_config_lists_every_problem() -> None:
    with pytest.raises(ConfigError, match="alpha.*exponent"):
        FIUnConfig(alpha=-1, exponent=-1)


# --------------------------------------------------------------------------------------------
# dampen_tensor: properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), cfg=configs)
def test_dampen_tensor_follows_the_rule(data: st.DataObject, n: int, cfg: FIUnConfig) -> None:
    w, fd, ff = data.draw(weights_of(n)), data.draw(fisher_values(n)), data.draw(fisher_values(n))
    with NonFiniteGuard():
        new, selected, zeroed = dampen_tensor(w, fd, ff, cfg)
    expected, sel = reference_step(w, fd, ff, cfg)
    assert new.dtype == w.dtype and torch.isfinite(new).all()
    assert torch.equal(new[~sel], w[~sel])  # unselected: bit-identical
    torch.testing.assert_close(new[sel].double(), expected[sel], rtol=1e-6, atol=1e-44)  # fp32 subnormals
    assert selected == int(sel.sum())
    assert zeroed == int((sel & ((fd == 0) | (cfg.lam == 0))).sum())


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), cfg=configs)
def test_dampening_never_grows_weights_with_cap_one(data: st.DataObject, n: int, cfg: FIUnConfig) -> None:
    cfg = dataclasses.replace(cfg, lower_bound=1.0)
    w, fd, ff = data.draw(weights_of(n)), data.draw(fisher_values(n)), data.draw(fisher_values(n))
    new, _, _ = dampen_tensor(w, fd, ff, cfg)
    assert (new.abs() <= w.abs()).all()


@pytest.mark.parametrize("fd, ff", [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.0, 1e-45), (3.0e38, 1e-45),
                                    (1e-45, 0.0)])
@pytest.mark.parametrize("cfg", [FIUnConfig(), FIUnConfig(alpha=0.0, lam=1e6, exponent=2.0, lower_bound=1e3)])
def test_zero_and_tiny_fishers_stay_finite(fd: float, ff: float, cfg: FIUnConfig) -> None:
    w = torch.tensor([1.5, -2.0, 0.0])
    with NonFiniteGuard():
        new, _, _ = dampen_tensor(w, torch.full((3,), fd), torch.full((3,), ff), cfg)
    assert torch.isfinite(new).all()


def test_zero_retain_fisher_zeroes_and_zero_forget_fisher_keeps() -> None:
    w = torch.tensor([1.0, 2.0, 3.0])
    new, selected, zeroed = dampen_tensor(w, torch.tensor([0.0, 0.0, 1.0]), torch.tensor([2.0, 0.0, 0.0]),
                                          FIUnConfig())
    assert torch.equal(new, torch.tensor([0.0, 2.0, 3.0]))
    assert (selected, zeroed) == (1, 1)


def test_tau_floor_guards_noise() -> None:
    w = torch.ones(2)
    new, selected, _ = dampen_tensor(w, torch.zeros(2), torch.tensor([1e-12, 1.0]), FIUnConfig(tau=1e-9))
    assert torch.equal(new, torch.tensor([1.0, 0.0])) and selected == 1


def test_half_precision_weights_keep_dtype() -> None:
    w = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    new, _, _ = dampen_tensor(w, torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.5]), FIUnConfig())
    assert new.dtype == torch.bfloat16 and torch.equal(new, torch.tensor([0.5, 2.0], dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------
# dampen
# --------------------------------------------------------------------------------------------


def make_weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
    weights["steps"] = torch.tensor(7)  # a non-floating buffer, never touched
    return weights


def make_fisher(seed: int, zero_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    fisher = {}
    for name in FISHER_NAMES:
        t = torch.rand(SHAPES[name], generator=gen) ** 4
        t[torch.rand(SHAPES[name], generator=gen) < zero_fraction] = 0.0
        fisher[name] = t
    return fisher


def snapshot(d: dict) -> dict:
    return {k: v.clone() for k, v in d.items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equal bits, NaN included, where torch.equal is False for NaN."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(bits(a[k]), bits(b[k])), k


def test_dampen_touches_only_fisher_names_and_copies() -> None:
    weights, fd, ff = make_weights(0), make_fisher(1), make_fisher(2)
    before = [snapshot(weights), snapshot(fd), snapshot(ff)]
    out, stats = dampen(weights, fd, ff, FIUnConfig())
    assert_same({k: out[k] for k in ("conv.weight", "steps")}, {k: weights[k] for k in ("conv.weight", "steps")})
    assert all(out[k].data_ptr() != weights[k].data_ptr() for k in weights)
    for name in FISHER_NAMES:
        expected, _, _ = dampen_tensor(weights[name], fd[name], ff[name], FIUnConfig())
        assert torch.equal(out[name], expected)
    for now, then in zip([weights, fd, ff], before):
        assert_same(now, then)
    assert stats.total == 4 * 6 + 4
    assert stats.selected == sum(v["selected"] for v in stats.per_tensor.values()) > 0
    json.dumps(dataclasses.asdict(stats))


@pytest.mark.parametrize("which", ["retain", "forget"])
@pytest.mark.parametrize("edit, match", [
    (lambda f: f["fc.bias"].__setitem__(0, float("nan")), "'fc.bias' has 1 NaN/inf"),
    (lambda f: f["fc.bias"].__setitem__(0, -1.0), "'fc.bias' has 1 negative"),
    (lambda f: f.update({"fc.weight": torch.zeros(6, 4)}), r"'fc.weight' has shape \(6, 4\)"),
    (lambda f: f.update({"head.weight": torch.zeros(1)}), "'head.weight' is not a model parameter"),
])
def test_dampen_rejects_bad_fishers_and_changes_nothing(which: str, edit, match: str) -> None:
    weights, fd, ff = make_weights(0), make_fisher(1), make_fisher(2)
    edit(fd if which == "retain" else ff)
    before = [snapshot(weights), snapshot(fd), snapshot(ff)]
    with pytest.raises(FisherError, match=f"{which} .*{match}"):
        dampen(weights, fd, ff, FIUnConfig())
    for now, then in zip([weights, fd, ff], before):
        assert_same(now, then)


def test_dampen_needs_the_same_names_in_both_fishers() -> None:
    ff = make_fisher(2)
    del ff["fc.bias"]
    with pytest.raises(FisherError, match="'fc.bias' is in the retain-Fisher but not the forget-Fisher"):
        dampen(make_weights(0), make_fisher(1), ff, FIUnConfig())


def test_dampen_rejects_fisher_on_integer_weight() -> None:
    fisher = {"steps": torch.tensor(1.0)}
    with pytest.raises(FisherError, match="'steps' has dtype torch.int64"):
        dampen(make_weights(0), fisher, fisher, FIUnConfig())


def test_dampen_rejects_a_non_config() -> None:
    with pytest.raises(ConfigError, match="FIUnConfig"):
        dampen(make_weights(0), make_fisher(1), make_fisher(2), {"alpha": 1.0})


# --------------------------------------------------------------------------------------------
# unlearn_many
# --------------------------------------------------------------------------------------------


def loop(models, retains, forgets, cfg):
    results = [dampen(m, r, f, cfg) for m, r, f in zip(models, retains, forgets)]
    return [r[0] for r in results], [r[1] for r in results]


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000), shared=st.booleans(), shared_retain=st.booleans(),
       cfg=configs)
def test_unlearn_many_equals_the_loop_bitwise(n: int, seed: int, shared: bool, shared_retain: bool,
                                              cfg: FIUnConfig) -> None:
    # shared Fishers are broadcast over the models (selection and factors computed once), not stacked
    models = [make_weights(seed + i) for i in range(n)]
    retains = [make_fisher(seed + 100)] * n if shared_retain else [make_fisher(seed + 100 + i) for i in range(n)]
    forgets = [make_fisher(seed + 200)] * n if shared else [make_fisher(seed + 200 + i) for i in range(n)]
    before = [snapshot(d) for d in models + retains + forgets]
    outs, stats = unlearn_many(models, retains, forgets[0] if shared else forgets, cfg)
    expected_outs, expected_stats = loop(models, retains, forgets, cfg)
    for out, expected in zip(outs, expected_outs):
        assert_same(out, expected)
    assert stats == expected_stats
    for now, then in zip(models + retains + forgets, before):
        assert_same(now, then)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), cfg=configs)
def test_an_alpha_sweep_equals_dampening_at_each_alpha_bitwise(seed: int, cfg: FIUnConfig) -> None:
    weights, retain, forget = make_weights(seed), make_fisher(seed + 1), make_fisher(seed + 2)
    before = [snapshot(d) for d in (weights, retain, forget)]
    sweep = AlphaSweep(weights, retain, forget, cfg)
    # in a grid's order (each alpha's zero check, then the weights) and back again: the remembered selection is
    # always the asked alpha's
    for alpha in (0.0, 0.5, 1.0, 3.0, 10.0, 1e9, 3.0, 0.5):
        expected, _ = dampen(weights, retain, forget, dataclasses.replace(cfg, alpha=alpha))
        sweep.zeroes_a_weight(alpha)
        assert_same(sweep.at(alpha), expected)
        assert_same(sweep.at(alpha), expected)
    for now, then in zip((weights, retain, forget), before):
        assert_same(now, then)
    with pytest.raises(FisherError):
        AlphaSweep(weights, {**retain, "fc.bias": -retain["fc.bias"] - 1}, forget, cfg)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), cfg=configs)
def test_a_fisher_sweep_shared_by_models_equals_unlearn_many_per_model_bitwise(seed: int, cfg: FIUnConfig) -> None:
    from fl_unlearn.fiun import FisherSweep

    models, retain, forget = [make_weights(seed), make_weights(seed + 1)], make_fisher(seed + 2), make_fisher(seed + 3)
    sweep = FisherSweep(retain, forget, cfg, like=models[0])
    damped = [sweep.damped(m) for m in models]
    for alpha in (0.5, 3.0, 0.5):  # the second 0.5 reads the kept selection
        expected, _ = unlearn_many(models, [retain, retain], forget, dataclasses.replace(cfg, alpha=alpha))
        for m, d, e in zip(models, damped, expected):
            assert_same(sweep.at(m, d, alpha), e)
            assert_same(sweep.at(m, d, alpha, keep=False), e)


def test_check_many_validates_what_unlearn_many_would() -> None:
    from fl_unlearn.fiun import check_many

    weights, retain, forget = make_weights(0), make_fisher(1), make_fisher(2)
    assert set(check_many([weights, weights], [retain, retain], [forget, forget])) == set(retain)
    with pytest.raises(ConfigError, match="1 retain-Fishers"):
        check_many([weights, weights], [retain], [forget, forget])
    with pytest.raises(FisherError, match=r"models\[1\]"):
        check_many([weights, weights], [retain, {**retain, "fc.bias": -retain["fc.bias"] - 1}], [forget, forget])


def test_unlearn_many_large_tensor_equals_loop() -> None:
    """Long tensors exercise vectorised kernels, their scalar tails and parallel chunks."""
    gen = torch.Generator().manual_seed(0)
    shape = (100, 513)
    models = [{"fc.weight": torch.randn(shape, generator=gen)} for _ in range(5)]
    retains = [{"fc.weight": torch.rand(shape, generator=gen) ** 4} for _ in range(5)]
    forget = {"fc.weight": torch.rand(shape, generator=gen) ** 4}
    for cfg in [FIUnConfig(), FIUnConfig(alpha=0.5, lam=0.7, exponent=2.0, lower_bound=1.5)]:
        outs, _ = unlearn_many(models, retains, forget, cfg)
        expected, _ = loop(models, retains, [forget] * 5, cfg)
        for out, exp in zip(outs, expected):
            assert torch.equal(out["fc.weight"], exp["fc.weight"])


@pytest.mark.parametrize("budget", [1, 600, 2**18])
@pytest.mark.parametrize("shared", [True, False])
def test_unlearn_many_in_chunks_equals_the_loop_bitwise(monkeypatch: pytest.MonkeyPatch, budget: int,
                                                        shared: bool) -> None:
    """On CPU the models are stacked in cache-sized chunks: one model per stack (budget 1), uneven chunks with a
    tail (600 elements: a few models per stack for the small tensors, one for the large), and all at once."""
    import fl_unlearn.fiun as fiun

    monkeypatch.setattr(fiun, "CPU_CHUNK_ELEMENTS", budget)
    n = 7
    models = [make_weights(i) for i in range(n)]
    retains = [make_fisher(100 + i) for i in range(n)]
    forgets = [make_fisher(200)] * n if shared else [make_fisher(200 + i) for i in range(n)]
    cfg = FIUnConfig(alpha=0.5, lam=0.7)
    outs, stats = unlearn_many(models, retains, forgets[0] if shared else forgets, cfg)
    expected_outs, expected_stats = loop(models, retains, forgets, cfg)
    for out, expected in zip(outs, expected_outs):
        assert_same(out, expected)
    assert stats == expected_stats


def test_chunks_cover_every_model_once() -> None:
    from fl_unlearn.fiun import CPU_CHUNK_ELEMENTS, _chunks

    like = torch.zeros(CPU_CHUNK_ELEMENTS // 3 + 1)  # two models fit in a chunk, not three
    slices = _chunks(7, like)
    assert [(s.start, s.stop) for s in slices] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert _chunks(3, torch.zeros(2 * CPU_CHUNK_ELEMENTS)) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert _chunks(5, torch.zeros(4)) == [slice(0, 5)]


def test_unlearn_many_outputs_are_independent() -> None:
    models = [make_weights(i) for i in range(3)]
    outs, _ = unlearn_many(models, [make_fisher(10 + i) for i in range(3)], make_fisher(20), FIUnConfig())
    outs[0]["fc.weight"].add_(1.0)
    expected, _ = dampen(models[1], make_fisher(11), make_fisher(20), FIUnConfig())
    assert torch.equal(outs[1]["fc.weight"], expected["fc.weight"])


@pytest.mark.parametrize("n_retain, n_forget, match", [
    (2, 3, "3 models but 2 retain-Fishers"),
    (3, 2, "3 models but 2 forget-Fishers"),
])
def test_unlearn_many_length_mismatch(n_retain: int, n_forget: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        unlearn_many([make_weights(i) for i in range(3)], [make_fisher(i) for i in range(n_retain)],
                     [make_fisher(i) for i in range(n_forget)], FIUnConfig())


def test_unlearn_many_no_models() -> None:
    with pytest.raises(ConfigError, match="no models"):
        unlearn_many([], [], {}, FIUnConfig())


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("conv.weight"), r"models\[2\] lacks 'conv.weight'"),
    (lambda m: m.update(extra=torch.zeros(1)), r"models\[2\] has extra 'extra'"),
    (lambda m: m.update({"fc.bias": torch.zeros(5)}), r"models\[2\]\['fc.bias'\] is \(5,\)"),
    (lambda m: m.update({"fc.bias": torch.zeros(4, dtype=torch.float64)}), r"models\[2\]\['fc.bias'\].*float64"),
])
def test_unlearn_many_rejects_different_models(edit, match: str) -> None:
    models = [make_weights(i) for i in range(3)]
    edit(models[2])
    with pytest.raises(ConfigError, match=match):
        unlearn_many(models, [make_fisher(i) for i in range(3)], make_fisher(9), FIUnConfig())


def test_unlearn_many_names_the_model_and_key_of_a_bad_fisher() -> None:
    models = [make_weights(i) for i in range(3)]
    retains = [make_fisher(i) for i in range(3)]
    retains[1]["fc.weight"][0, 0] = float("nan")
    before = [snapshot(d) for d in models + retains]
    with pytest.raises(FisherError, match=r"models\[1\].*retain .*'fc.weight' has 1 NaN"):
        unlearn_many(models, retains, make_fisher(9), FIUnConfig())
    for now, then in zip(models + retains, before):
        assert_same(now, then)


def test_unlearn_many_needs_the_same_fisher_names_for_all_models() -> None:
    models = [make_weights(i) for i in range(2)]
    retains = [make_fisher(0), {"fc.weight": make_fisher(1)["fc.weight"]}]
    forgets = [make_fisher(2), {"fc.weight": make_fisher(3)["fc.weight"]}]
    with pytest.raises(FisherError, match=r"models\[1\].*'fc.bias'"):
        unlearn_many(models, retains, forgets, FIUnConfig())


def test_stats_are_json_friendly() -> None:
    _, stats = unlearn_many([make_weights(0)], [make_fisher(1)], make_fisher(2), FIUnConfig())
    record = json.loads(json.dumps(dataclasses.asdict(stats[0])))
    assert set(record) == {"selected", "zeroed", "total", "per_tensor"}
    assert record["per_tensor"]["fc.bias"]["total"] == 4
    assert isinstance(stats[0], DampenStats)
